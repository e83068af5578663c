"""Bad inputs give one clear error (listing every problem at once) and never leave an output behind."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from checkpoints_convert import (ConversionError, CorruptCheckpointError, DestinationExistsError,
                                 NotACheckpointError, OutputIsInputError, UnknownLayoutError, WeightsMismatchError,
                                 convert, export, safetensors_reader)
from dvl_jax.cli.commands import main
from tests.convert.tiny_layouts import hub_state, tiny, write_side_files


@pytest.fixture(scope="module")
def model():
  return tiny(tied=False)


def _write(path, t, state):
  write_side_files(str(path), t.cfg.to_hf())
  save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  return str(path)


def _nothing_left(parent, name="dst"):
  return not any(n == name or n.startswith(f".{name}.tmp-") for n in os.listdir(parent))


def test_every_key_problem_is_listed_at_once(model, tmp_path):
  state = hub_state(model)
  del state["model.layers.1.mlp.up_proj.weight"], state["visual.merger.ln_q.weight"]
  state["visual.blocks.0.attn.qkv.bias"] = torch.zeros(7)
  state["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)
  state["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2)
  state["something.else"] = torch.zeros(1)
  state["model.norm.weight"] = torch.zeros(64, dtype=torch.int32)
  with pytest.raises(WeightsMismatchError) as e:
    convert(_write(tmp_path / "src", model, state), str(tmp_path / "dst"), progress=False)
  err = e.value
  assert err.missing == ["visual.merger.ln_q.weight", "model.layers.1.mlp.up_proj.weight"]
  assert sorted(err.unexpected) == ["model.layers.9.mlp.up_proj.weight", "something.else"]
  assert len(err.mismatched) == 3 and "[7] in the checkpoint, [96] from config.json" in err.mismatched[0]
  assert "not a floating-point type" in err.mismatched[2]
  headline = str(err).splitlines()[0]
  assert "do not match config.json (2 missing, 2 unexpected, 3 mismatched)" in headline
  assert len(str(err).splitlines()) == 8
  assert _nothing_left(tmp_path)


def test_config_that_does_not_match_the_weights(model, tmp_path):
  src = _write(tmp_path / "src", model, hub_state(model))
  hf = model.cfg.to_hf()
  hf["text_config"]["hidden_size"] = 128
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump(hf, f)
  with pytest.raises(WeightsMismatchError, match="do not match config.json") as e:
    convert(src, str(tmp_path / "dst"), progress=False)
  assert "model.embed_tokens.weight: [256, 64] in the checkpoint, [256, 128] from config.json" in e.value.mismatched
  assert _nothing_left(tmp_path)


def test_tied_lm_head_that_differs_from_the_embedding(tmp_path):
  t = tiny(tied=True)
  state = hub_state(t)
  state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1
  with pytest.raises(WeightsMismatchError, match="differs from the token embedding"):
    convert(_write(tmp_path / "src", t, state), str(tmp_path / "dst"), progress=False)


@pytest.mark.parametrize("cut", ["data", "header"])
def test_truncated_file(model, tmp_path, cut):
  src = _write(tmp_path / "src", model, hub_state(model))
  path = os.path.join(src, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100 if cut == "data" else 50)
  with pytest.raises(CorruptCheckpointError, match="truncated"):
    convert(src, str(tmp_path / "dst"), progress=False)
  assert _nothing_left(tmp_path)


def test_corrupt_header(model, tmp_path):
  src = _write(tmp_path / "src", model, hub_state(model))
  path = os.path.join(src, "model.safetensors")
  with open(path, "r+b") as f:
    f.seek(9)
    f.write(b"\xff\xfe")
  with pytest.raises(CorruptCheckpointError, match="corrupt safetensors header"):
    convert(src, str(tmp_path / "dst"), progress=False)


def test_not_a_checkpoint(model, tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(NotACheckpointError, match="no config.json"):
    convert(str(tmp_path / "empty"), str(tmp_path / "dst"), progress=False)
  with pytest.raises(NotACheckpointError, match="is not a directory"):
    convert(str(tmp_path / "nowhere"), str(tmp_path / "dst"), progress=False)
  write_side_files(str(tmp_path / "noweights"), model.cfg.to_hf())
  with pytest.raises(NotACheckpointError, match=r"no \*.safetensors files"):
    convert(str(tmp_path / "noweights"), str(tmp_path / "dst"), progress=False)
  with pytest.raises(NotACheckpointError, match="not a converted checkpoint"):
    export(str(tmp_path / "noweights"), str(tmp_path / "dst"), progress=False)
  assert _nothing_left(tmp_path)


def test_unknown_layout(model, tmp_path):
  state = {k.replace("visual.", "encoder.").replace("model.", "decoder."): v for k, v in hub_state(model).items()}
  with pytest.raises(UnknownLayoutError) as e:
    convert(_write(tmp_path / "src", model, state), str(tmp_path / "dst"), progress=False)
  message = str(e.value)
  assert "\n" not in message and "'decoder.layers'" in message and "'encoder.blocks'" in message
  assert "hub (visual.*)" in message and "diffusionvl-train" in message


def test_bad_config_and_dtype(model, tmp_path):
  src = _write(tmp_path / "src", model, hub_state(model))
  with pytest.raises(ConversionError, match="not a floating-point dtype"):
    convert(src, str(tmp_path / "dst"), dtype="int8", progress=False)
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump({"model_type": "llama"}, f)
  with pytest.raises(ConversionError, match="model_type='llama'"):
    convert(src, str(tmp_path / "dst"), progress=False)
  assert _nothing_left(tmp_path)


def test_weights_past_float16s_range_are_refused_not_turned_into_inf(model, tmp_path):
  state = hub_state(model)
  state["model.norm.weight"] = state["model.norm.weight"].clone()
  state["model.norm.weight"][3] = 7e4  # float16 tops out at 65,504
  src = _write(tmp_path / "src", model, state)
  with pytest.raises(ConversionError, match=r"norm.weight: values up to 70000 overflow float16 \(largest 65504\)"):
    convert(src, str(tmp_path / "dst"), dtype="float16", progress=False)
  assert _nothing_left(tmp_path)
  dst = convert(src, str(tmp_path / "dst"), dtype="bfloat16", progress=False)  # bfloat16 has float32's range
  with pytest.raises(ConversionError, match="values up to 70"):
    export(dst, str(tmp_path / "hf"), dtype="float16", progress=False)
  assert _nothing_left(tmp_path, "hf")


def test_existing_destination_needs_overwrite(model, tmp_path):
  src = _write(tmp_path / "src", model, hub_state(model))
  (tmp_path / "dst").mkdir()
  (tmp_path / "dst" / "old.txt").write_text("old")
  with pytest.raises(DestinationExistsError, match="overwrite=True"):
    convert(src, str(tmp_path / "dst"), progress=False)
  assert os.listdir(tmp_path / "dst") == ["old.txt"]
  convert(src, str(tmp_path / "dst"), progress=False, overwrite=True)
  assert "params" in os.listdir(tmp_path / "dst") and "old.txt" not in os.listdir(tmp_path / "dst")
  assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_an_output_that_is_or_holds_the_input_is_refused_even_with_overwrite(model, tmp_path):
  src = _write(tmp_path / "hub" / "src", model, hub_state(model))
  before = sorted(os.listdir(src))
  os.symlink(src, tmp_path / "link")
  for dst in (src, str(tmp_path / "hub"), str(tmp_path / "link")):
    for overwrite in (False, True):
      with pytest.raises(OutputIsInputError, match="the input .*another directory"):
        convert(src, dst, progress=False, overwrite=overwrite)
  assert sorted(os.listdir(src)) == before and os.listdir(tmp_path / "hub") == ["src"]
  dst = convert(src, str(tmp_path / "dst"), progress=False)
  with pytest.raises(OutputIsInputError, match=f"the output {dst} is the input"):
    export(dst, dst, progress=False, overwrite=True)
  assert "params" in os.listdir(dst)


def test_interrupted_conversion_leaves_nothing(model, tmp_path, monkeypatch):
  src = _write(tmp_path / "src", model, hub_state(model))
  real_read, calls = safetensors_reader.read, []

  def failing_read(ref, *args):
    calls.append(ref.name)
    if len(calls) == 20:
      raise RuntimeError("disk on fire")
    return real_read(ref, *args)

  monkeypatch.setattr(safetensors_reader, "read", failing_read)
  with pytest.raises(RuntimeError, match="disk on fire"):
    convert(src, str(tmp_path / "dst"), progress=False)
  assert len(calls) == 20 and _nothing_left(tmp_path)
  monkeypatch.setattr(safetensors_reader, "read", real_read)
  dst = convert(src, str(tmp_path / "dst"), progress=False)

  def failing_write(*args):
    raise RuntimeError("disk full")

  monkeypatch.setattr("checkpoints_convert.to_hf.write_checkpoint", failing_write)
  with pytest.raises(RuntimeError, match="disk full"):
    export(dst, str(tmp_path / "hf"), progress=False)
  assert _nothing_left(tmp_path, "hf")


def test_cli_prints_one_line_errors(model, tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  assert main(["convert", str(tmp_path / "empty"), str(tmp_path / "dst"), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("dvl convert: error: ") and err.count("\n") == 1 and "no config.json" in err
  src = _write(tmp_path / "src", model, hub_state(model))
  assert main(["convert", src, str(tmp_path / "dst"), "--no-progress", "--dtype", "bfloat16"]) == 0
  assert main(["export", str(tmp_path / "dst"), str(tmp_path / "hf"), "--no-progress"]) == 0
  assert "model.safetensors" in os.listdir(tmp_path / "hf")
