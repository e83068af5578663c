"""`dvl eval` end to end on the synthetic task with a tiny random model: a random model scores about 0, so the
tests check the structure and the bookkeeping (results, sample logs, resume, the CLI's errors)."""

from __future__ import annotations

import json
import os

import jax
import pytest

from dvl_jax.cli import eval as eval_cli
from dvl_jax.cli.commands import main
from dvl_jax.core import mappings
from dvl_jax.evaluation import get_task, runner

LIMIT, GEN = 6, 16


def _evaluate(eval_model, out_dir, **kw):
  model, processor = eval_model
  return runner.evaluate(model, processor, "synthetic", limit=LIMIT, batch_size=4, gen_length=GEN,
                         out_dir=str(out_dir), log_samples=True, progress=False, **kw)


def _log(out_dir, decoder: str) -> list[dict]:
  with open(runner.samples_log(str(out_dir), decoder), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_every_decoder_is_scored_and_logged(eval_model, tmp_path, capsys):
  results = _evaluate(eval_model, tmp_path)
  with open(tmp_path / runner.RESULTS_FILE, encoding="utf-8") as f:
    assert json.load(f) == json.loads(json.dumps(results))
  task = get_task("synthetic")
  samples = list(task.load(None))[:LIMIT]
  assert list(results["decoders"]) == list(runner.DECODERS) and results["samples"] == LIMIT
  for name, r in results["decoders"].items():
    assert set(r["speed"]) == set(runner.SPEED_FIELDS) and all(v > 0 for v in r["speed"].values())
    rows = _log(tmp_path, name)
    assert [row["id"] for row in rows] == [s.id for s in samples]
    assert r["metrics"] == task.aggregate(samples, [row["score"] for row in rows])
    assert all(row["score"] == task.score(s, row["answer"]).score for row, s in zip(rows, samples))
    assert r["speed"]["nfe"] == pytest.approx(sum(row["nfe"] for row in rows) / LIMIT)
  assert results["decoders"]["ar"]["config"]["algorithm"] == "autoregressive"
  table = capsys.readouterr().out
  assert "| decoder | exact_match | tokens/forward | NFE | tokens/s | s/answer |" in table
  assert all(f"| {name} |" in table for name in runner.DECODERS)


def test_resume_skips_logged_samples(eval_model, tmp_path, monkeypatch):
  _evaluate(eval_model, tmp_path, decoders=("static",))
  rows = _log(tmp_path, "static")
  os.remove(tmp_path / runner.RESULTS_FILE)
  with open(runner.samples_log(str(tmp_path), "static"), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows[:2])
    f.write('{"id": "cut short')  # a crash mid-line: that sample runs again
  generated, real = [], runner.generate
  monkeypatch.setattr(runner, "generate", lambda model, inputs, *a, **kw: generated.append(len(inputs["input_ids"]))
                      or real(model, inputs, *a, **kw))
  results = _evaluate(eval_model, tmp_path, decoders=("static",), resume=True)
  assert generated == [4, 4]  # warm-up and one batch of the 4 samples not logged
  resumed = _log(tmp_path, "static")
  assert [row["id"] for row in resumed] == [row["id"] for row in rows]
  assert [row["answer"] for row in resumed] == [row["answer"] for row in rows]  # greedy: the same answers
  assert (tmp_path / runner.RESULTS_FILE).exists() and results["decoders"]["static"]["metrics"]["exact_match"] == (
      sum(row["score"] for row in rows) / LIMIT)


def test_cli_runs_writes_results_and_resumes(eval_checkpoint, pixel_args, tmp_path, monkeypatch):
  out = tmp_path / "out"
  argv = ["eval", "--checkpoint", eval_checkpoint, "--task", "synthetic", "--limit", "4", "--batch-size", "4",
          "--decoders", "ar,threshold", "--gen-length", str(GEN), "--out", str(out), "--log-samples",
          *pixel_args, "--no-progress"]
  assert main(argv) == 0
  with open(out / runner.RESULTS_FILE, encoding="utf-8") as f:
    first = json.load(f)
  assert list(first["decoders"]) == ["ar", "threshold"] and len(_log(out, "threshold")) == 4
  monkeypatch.setattr(runner, "generate", lambda *a, **kw: pytest.fail("every sample was logged"))
  assert main([*argv, "--resume"]) == 0
  with open(out / runner.RESULTS_FILE, encoding="utf-8") as f:
    assert json.load(f)["decoders"]["threshold"]["metrics"] == first["decoders"]["threshold"]["metrics"]


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "error: unknown task 'nope'"),
    (["--task", "synthetic", "--decoders", "ar,fast"], "unknown decoder 'fast'"),
    (["--task", "mmmu_val", "--data", "/nonexistent"], "/nonexistent"),
    (["--task", "synthetic", "--limit", "0"], "--limit must be >= 1, got 0"),
    (["--task", "synthetic", "--sweep-threshold", "0.5,high"], "--sweep-threshold takes comma-separated numbers"),
    (["--task", "synthetic", "--decoders", "ar", "--sweep-threshold", "0.5,1"], "in (0, 1), got 1.0"),
    (["--task", "synthetic", "--resume"], "add --out DIR"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, message):
  assert main(["eval", "--checkpoint", str(tmp_path), *args]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("dvl eval: error: ") and message in err


def test_cli_decoders_match_the_runner():
  assert eval_cli.DECODERS.split(",") == list(runner.DECODERS)


def test_cli_needs_a_checkpoint_or_a_server(capsys):
  with pytest.raises(SystemExit) as exit:
    main(["eval", "--task", "synthetic"])
  assert exit.value.code == 2 and "one of the arguments --checkpoint --server is required" in capsys.readouterr().err


def test_timing_repeats_time_the_fastest_run_of_the_same_answers(eval_model, tmp_path, monkeypatch):
  calls = []
  real = runner.generate
  monkeypatch.setattr(runner, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
  model, processor = eval_model
  answers = {}
  for repeats in (1, 3):
    calls.clear()
    out = tmp_path / str(repeats)
    runner.evaluate(model, processor, "synthetic", decoders=("dynamic",), limit=LIMIT, batch_size=2, gen_length=16,
                    out_dir=str(out), log_samples=True, progress=False, timing_repeats=repeats)
    answers[repeats] = [(row["answer"], row["nfe"]) for row in _log(out, "dynamic")]
    assert len(calls) == 1 + repeats * -(-LIMIT // 2)  # the warm-up, then every batch `repeats` times
  assert answers[3] == answers[1]
  with pytest.raises(ValueError, match="--timing-repeats must be >= 1"):
    runner.InProcess(model, processor, 0)


def test_near_the_mapping_limit_each_batch_drops_the_compiled_programs_and_answers_the_same(eval_model, tmp_path,
                                                                                            monkeypatch):
  answers, real = {}, jax.clear_caches
  for near in (False, True):
    out = tmp_path / str(near)
    with monkeypatch.context() as patch:
      clears = []
      patch.setattr(jax, "clear_caches", lambda: (clears.append(1), real()))
      if near:
        patch.setattr(mappings, "usage", lambda *_: (95, 100))
      runner.evaluate(*eval_model, "synthetic", decoders=("dynamic",), limit=LIMIT, batch_size=2, gen_length=16,
                      out_dir=str(out), log_samples=True, progress=False)
    assert len(clears) == (-(-LIMIT // 2) if near else 0)  # before every batch, or never
    answers[near] = [(row["answer"], row["nfe"]) for row in _log(out, "dynamic")]
  assert answers[True] == answers[False]


def test_cli_timing_repeats_are_in_process_only(capsys):
  argv = ["eval", "--server", "http://127.0.0.1:9", "--task", "synthetic", "--timing-repeats", "2"]
  assert main(argv) == 2
  assert "--timing-repeats times in-process decoding" in capsys.readouterr().err


def test_in_process_decoders_take_turns_batch_by_batch(eval_model, tmp_path, monkeypatch):
  """`evaluate` interleaves the decoders (AR's batch 1, dynamic's batch 1, AR's batch 2, ...), so their speeds
  come from the same minutes of the machine; the answers and logs are those of one row after another."""
  order, real = [], runner.generate
  monkeypatch.setattr(runner, "generate", lambda model, inputs, config, **kw: order.append(config.algorithm)
                      or real(model, inputs, config, **kw))
  results = {}
  for interleave in (True, False):
    order.clear()
    out = tmp_path / str(interleave)
    settings = runner.EvalSettings("synthetic", decoders=("ar", "dynamic"), limit=LIMIT, batch_size=2,
                                   gen_length=GEN, out_dir=str(out), log_samples=True)
    results[interleave] = runner.run(runner.InProcess(*eval_model), settings, progress=False, interleave=interleave)
    batches = -(-LIMIT // 2)
    ar, bd = "autoregressive", "block_diffusion"
    want = ([ar, ar, bd, bd] + [ar, bd] * (batches - 1) if interleave  # each first batch after its warm-up
            else [ar] * (batches + 1) + [bd] * (batches + 1))
    assert order == want
    assert list(results[interleave]["decoders"]) == ["ar", "dynamic"]
  for name in ("ar", "dynamic"):
    assert results[True]["decoders"][name]["metrics"] == results[False]["decoders"][name]["metrics"]
    assert [r["answer"] for r in _log(tmp_path / "True", name)] == [r["answer"] for r in _log(tmp_path / "False", name)]
