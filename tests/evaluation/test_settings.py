"""`EvalSettings`: the one place `dvl eval` and `dvl.evaluate` check a run's arguments, and the resume check
that refuses logs written under other settings (no model needed: the checks run before any weights load)."""

from __future__ import annotations

import json
import os

import pytest

from dvl_jax.cli.commands import main
from dvl_jax.evaluation.settings import RUN_FILE, EvalSettings, parse_floats, samples_log, sweep_name

LOGGED = dict(task="synthetic", data="5:4", decoders=("ar", "dynamic"), sweep=(0.7,), limit=3, batch_size=2,
              gen_length=16, steps=8, threshold=0.8, model_id="/ckpt/a", log_samples=True)


@pytest.fixture
def logged_run(tmp_path) -> str:
  """An output directory whose run was logged under `LOGGED`."""
  settings = EvalSettings(**LOGGED, out_dir=str(tmp_path))
  settings.write_record()
  for name in settings.configs:
    open(samples_log(str(tmp_path), name), "w").close()
  return str(tmp_path)


def test_rows_are_the_decoders_then_the_swept_thresholds():
  settings = EvalSettings("synthetic", decoders=("ar", "threshold", "ar"), sweep=(0.5, 0.95), threshold=0.8)
  assert list(settings.configs) == ["ar", "threshold", "threshold@0.5", "threshold@0.95"]
  assert [c.confidence_threshold for c in list(settings.configs.values())[1:]] == [0.8, 0.5, 0.95]
  assert {c.remasking_strategy for name, c in settings.configs.items() if name != "ar"} == {"threshold"}
  assert settings.configs["ar"].algorithm == "autoregressive"
  assert EvalSettings("synthetic", decoders=("ar", "threshold"), steps=3).configs == EvalSettings(
      "synthetic", decoders=("ar", "threshold"), steps=5).configs  # neither reads steps
  assert list(EvalSettings("synthetic", decoders=(), sweep=(0.6,)).configs) == [sweep_name(0.6)]
  assert parse_floats(" 0.5, 0.7,", "--sweep-threshold") == (0.5, 0.7)


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="nope"), "unknown task 'nope'; known tasks: mmmu_val"),
    (dict(decoders=("ar", "fast")), "unknown decoder 'fast' (--decoders)"),
    (dict(decoders=()), "no decoder to run"),
    (dict(limit=0), "--limit must be >= 1, got 0"),
    (dict(batch_size=0), "--batch-size must be >= 1, got 0"),
    (dict(steps=0), "--steps must be >= 1, got 0"),
    (dict(threshold=1.0), "--threshold values are confidence thresholds in (0, 1), got 1.0"),
    (dict(sweep=(0.5, 0.0)), "--sweep-threshold values are confidence thresholds in (0, 1), got 0.0"),
    (dict(log_samples=True), "add --out DIR"),
    (dict(resume=True), "add --out DIR"),
])
def test_bad_arguments_are_refused_before_anything_runs(kwargs, message):
  with pytest.raises(ValueError) as error:
    EvalSettings(**{"task": "synthetic", **kwargs})
  assert message in str(error.value) and "\n" not in str(error.value)


def test_an_output_directory_that_cannot_be_written_is_refused_before_anything_runs(tmp_path):
  (tmp_path / "a_file").write_text("")
  with pytest.raises(ValueError, match=r"^--out .*a_file/results: cannot write there \(Not a directory\)"):
    EvalSettings("synthetic", out_dir=str(tmp_path / "a_file" / "results"))
  EvalSettings("synthetic", out_dir=str(tmp_path / "new" / "results"))
  assert os.listdir(tmp_path / "new" / "results") == []  # made, and the probe file gone


def test_resume_under_the_logged_settings_continues(logged_run):
  settings = EvalSettings(**{**LOGGED, "decoders": ("ar", "static")}, out_dir=logged_run, resume=True)
  assert [s.id for s in settings.samples()] == ["synthetic-5-0", "synthetic-5-1", "synthetic-5-2"]
  settings.write_record()  # a new decoder joins the logged ones
  with open(os.path.join(logged_run, RUN_FILE), encoding="utf-8") as f:
    assert list(json.load(f)["decoders"]) == ["ar", "dynamic", "threshold@0.7", "static"]


@pytest.mark.parametrize("change, message", [
    (dict(task="easy_vqa", data=None), "task=synthetic, this one task=easy_vqa; rerun with --task synthetic"),
    (dict(data="5:9"), "data=5:4, this one data=5:9; rerun with --data 5:4"),
    (dict(limit=None), "limit=3, this one limit=None; rerun with --limit 3"),
    (dict(model_id="/ckpt/b"), "model=/ckpt/a, this one model=/ckpt/b; rerun with --checkpoint / --server /ckpt/a"),
    (dict(batch_size=4), "batch_size=2, this one batch_size=4; rerun with --batch-size 2"),
    (dict(gen_length=32), "decoder ar: the logged run has gen_length=16, this one gen_length=32; rerun with "
     "--gen-length 16"),
    (dict(threshold=0.9), "decoder dynamic: the logged run has confidence_threshold=0.8, this one "
     "confidence_threshold=0.9; rerun with --threshold 0.8"),
    (dict(steps=4, decoders=("dynamic",)), "decoder dynamic: the logged run has steps=8, this one steps=4"),
])
def test_resume_under_other_settings_is_refused(logged_run, change, message):
  settings = EvalSettings(**{**LOGGED, **change}, out_dir=logged_run, resume=True)
  with pytest.raises(ValueError) as error:
    settings.samples()
  text = str(error.value)
  assert text.startswith(f"cannot resume {logged_run}: ") and message in text and "\n" not in text
  assert text.endswith("or leave out --resume to start over")


def test_resume_refuses_a_log_the_record_does_not_cover(logged_run):
  open(samples_log(logged_run, "static"), "w").close()
  with pytest.raises(ValueError, match="samples_static.jsonl is not from the run in run.json"):
    EvalSettings(**{**LOGGED, "decoders": ("static",)}, out_dir=logged_run, resume=True).check_resume()
  with pytest.raises(ValueError, match="nothing to resume"):
    EvalSettings("synthetic", out_dir=os.path.join(logged_run, "new"), resume=True).check_resume()


def test_cli_refuses_a_resume_under_other_settings_in_one_line(logged_run, capsys):
  argv = ["eval", "--checkpoint", "/ckpt/a", "--task", "synthetic", "--data", "5:4", "--decoders", "ar,dynamic",
          "--limit", "4", "--batch-size", "2", "--gen-length", "16", "--threshold", "0.8", "--out", logged_run,
          "--resume"]
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "limit=3, this one limit=4; rerun with --limit 3" in err
