"""Per-layer models (`scan_layers=False`) store, load and export the stacked layout of the scanned ones: one
checkpoint serves both, and a per-layer load frees each stack once it is sliced."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import dvl_jax as dvl
from dvl_jax.checkpoints import saving
from dvl_jax.models import layer_layout
from dvl_jax.testing.tiny import tiny_config, tiny_model, tiny_siglip_config

FAMILIES = {"qwen2_5_vl": tiny_config(), "diffusionvl_qwen": tiny_siglip_config()}


def flat(model) -> dict:
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_per_layer_model_saves_loads_and_exports_as_the_stacked_one(family, tmp_path):
  cfg = FAMILIES[family]
  stacked, per_layer = tiny_model(cfg, seed=3), tiny_model(cfg.replace(scan_layers=False), seed=3)
  lists = [m for _, m in nnx.iter_graph(per_layer) if isinstance(m, nnx.List)]
  assert len(lists) == 2 and all(len(m) > 1 for m in lists)  # the decoder's and the vision tower's layers
  saving.save(stacked, str(tmp_path / "stacked"))
  saving.save(per_layer, str(tmp_path / "per_layer"))

  want = flat(stacked)
  for src in ("stacked", "per_layer"):
    back = dvl.load(str(tmp_path / src), scan_layers=True)
    got = flat(back)
    assert got.keys() == want.keys()
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=f"{src}: {name}")
  unrolled = flat(dvl.load(str(tmp_path / "stacked"), scan_layers=False))
  assert unrolled.keys() == flat(per_layer).keys()
  for name, value in flat(per_layer).items():
    np.testing.assert_array_equal(unrolled[name], value, err_msg=name)

  exported = [load_file(f) for src in ("stacked", "per_layer")
              for f in sorted(glob.glob(os.path.join(dvl.export(str(tmp_path / src), str(tmp_path / f"hf_{src}"),
                                                                    progress=False), "*.safetensors")))]
  a, b = exported[:len(exported) // 2], exported[len(exported) // 2:]
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for name in x:
      np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def test_per_layer_frees_each_stack_it_slices():
  cfg = tiny_config()
  stored = jax.tree.map(jnp.copy, layer_layout.stacked(nnx.state(tiny_model(cfg), nnx.Param), cfg))
  sources = {p: v.get_value() for p, v in nnx.to_flat_state(stored)}
  like = nnx.state(tiny_model(cfg.replace(scan_layers=False)), nnx.Param)
  out = dict(nnx.to_flat_state(layer_layout.per_layer(stored, like)))
  layered = [p for p in sources if p not in out]  # stacks, now held as one array per layer
  assert layered and all(sources[p].is_deleted() for p in layered)
  assert not any(sources[p].is_deleted() for p in sources if p in out)  # unstacked params are passed through
  row = ("text", "layers", 1, "mlp", "up_proj", "kernel")
  assert out[row].get_metadata()["axes"] == ("embed", "mlp")


def test_a_model_of_another_config_is_refused_in_one_line():
  cfg = tiny_config()
  stored = layer_layout.stacked(nnx.state(tiny_model(cfg), nnx.Param), cfg)
  like = nnx.state(tiny_model(tiny_siglip_config().replace(scan_layers=False)), nnx.Param)
  with pytest.raises(KeyError, match="no place in the stored layout"):
    layer_layout.per_layer(stored, like)


def test_load_refuses_a_mesh_or_dtype_it_cannot_use(tmp_path):
  """A mesh spec string (as `dvl generate --mesh` takes) would otherwise fail deep inside, an integer dtype load
  integer weights, and float16 turn weights past its range into inf."""
  saving.save(tiny_model(tiny_config()), str(tmp_path / "ckpt"))
  with pytest.raises(TypeError, match=r"mesh must be a jax.sharding.Mesh, e.g. dvl.make_mesh\(\(1, 2, 4\)\).*got str"):
    dvl.load(str(tmp_path / "ckpt"), mesh="1,1,1")
  with pytest.raises(ValueError, match="param_dtype='int8' is not a floating-point dtype"):
    dvl.load(str(tmp_path / "ckpt"), dtype="int8")
  assert dvl.load(str(tmp_path / "ckpt"), dtype="bfloat16").config.param_dtype == "bfloat16"
  big = tiny_model(tiny_config())
  big.text.norm.scale[...] = big.text.norm.scale[...].at[0].set(7e4)  # past float16's 65,504
  saving.save(big, str(tmp_path / "big"))
  with pytest.raises(ValueError, match=r"big: text.norm.scale overflows float16 .* load it in bfloat16 or float32"):
    dvl.load(str(tmp_path / "big"), dtype="float16")
  assert dvl.load(str(tmp_path / "big"), dtype="bfloat16").text.norm.scale[0] == 7e4
