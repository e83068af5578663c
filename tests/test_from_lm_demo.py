"""`dvl demo --from-lm --quick`: a text-only Qwen2 LM and a SigLIP tower go through DiffusionVL-Qwen's two stages
by the real commands, each stage trains what the recipe says and hands its output on, and the table comes out.

The demo runs in a subprocess on one CPU device, as a user runs it (conftest's 8 fake devices would shard the tiny
model 8 ways); quick mode is mostly compilation, so it keeps the cheap XLA pipeline (`user_env()`). `check` holds the
assertions so that they can be run on any demo workdir.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import dvl_jax as dvl
from tests.user_process import user_env


def _params(path):
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(dvl.load(path), nnx.Param))}


def _moved(before, after):
  assert sorted(before) == sorted(after)
  return {k for k in before if not np.array_equal(before[k], after[k])}


@pytest.mark.slow  # ~70 s of mostly compiling on 2 idle cores (three training runs, four decoders), 3 min loaded
def test_quick_demo_runs_both_stages_from_a_text_lm_and_a_siglip_tower(tmp_path):
  workdir = str(tmp_path / "demo")
  command = "import sys; from dvl_jax import cli; sys.exit(cli.main(sys.argv[1:]))"
  run = subprocess.run([sys.executable, "-c", command, "demo", "--from-lm", "--quick", "--workdir", workdir],
                       env=user_env(), capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  check(workdir, run.stdout)


def check(workdir, stdout):
  d = {name: os.path.join(workdir, name) for name in ("lm_hf", "siglip", "stage1_start", "stage2_start")}
  d.update({name: os.path.join(workdir, name, "model") for name in ("lm", "stage1", "stage2")})

  # the first demo's table: four decoders, each with an exact match, tokens/s and tokens / forward that parse
  table = stdout[stdout.rindex("| decoder |"):].splitlines()
  assert table[0].startswith("| decoder | exact match | tokens/s | x AR | exact match, short | tokens/forward, short")
  rows = {cells[0]: cells[1:] for cells in (line.strip("| ").split(" | ") for line in table[2:6])}
  assert list(rows) == ["ar", "static", "dynamic", "threshold"], stdout
  assert all(float(r[0].rstrip("%")) >= 0 and float(r[1]) > 0 and float(r[5]) > 0 for r in rows.values()), rows
  with open(os.path.join(workdir, "eval", "short", "results.json")) as f:  # the evaluator's files
    assert list(json.load(f)["decoders"]) == list(rows)

  # the sources are Hugging Face checkpoints: a Qwen2 LM with its tokenizer, a SigLIP tower
  with open(os.path.join(d["lm_hf"], "config.json")) as f:
    assert json.load(f)["model_type"] == "qwen2"
  assert {"model.safetensors", "tokenizer.json"} <= set(os.listdir(d["lm_hf"]))
  with open(os.path.join(d["siglip"], "config.json")) as f:
    assert json.load(f)["model_type"] == "siglip_vision_model"
  # the LM's text pretraining learned something
  with open(os.path.join(workdir, "lm", "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f]
  assert losses[-1] < losses[0], losses

  # stage 1 trained the projector alone (square images, flat); its mm_projector.bin is stage 2's projector
  start1, stage1 = _params(d["stage1_start"]), _params(d["stage1"])
  assert _moved(start1, stage1) == {k for k in start1 if k.startswith("projector/")}
  start2 = _params(d["stage2_start"])
  for k in start1:
    if k.startswith("projector/"):
      np.testing.assert_array_equal(start2[k], stage1[k], err_msg=k)
    elif k in start2:  # the LM and the tower come from the same Hugging Face files
      np.testing.assert_array_equal(start2[k], start1[k], err_msg=k)

  # stage 2 (BD3-LM, anyres) moved the LM, the tower and the projector
  moved = _moved(start2, _params(d["stage2"]))
  for part in ("text/", "lm_head/", "vision_tower/", "projector/", "image_newline"):
    assert any(k.startswith(part) for k in moved), (part, sorted(moved)[:5])
  cfg1, cfg2 = dvl.load(d["stage1"]).config, dvl.load(d["stage2"]).config
  assert (cfg1.family, cfg1.vision.image_aspect_ratio, cfg1.vision.patch_merge_type) == (
      "diffusionvl_qwen", "square", "flat")
  assert (cfg2.vision.image_aspect_ratio, cfg2.vision.patch_merge_type) == ("anyres_max_4", "spatial_unpad")
