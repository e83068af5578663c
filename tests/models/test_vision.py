"""Vision tower: window layout vectors (spec §12) and parity with transformers 4.55 PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dvl_jax.testing.tiny import tiny_config
from dvl_jax.data.sharded_layout import sharded_vision_layout
from dvl_jax.models.qwen25vl.vision import VisionTower
from dvl_jax.models.layers import unstack
from dvl_jax.core.vision_layout import aligned_chunks, num_patches, patch_rows, tokens_per_image, vision_layout
from dvl_jax.data import qwen_images
from dvl_jax.parallel.mesh import make_mesh

from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

CFG = tiny_config()
V = CFG.vision
GRIDS = {
    "square": [[1, 4, 4]],
    "mixed": [[1, 12, 20], [1, 16, 8], [1, 8, 8]],
}


def cu_seqlens(segments: np.ndarray) -> list[int]:
  """HF-style cumulative boundaries of the runs of equal segment ids (real rows only)."""
  segments = segments[segments > 0]
  change = np.flatnonzero(np.diff(segments)) + 1
  return [0, *change.tolist(), len(segments)]


# ---- layout (spec §12) ---------------------------------------------------------------------------

def test_patch_order_single_window():
  lay = vision_layout(np.array([[1, 4, 4]]), V)
  expected = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3),
              (2, 0), (2, 1), (3, 0), (3, 1), (2, 2), (2, 3), (3, 2), (3, 3)]
  np.testing.assert_array_equal(lay.window_index, [0, 1, 2, 3])
  np.testing.assert_array_equal(lay.hw, expected)


def test_window_index_wide_image():
  lay = vision_layout(np.array([[1, 4, 12]]), V)
  np.testing.assert_array_equal(lay.window_index, [0, 1, 2, 3, 6, 7, 8, 9, 4, 5, 10, 11])
  assert cu_seqlens(lay.window_segments) == [0, 32, 48]
  np.testing.assert_array_equal(lay.reverse_index, np.argsort(lay.window_index))


def test_window_index_two_images():
  grid = np.array([[1, 8, 8], [1, 4, 4]])
  lay = vision_layout(grid, V)
  np.testing.assert_array_equal(lay.window_index, np.arange(20))
  assert cu_seqlens(lay.window_segments) == [0, 64, 80]
  assert cu_seqlens(lay.image_segments) == [0, 64, 80]
  assert num_patches(grid) == 80
  np.testing.assert_array_equal(tokens_per_image(grid, V), [16, 4])


@pytest.mark.parametrize("grid", [GRIDS["mixed"], [[2, 6, 10], [1, 18, 4]], [[3, 8, 16]]])
def test_layout_matches_hf(grid, hf_tower):
  """Window index, window/frame boundaries and rotary coordinates equal HF's, videos included."""
  grid_t = torch.tensor(grid)
  lay = vision_layout(np.array(grid), V)
  index, cu_window = hf_tower.get_window_index(grid_t)
  np.testing.assert_array_equal(lay.window_index, index.numpy())
  assert cu_seqlens(lay.window_segments) == torch.unique_consecutive(torch.tensor(cu_window)).tolist()
  frames = torch.repeat_interleave(grid_t[:, 1] * grid_t[:, 2], grid_t[:, 0]).cumsum(0)
  assert cu_seqlens(lay.image_segments) == [0, *frames.tolist()]
  # HF's angle table row for patch i is concat(h * inv_freq, w * inv_freq): recover (h, w).
  angles = hf_tower.rot_pos_emb(grid_t).reshape(-1, 4, V.head_dim // 2)[index].reshape(-1, V.head_dim // 2)
  hw = torch.stack([angles[:, 0], angles[:, V.head_dim // 4]], dim=-1).round().int().numpy()
  np.testing.assert_array_equal(lay.hw, hw)


def test_padding_layout():
  lay = vision_layout(np.array([[1, 4, 12]]), V, pad_patches=64)
  assert lay.window_index.shape == (16,) and lay.window_segments.shape == (64,)
  np.testing.assert_array_equal(lay.window_index[12:], np.arange(12, 16))
  assert (lay.window_segments[48:] == 0).all() and (lay.image_segments[48:] == 0).all()
  with pytest.raises(ValueError, match="pad_patches"):
    vision_layout(np.array([[1, 4, 12]]), V, pad_patches=46)


# ---- parity with transformers --------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_tower():
  hf_cfg = Qwen2_5_VLVisionConfig(
      depth=V.depth, hidden_size=V.hidden_size, hidden_act="silu", intermediate_size=V.intermediate_size,
      num_heads=V.num_heads, in_channels=V.in_channels, patch_size=V.patch_size,
      spatial_merge_size=V.spatial_merge_size, temporal_patch_size=V.temporal_patch_size,
      window_size=V.window_size, out_hidden_size=V.out_hidden_size,
      fullatt_block_indexes=list(V.fullatt_block_indexes))
  hf_cfg._attn_implementation = "eager"
  torch.manual_seed(0)
  model = Qwen2_5_VisionTransformerPretrainedModel(hf_cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("ln_q.weight"):
        p.copy_(1.0 + 0.5 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))
      else:
        fan_in = p[0].numel()
        p.copy_(0.5 * torch.randn_like(p) / fan_in**0.5)  # keeps |h| ~ 1
  return model


def load_hf_weights(model: VisionTower, hf_model: torch.nn.Module) -> None:
  """Copies torch weights into the NNX tower (kernels transposed, per-block params stacked)."""
  sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  hidden = V.hidden_size
  want = {("patch_embed", "kernel"): sd["patch_embed.proj.weight"].reshape(hidden, -1).T,
          ("merger", "ln_q", "scale"): sd["merger.ln_q.weight"]}
  for ours, theirs in (("mlp_in", "mlp.0"), ("mlp_out", "mlp.2")):
    want["merger", ours, "kernel"] = sd[f"merger.{theirs}.weight"].T
    want["merger", ours, "bias"] = sd[f"merger.{theirs}.bias"]

  def stacked(name):
    return np.stack([sd[f"blocks.{i}.{name}"] for i in range(V.depth)])

  for norm in ("norm1", "norm2"):
    want["blocks", norm, "scale"] = stacked(f"{norm}.weight")
  for path in ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
    want[("blocks", *path.split("."), "kernel")] = stacked(f"{path}.weight").transpose(0, 2, 1)
    want[("blocks", *path.split("."), "bias")] = stacked(f"{path}.bias")
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  assert set(flat) == set(want)
  for path, var in flat.items():
    assert var.get_value().shape == want[path].shape, path
    var.set_value(jnp.asarray(want[path]))
  nnx.update(model, state)


@pytest.fixture(scope="module")
def tower(hf_tower):
  model = VisionTower(CFG, rngs=nnx.Rngs(0))
  load_hf_weights(model, hf_tower)
  return model


def pixels(grid, seed=0):
  return np.random.default_rng(seed).standard_normal((num_patches(np.array(grid)), V.patch_dim), np.float32)


def hf_forward(hf_model, px, grid):
  """HF merged output and the merger's input (pre-merger hidden states, window order)."""
  captured = {}
  hook = hf_model.merger.register_forward_pre_hook(lambda mod, args: captured.update(h=args[0]))
  with torch.no_grad():
    out = hf_model(torch.from_numpy(px), torch.tensor(grid))
  hook.remove()
  return out.numpy(), captured["h"].numpy()


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_parity_with_hf(name, tower, hf_tower):
  grid = GRIDS[name]
  px = pixels(grid)
  ref_out, ref_hidden = hf_forward(hf_tower, px, grid)
  lay = vision_layout(np.array(grid), V)
  hidden = np.asarray(tower.encode_patches(px, lay))
  out = np.asarray(tower(px, lay))
  assert out.shape == (int(tokens_per_image(np.array(grid), V).sum()), V.out_hidden_size)
  assert np.abs(ref_out).max() > 0.1  # not a vanishing signal
  np.testing.assert_allclose(hidden, ref_hidden, atol=1e-5, rtol=0)
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)


def test_padding_and_jit_match_unpadded(tower):
  """Padded rows (filled with garbage) never leak into real outputs; the layout goes through jit."""
  grid = GRIDS["mixed"]
  px = pixels(grid)
  n = len(px)
  ref = np.asarray(tower(px, vision_layout(np.array(grid), V)))
  pad = n + 40
  px_pad = np.concatenate([px, 100 * pixels([[1, 4, 10]], seed=1)])
  graphdef, state = nnx.split(tower)
  run = jax.jit(lambda s, x, lay: nnx.merge(graphdef, s)(x, lay))
  out = np.asarray(run(state, px_pad, vision_layout(np.array(grid), V, pad_patches=pad)))
  assert out.shape == (pad // V.merge_unit, V.out_hidden_size)
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out[: n // V.merge_unit], ref, atol=1e-5, rtol=0)


def test_chunked_layout_matches_one_sequence(tower):
  """A batch's pixels in one zero-padded chunk per batch shard (the data pipeline's layout): the tower
  reorders and attends inside each chunk, on a 3-device mesh with its activations pinned to the rows,
  and the spliced tokens equal the plain layout's (one of the shards has no image)."""
  grids = [np.array(GRIDS["mixed"][:1]), np.zeros((0, 3), np.int64), np.array(GRIDS["mixed"][1:])]
  chunk = 240  # patches per shard
  ref = np.asarray(tower(pixels(GRIDS["mixed"]), vision_layout(np.array(GRIDS["mixed"]), V)))
  px = 100 * pixels([[1, 12, 60]], seed=1)  # garbage in every padded row
  offset = 0
  for k, g in enumerate(grids):
    n = num_patches(g) if len(g) else 0
    px[k * chunk:k * chunk + n] = pixels(GRIDS["mixed"])[offset:offset + n]
    offset += n
  lay = sharded_vision_layout(grids, [tokens_per_image(g, V) for g in grids], chunk, V)
  assert lay.chunks == 3
  mesh = make_mesh((1, 3, 1), jax.devices()[:3])
  rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  graphdef, state = nnx.split(tower)
  run = jax.jit(lambda s, x, lay: nnx.merge(graphdef, s)(x, lay))
  with jax.set_mesh(mesh):
    out = np.asarray(run(state, jax.device_put(px, rows), lay))
  np.testing.assert_allclose(out[:len(ref)], ref, atol=1e-5, rtol=0)


def test_patch_rows_and_aligned_chunks():
  """Rows: a power of two (at least a merge unit) below the bucket, a multiple of it above. Chunks: the most
  power-of-two chunks with every boundary at an image's end or in the padding."""
  assert [patch_rows(n, 256, 4) for n in (1, 4, 5, 16, 17, 200, 256, 257, 600)] == [4, 4, 8, 16, 32, 256, 256, 512, 768]
  assert aligned_chunks(np.array([[1, 4, 4]] * 16), 256, 4) == 16  # the demo's batch: one chunk per image
  assert aligned_chunks(np.array([[1, 4, 4]] * 3), 64, 4) == 4  # the last chunk is padding
  assert aligned_chunks(np.array([[1, 4, 4], [1, 4, 8]]), 64, 4) == 1  # ends at 16 and 48: 32 is inside
  assert aligned_chunks(np.array([[1, 4, 8], [1, 4, 4]]), 64, 4) == 2  # the boundary at 32 is an end
  assert aligned_chunks(np.array([[1, 4, 4], [1, 4, 8]]), 48, 4) == 1  # 48 rows have no power-of-two split
  assert aligned_chunks(np.array([[1, 2, 2]] * 4), 16, 4) == 4  # chunks stay a whole merge unit
  assert aligned_chunks(np.array([[1, 2, 2]] * 4), 16, 8) == 2


@pytest.mark.parametrize("grid", [[[1, 4, 4]] * 5, [[1, 4, 8], [1, 4, 4], [1, 4, 4]], GRIDS["mixed"]])
def test_sampling_layout_matches_hf(grid, tower, hf_tower):
  """The samplers' layout (`qwen_images.layout`: padded rows of garbage, attention inside aligned chunks) gives
  HF's tokens for the real rows."""
  px = pixels(grid)
  ref, _ = hf_forward(hf_tower, px, grid)
  padded, lay = qwen_images.layout(px, np.array(grid), V, 256)
  assert len(padded) == patch_rows(len(px), 256, V.merge_unit)
  padded[len(px):] = 100.0  # padding never reaches a real token
  graphdef, state = nnx.split(tower)
  out = np.asarray(jax.jit(lambda s, x, lay: nnx.merge(graphdef, s)(x, lay))(state, padded, lay))
  np.testing.assert_allclose(out[:len(ref)], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scan, remat", [(False, "none"), (True, "full"), (False, "dots_saveable")])
def test_scan_and_remat_agree(tower, scan, remat):
  grid = GRIDS["mixed"]
  px = pixels(grid)
  lay = vision_layout(np.array(grid), V)
  ref = np.asarray(tower(px, lay))
  other = VisionTower(CFG.replace(remat_policy=remat), rngs=nnx.Rngs(1))
  nnx.update(other, nnx.state(tower, nnx.Param))
  if not scan:  # the same values layer by layer, run unrolled
    other.blocks = unstack(other.blocks)
  np.testing.assert_allclose(np.asarray(other(px, lay)), ref, atol=1e-5, rtol=0)


def test_rope_table_dtype_quirk(tower):
  """A bf16 angle table (DiffusionVL training) changes outputs slightly; fp32 is the HF default."""
  grid = GRIDS["mixed"]
  px = pixels(grid)
  lay = vision_layout(np.array(grid), V)
  ref = np.asarray(tower(px, lay))
  tower.rope_table_dtype = jnp.dtype(jnp.bfloat16)
  try:
    quirk = np.asarray(tower(px, lay))
  finally:
    tower.rope_table_dtype = jnp.dtype(jnp.float32)
  assert 0 < np.abs(quirk - ref).max() < 0.5
