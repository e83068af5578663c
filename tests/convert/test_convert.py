"""Conversion of every layout of spec §8, export back to the Hub layout, and loading onto a mesh."""

from __future__ import annotations

import json
import os
import weakref

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from checkpoints_convert import convert, export, orbax_stream, safetensors_reader
from dvl_jax.checkpoints.loading import load
from dvl_jax.parallel import rules
from dvl_jax.parallel.mesh import make_mesh
from tests.convert.tiny_layouts import (SIDE_FILES, expected_params, hub_state, loaded_params, tiny, write_hub,
                                    write_released, write_training, write_transformers)

LAYOUTS = {
    "hub": write_hub,
    "hub-sharded": lambda path, t: write_hub(path, t, max_shard_size="100KB"),
    "transformers": write_transformers,
    "diffusionvl-train": write_training,
    "diffusionvl": write_released,
}


def test_every_layout_converts_to_the_expected_params(tiny_model, tmp_path):
  expected = expected_params(tiny_model)
  for name, write in LAYOUTS.items():
    src = write(str(tmp_path / name), tiny_model)
    got = loaded_params(convert(src, str(tmp_path / f"{name}.dvl"), progress=False))
    assert sorted(got) == sorted(expected), name
    for key, value in expected.items():
      assert got[key].dtype == np.float32, (name, key)
      np.testing.assert_array_equal(got[key], value, err_msg=f"{name}: {key}")


def test_output_directory_holds_config_params_and_side_files(tmp_path):
  t = tiny(tied=False)
  dst = convert(write_training(str(tmp_path / "src"), t), str(tmp_path / "dst"), progress=False)
  names = set(os.listdir(dst))
  assert {"config.json", "params", "hf_config.json", "vision_config.json", *SIDE_FILES} <= names
  assert not any(n.endswith(".safetensors") for n in names)
  with open(os.path.join(dst, "hf_config.json")) as f:
    assert json.load(f)["model_type"] == "diffusionvl_qwenvl"
  with open(os.path.join(dst, "tokenizer.json")) as f:
    assert f.read() == SIDE_FILES["tokenizer.json"]
  assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporary dirs left


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_sources_and_round_trip(tmp_path, half):
  t = tiny(tied=False)
  src = write_hub(str(tmp_path / "src"), t, dtype=half)
  source = load_file(os.path.join(src, "model.safetensors"))
  name = str(half).removeprefix("torch.")
  widened = loaded_params(convert(src, str(tmp_path / "f32"), progress=False))  # default: float32
  assert widened["text.embed_tokens.embedding"].dtype == np.float32
  np.testing.assert_array_equal(widened["text.embed_tokens.embedding"],
                                source["model.embed_tokens.weight"].astype(np.float32))
  kept = convert(src, str(tmp_path / "half"), dtype=name, progress=False)
  assert loaded_params(kept)["text.layers.mlp.up_proj.kernel"].dtype == np.dtype(name)
  for ckpt in (str(tmp_path / "f32"), kept):  # float32 storage is exact, so both round-trip bit for bit
    out = export(ckpt, ckpt + ".hf", dtype=name, progress=False)
    exported = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(exported) == sorted(source)
    for key, value in source.items():
      assert exported[key].dtype == value.dtype and exported[key].view(np.uint8).tobytes() == value.view(
          np.uint8).tobytes(), key


def test_round_trip_loads_in_transformers(tiny_model, tmp_path):
  src = write_hub(str(tmp_path / "src"), tiny_model)
  dst = convert(src, str(tmp_path / "dvl"), progress=False)
  out = export(dst, str(tmp_path / "hf"), progress=False, max_shard_bytes=200_000)
  files = sorted(os.listdir(out))
  assert "model.safetensors.index.json" in files and any(f.startswith("model-00002-of-") for f in files)
  assert not tiny_model.tied or not any("lm_head" in k for f in files if f.endswith(".safetensors")
                                        for k in load_file(os.path.join(out, f)))
  assert {*SIDE_FILES, "generation_config.json"} <= set(files) and "hf_config.json" not in files
  reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
  original = tiny_model.model.state_dict()
  reloaded_state = reloaded.state_dict()
  assert sorted(reloaded_state) == sorted(original)
  for key, value in original.items():
    assert reloaded_state[key].dtype == value.dtype and torch.equal(reloaded_state[key], value), key
  exported = {}
  for f in files:
    if f.endswith(".safetensors"):
      exported.update(load_file(os.path.join(out, f)))
  source = {k: v.numpy() for k, v in hub_state(tiny_model).items()}
  assert sorted(exported) == sorted(source)
  assert all(np.array_equal(exported[k], v) and exported[k].dtype == v.dtype for k, v in source.items())


def test_load_places_params_on_their_shardings(tmp_path):
  t = tiny(tied=False)
  dst = convert(write_transformers(str(tmp_path / "src"), t), str(tmp_path / "dvl"), progress=False)
  mesh = make_mesh((1, 4, 2))
  model = load(dst, mesh)
  expected = expected_params(t)
  kernel = model.text.layers.mlp.up_proj.kernel
  want = rules.partition_spec(kernel.get_metadata()["axes"], kernel.shape, mesh)
  assert kernel[...].sharding.spec == want and len(kernel[...].sharding.device_set) == 8
  assert want != jax.sharding.PartitionSpec()  # really sharded
  np.testing.assert_array_equal(np.asarray(kernel[...]), expected["text.layers.mlp.up_proj.kernel"])
  bf16 = loaded_params(dst, dtype="bfloat16")
  np.testing.assert_array_equal(bf16["lm_head.kernel"], expected["lm_head.kernel"].astype(ml_dtypes.bfloat16))


def test_tied_checkpoint_may_carry_an_equal_lm_head(tmp_path):
  t = tiny(tied=True)
  assert torch.equal(t.state["lm_head.weight"], t.state["model.language_model.embed_tokens.weight"])
  got = loaded_params(convert(write_transformers(str(tmp_path / "src"), t), str(tmp_path / "dvl"), progress=False))
  assert "lm_head.kernel" not in got


def test_streaming_holds_one_tensor_at_a_time(tmp_path, monkeypatch):
  """Every array read from the source (or the Orbax checkpoint) is freed before the next one is read."""
  t = tiny(tied=False)
  src = write_released(str(tmp_path / "src"), t)
  live, peak = [0], [0]

  def tracked(read):
    def wrapper(*args):
      x = read(*args)
      live[0] += 1
      peak[0] = max(peak[0], live[0])
      weakref.finalize(x, lambda: live.__setitem__(0, live[0] - 1))
      return x

    return wrapper

  monkeypatch.setattr(safetensors_reader, "read", tracked(safetensors_reader.read))
  monkeypatch.setattr(orbax_stream.CheckpointArrays, "read", tracked(orbax_stream.CheckpointArrays.read))
  dst = convert(src, str(tmp_path / "dvl"), progress=False)
  assert peak[0] == 1
  export(dst, str(tmp_path / "hf"), progress=False)
  assert peak[0] == 1
