"""`dvl eval --server`: the evaluator through `dvl serve`'s OpenAI API gives the in-process evaluator's greedy
answers and token counts sample for sample, and its NFE up to the commits that ran alone while requests shared the
slots (`SamplingConfig.fused_window_share`). The server is the session's tiny one
(`tests/serving/http_server.py`: its model and processor are the in-process side, its compiles are shared with
the HTTP tests)."""

from __future__ import annotations

import json

import pytest

from dvl_jax.cli.commands import main
from dvl_jax.evaluation import client, runner
from dvl_jax.evaluation.settings import EvalSettings
from tests.serving import http_server

served = http_server.served  # the session's server (a fixture)

LIMIT, GEN = 4, 16


def _log(out_dir, decoder: str) -> list[dict]:
  with open(runner.samples_log(str(out_dir), decoder), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_server_answers_equal_in_process_answers(served, tmp_path):
  """In process one sample at a time (the programs the HTTP tests compiled), through the server all at once."""
  run = dict(task="synthetic", limit=LIMIT, gen_length=GEN, decoders=("ar", "dynamic"), log_samples=True)
  local = runner.evaluate(served.model, served.processor, out_dir=str(tmp_path / "local"), batch_size=1,
                          progress=False, **run)
  remote = runner.run(client.Server(served.url, api_key=http_server.KEY),
                      EvalSettings(out_dir=str(tmp_path / "remote"), batch_size=LIMIT, model_id=served.url, **run),
                      progress=False)
  same = ("id", "prompt", "answer", "parsed", "score", "tokens")
  blocks = -(-GEN // served.model.config.block_size) + 1  # the prompt's partial block too
  for name in run["decoders"]:
    local_rows, remote_rows = _log(tmp_path / "local", name), _log(tmp_path / "remote", name)
    assert len(remote_rows) == LIMIT and {r["id"] for r in remote_rows} == {r["id"] for r in local_rows}
    by_id = {r["id"]: r for r in remote_rows}  # the server's answers are logged as they finish
    assert [{k: by_id[r["id"]][k] for k in same} for r in local_rows] == [{k: r[k] for k in same} for r in local_rows]
    extra = [by_id[r["id"]]["nfe"] - r["nfe"] for r in local_rows]  # commits that ran alone (AR: none)
    assert all(0 <= n <= (0 if name == "ar" else blocks) for n in extra), extra
    assert remote["decoders"][name]["metrics"] == local["decoders"][name]["metrics"]
  # the two decoders differ here, so equal rows per decoder say the server ran the decoder the request named
  assert local["decoders"]["dynamic"]["speed"]["nfe"] != local["decoders"]["ar"]["speed"]["nfe"]


def test_cli_through_the_server(served, tmp_path, capsys):
  argv = ["eval", "--server", served.url, "--task", "synthetic", "--limit", "2", "--batch-size", "2",
          "--decoders", "", "--sweep-threshold", "0.6", "--gen-length", str(GEN), "--out", str(tmp_path),
          "--no-progress"]
  assert main([*argv, "--api-key", http_server.KEY]) == 0
  with open(tmp_path / runner.RESULTS_FILE, encoding="utf-8") as f:
    assert list(json.load(f)["decoders"]) == ["threshold@0.6"]
  assert main(argv) == 2  # no key: the server's 401, in one line
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "answered GET /v1/models with 401: missing or wrong API key" in err


@pytest.mark.parametrize("args, message", [
    ([], "no answer from the server at http://127.0.0.1:9"),
    (["--max-pixels", "3136"], "with --server the server's bounds apply"),
])
def test_cli_server_mistakes_are_one_line(capsys, args, message):
  assert main(["eval", "--server", "http://127.0.0.1:9", "--task", "synthetic", "--limit", "1", *args]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err
