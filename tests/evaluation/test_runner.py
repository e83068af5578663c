"""`dvl eval` end to end on the synthetic task with a tiny random model: a random model scores about 0, so the
tests check the structure and the bookkeeping (results, sample logs, resume, the CLI's errors)."""

from __future__ import annotations

import json
import os

import pytest

from dvl_jax.cli import eval as eval_cli
from dvl_jax.cli.commands import main
from dvl_jax.evaluation import get_task, runner

LIMIT, GEN = 6, 16
PIXELS = 56 * 56


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
  from dvl_jax.data import synthetic
  from dvl_jax.demos.train_demo import VOCAB_SIZE, demo_model_config, init_checkpoint
  from dvl_jax.data.word_tokenizer import word_tokenizer

  cfg = demo_model_config(VOCAB_SIZE)
  return init_checkpoint(str(tmp_path_factory.mktemp("ckpt")), cfg, word_tokenizer(synthetic.corpus(), cfg))


@pytest.fixture(scope="module")
def loaded(checkpoint):
  import dvl_jax as dvl

  return dvl.load(checkpoint), dvl.Processor.from_pretrained(checkpoint, min_pixels=PIXELS, max_pixels=PIXELS)


def _evaluate(loaded, out_dir, **kw):
  model, processor = loaded
  return runner.evaluate(model, processor, "synthetic", limit=LIMIT, batch_size=4, gen_length=GEN,
                         out_dir=str(out_dir), log_samples=True, progress=False, **kw)


def _log(out_dir, decoder: str) -> list[dict]:
  with open(runner.samples_log(str(out_dir), decoder), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_every_decoder_is_scored_and_logged(loaded, tmp_path, capsys):
  results = _evaluate(loaded, tmp_path)
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


def test_resume_skips_logged_samples(loaded, tmp_path, monkeypatch):
  _evaluate(loaded, tmp_path, decoders=("static",))
  rows = _log(tmp_path, "static")
  os.remove(tmp_path / runner.RESULTS_FILE)
  with open(runner.samples_log(str(tmp_path), "static"), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows[:2])
    f.write('{"id": "cut short')  # a crash mid-line: that sample runs again
  generated, real = [], runner.generate
  monkeypatch.setattr(runner, "generate", lambda model, inputs, *a, **kw: generated.append(len(inputs["input_ids"]))
                      or real(model, inputs, *a, **kw))
  results = _evaluate(loaded, tmp_path, decoders=("static",), resume=True)
  assert generated == [4, 4]  # warm-up and one batch of the 4 samples not logged
  resumed = _log(tmp_path, "static")
  assert [row["id"] for row in resumed] == [row["id"] for row in rows]
  assert [row["answer"] for row in resumed] == [row["answer"] for row in rows]  # greedy: the same answers
  assert (tmp_path / runner.RESULTS_FILE).exists() and results["decoders"]["static"]["metrics"]["exact_match"] == (
      sum(row["score"] for row in rows) / LIMIT)


def test_cli_runs_writes_results_and_resumes(checkpoint, tmp_path, monkeypatch):
  out = tmp_path / "out"
  argv = ["eval", "--checkpoint", checkpoint, "--task", "synthetic", "--limit", "4", "--batch-size", "4",
          "--decoders", "ar,threshold", "--gen-length", str(GEN), "--out", str(out), "--log-samples",
          "--min-pixels", str(PIXELS), "--max-pixels", str(PIXELS), "--no-progress"]
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
    (["--task", "synthetic", "--limit", "0"], "--limit and --batch-size must be >= 1"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, message):
  assert main(["eval", "--checkpoint", str(tmp_path), *args]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("dvl eval: error: ") and message in err


def test_cli_decoders_match_the_runner():
  assert eval_cli.DECODERS.split(",") == list(runner.DECODERS)
