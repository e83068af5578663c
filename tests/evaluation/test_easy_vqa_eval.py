"""`dvl eval` end to end on a slice of the bundled easy-VQA test split with a tiny random model, the AR decoder
and a threshold sweep: the rows, the sample logs, the scores and the plot's points agree with each other and
with the task's own scoring (a random model scores about 0, so the bookkeeping is what can go wrong)."""

from __future__ import annotations

import json
import os

from dvl_jax.cli.commands import main
from dvl_jax.evaluation import get_task, runner
from dvl_jax.evaluation.easy_vqa import POST_PROMPT
from dvl_jax.evaluation.pareto import PLOT_FILE

LIMIT, GEN = 4, 16


def test_easy_vqa_slice_with_a_threshold_sweep(eval_checkpoint, pixel_args, tmp_path):
  out = tmp_path / "out"
  assert main(["eval", "--checkpoint", eval_checkpoint, "--task", "easy_vqa", "--limit", str(LIMIT),
               "--batch-size", str(LIMIT), "--gen-length", str(GEN), "--decoders", "ar",
               "--sweep-threshold", "0.5,0.9", "--out", str(out), "--log-samples", *pixel_args, "--no-progress"]) == 0
  with open(out / runner.RESULTS_FILE, encoding="utf-8") as f:
    results = json.load(f)
  task = get_task("easy_vqa")
  samples = list(task.load("test"))[:LIMIT]
  rows = results["decoders"]
  assert list(rows) == ["ar", "threshold@0.5", "threshold@0.9"] and results["samples"] == LIMIT
  assert [r["config"]["remasking_strategy"] for r in rows.values()][1:] == ["threshold", "threshold"]
  assert [r["config"]["confidence_threshold"] for r in rows.values()][1:] == [0.5, 0.9]
  for name, r in rows.items():
    with open(runner.samples_log(str(out), name), encoding="utf-8") as f:
      log = [json.loads(line) for line in f]
    assert [row["id"] for row in log] == ["test-0", "test-1", "test-2", "test-3"]
    assert all(row["prompt"].count(s.question + POST_PROMPT) == 1 for row, s in zip(log, samples))
    assert [row["score"] for row in log] == [task.score(s, row["answer"]).score for row, s in zip(log, samples)]
    assert all(row["tokens"] <= GEN and row["nfe"] >= 1 for row in log)
    assert r["metrics"] == task.aggregate(samples, [row["score"] for row in log])
    assert r["speed"] == runner.speed(log)
  assert os.path.getsize(out / PLOT_FILE) > 0 and results["plot"]["file"] == PLOT_FILE
  assert [(p["decoder"], p["tokens_per_s"], p["accuracy"]) for p in results["plot"]["points"]] == [
      (name, r["speed"]["tokens_per_s"], r["metrics"]["exact_match"]) for name, r in rows.items()]
