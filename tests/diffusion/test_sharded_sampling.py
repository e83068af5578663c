"""Sampling over `('data', 'fsdp', 'tensor')` meshes of 8 fake CPU devices: the single-device tokens for
every decoding algorithm, the KV cache kept on its sharding, and a bounded number of collectives in each
iteration of the decoding loop (read from the compiled HLO)."""

import dataclasses
import functools
import re
import warnings

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dvl_jax.core.config import QWEN25_VL_3B, QWEN25_VL_7B
from dvl_jax.testing.tiny import tiny_config
from dvl_jax.diffusion import sampler, sampling_mesh
from dvl_jax.diffusion.sampling_config import Prompts, SamplingConfig
from dvl_jax.testing.tiny import tiny_model
from dvl_jax.parallel.mesh import make_mesh
from dvl_jax.parallel.rules import shard_model
from dvl_jax.diffusion.sampling_mesh import Placement, suggest_mesh

_TINY = tiny_config()
# 8 query / 4 KV heads: tensor 4 shards the KV cache by heads, tensor 8 must replicate it.
CFG = _TINY.replace(text=dataclasses.replace(_TINY.text, num_heads=8, num_kv_heads=4, mrope_section=(2, 1, 1)))
MESHES = [(1, 1, 8), (2, 1, 4), (2, 4, 1), (8, 1, 1)]
GEN = 12
SETTINGS = {
    "static": SamplingConfig(gen_length=GEN, steps=4),
    "dynamic": SamplingConfig(gen_length=GEN, steps=4, remasking_strategy="low_confidence_dynamic",
                              confidence_threshold=0.5),
    "threshold": SamplingConfig(gen_length=GEN, remasking_strategy="threshold", confidence_threshold=0.5),
    "autoregressive": SamplingConfig(gen_length=GEN, algorithm="autoregressive"),
}
PROMPTS = Prompts.from_lists([[int(t) for t in np.random.default_rng(n).integers(3, 200, n)] for n in (3, 13, 8, 21)])


@functools.cache
def model(shape: tuple[int, int, int] | None = None):
  """The test model on one device (None) or with its params placed on a mesh by the logical rules.

  The lm_head is scaled so confidences spread over (0, 1) and dynamic / threshold decoding fix
  several tokens in some passes (the default init gives every token ~1/vocab)."""
  m = tiny_model(CFG, logit_scale=40.0)
  if shape is not None:
    m = shard_model(m, make_mesh(shape))
  return m


@functools.cache
def single_device(setting: str):
  return sampler.generate(model(), PROMPTS, SETTINGS[setting])


def assert_same_output(out, want):
  np.testing.assert_array_equal(out.tokens, want.tokens)
  np.testing.assert_array_equal(out.nfe, want.nfe)
  np.testing.assert_array_equal(out.steps_per_token, want.steps_per_token)
  assert out.forwards == want.forwards


def cases() -> list:
  """Every mesh x setting; dynamic / threshold on meshes without `tensor` are slow: their logits are not
  vocab-sharded there, so they exercise nothing sharded that static decoding does not."""
  return [pytest.param(shape, setting, id=f"{mesh_id(shape)}-{setting}",
                       marks=[pytest.mark.slow] if shape[2] == 1 and setting in ("dynamic", "threshold") else [])
          for shape in MESHES for setting in SETTINGS]


def mesh_id(shape: tuple[int, int, int]) -> str:
  return "x".join(map(str, shape))


@pytest.mark.filterwarnings("ignore:the mesh's tensor axis")
@pytest.mark.parametrize("shape, setting", cases())
def test_greedy_tokens_equal_single_device(shape, setting):
  want = single_device(setting)
  if setting in ("dynamic", "threshold"):
    assert (want.tokens_per_forward > 1).any()  # the strategies really differ from static here
  out = sampler.generate(model(shape), PROMPTS, SETTINGS[setting])
  assert_same_output(out, want)
  mesh = model(shape).lm_head.kernel[...].sharding.mesh
  kv_spec = "tensor" if CFG.text.num_kv_heads % shape[2] == 0 else None
  cache = NamedSharding(mesh, PartitionSpec(None, "data", None, kv_spec, None))
  assert all(c.sharding.is_equivalent_to(cache, c.ndim) for c in out.cache)
  assert out.cache[0].shape[1] == -(-len(PROMPTS.ids) // shape[0]) * shape[0]  # dead rows pad the batch
  again = sampler.generate(model(shape), PROMPTS, SETTINGS[setting], cache=out.cache)
  assert out.cache[0].is_deleted()  # donated: updated in place, on its sharding
  assert_same_output(again, want)
  assert again.cache[0].sharding.is_equivalent_to(cache, 5)


@pytest.mark.parametrize("backend, shape, setting", [("pallas_gpu", (2, 1, 4), "static"),
                                                     ("pallas_gpu", (2, 1, 4), "autoregressive"),
                                                     ("pallas_gpu", (8, 1, 1), "autoregressive"),
                                                     ("splash", (2, 1, 4), "autoregressive")])
def test_attention_kernels_run_per_device_on_a_mesh(backend, shape, setting):
  """XLA cannot split a Pallas kernel: left unsplit, every device gathered the whole KV cache in every step
  (the own GPU kernel, compiled for GPUs) or the whole batch's prompts (splash's prefill). The sampler runs the
  kernels per device (`shard_map`, a manual computation in the program; with splash the TPU decoding kernel too)
  and gets the single-device tokens (the kernels interpreted here): heads split over `tensor` (q, k and v apart),
  or rows alone (q, k and v read from one array)."""
  kernel = shard_model(tiny_model(CFG.replace(attention_backend=backend), logit_scale=40.0), make_mesh(shape))
  assert "sdy.manual_computation" in sampler.lower(kernel, PROMPTS, SETTINGS[setting]).as_text()
  assert_same_output(sampler.generate(kernel, PROMPTS, SETTINGS[setting]), single_device(setting))


def test_fused_commits_are_not_packed_on_a_mesh():
  """`packed_commit_share` packs rows together, which a row-sharded batch cannot: on a mesh the option changes
  nothing (same forwards as unpacked on one device), where one device runs fewer forwards for the same tokens."""
  unpacked = dataclasses.replace(SETTINGS["dynamic"], fused_window_share=1.0)  # a minority's commits go alone
  packed = dataclasses.replace(unpacked, packed_commit_share=0.5)
  want = sampler.generate(model(), PROMPTS, unpacked)
  assert_same_output(sampler.generate(model((2, 1, 4)), PROMPTS, packed), want)
  one_device = sampler.generate(model(), PROMPTS, packed)
  np.testing.assert_array_equal(one_device.tokens, want.tokens)
  assert one_device.nfe.sum() < want.nfe.sum()


@pytest.mark.slow
def test_image_prompt_with_the_vision_tower_sharded():
  grid = np.array([[1, 4, 8]])
  image = [CFG.vision_start_token_id] + [CFG.image_token_id] * 8 + [CFG.vision_end_token_id]
  rows = [[5, 6, 7] + image + [8, 9], [10, 11, 12, 13]]
  pixels = np.random.default_rng(3).normal(size=(32, CFG.vision.patch_dim)).astype(np.float32)
  prompts = Prompts.from_lists(rows, pixel_values=pixels, image_grid_thw=grid)
  out = sampler.generate(model((2, 1, 4)), prompts, SETTINGS["static"])
  assert_same_output(out, sampler.generate(model(), prompts, SETTINGS["static"]))


# ---- collectives in the decoding loop ------------------------------------------------------------

_COMPUTATION = re.compile(r"^(?:ENTRY )?(%[\w.\-]+) .*\{$")
_COLLECTIVE = re.compile(r"= (.+?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_CALLEE = re.compile(r"\b(?:condition|body|to_apply|calls)=(%[\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}|(?:true|false)_computation=(%[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def loop_collectives(hlo: str) -> list[tuple[str, str]]:
  """(kind, result shape) of every collective one iteration of the `decode_loop` while loop runs:
  a nested loop (the layer scan) counts once per trip, a conditional by its costliest branch."""
  comps, name = {}, None
  for line in hlo.splitlines():
    if match := _COMPUTATION.match(line):
      name = match.group(1)
      comps[name] = []
    elif name:
      comps[name].append(line)

  def run(name: str) -> list[tuple[str, str]]:
    ops = []
    for line in comps[name]:
      if op := _COLLECTIVE.search(line):
        ops.append((op.group(2), op.group(1)))
      if " conditional(" in line:
        branches = [b.strip() for m in _BRANCHES.findall(line) for b in "".join(m).split(",")]
        ops += max((run(b) for b in branches), key=len)
      else:
        trip = _TRIP.search(line)
        ops += [op for callee in _CALLEE.findall(line) for op in run(callee)] * (int(trip.group(1)) if trip else 1)
    return ops

  (loop,) = [line for lines in comps.values() for line in lines if " while(" in line and "decode_loop/while\"" in line]
  return run(re.search(r"body=(%[\w.\-]+)", loop).group(1)) + run(re.search(r"condition=(%[\w.\-]+)", loop).group(1))


def collective_bound(shape: tuple[int, int, int], layers: int, algorithm: str) -> int:
  """The collectives a decoding step may run on a `(data, fsdp, tensor)` mesh (GSPMD on XLA CPU):

  * data > 1: the loop's `any` over the rows: go on? (and, fused block diffusion, does a row commit?);
  * tensor > 1 (Megatron): the partial sums after attention and after the MLP (2 per layer), the
    vocab-sharded embedding lookup (1) and logits (max, sum, arg-max as 2 gathers, the chosen token's
    probability: 5); with KV heads replicated over `tensor`, the gathers of the new block's K and V (2);
  * fsdp > 1 (embedding dim sharded, activations replicated): per layer the two RMSNorm statistics and
    the partial sums of (q, k, v) and (gate, up) (4 per layer); the final norm and the lm_head (2).
  Never anything of the cache's size: that is asserted separately.
  """
  data, fsdp, tensor = shape
  bound = 0 if data == 1 else 1 if algorithm == "autoregressive" else 2
  if tensor > 1:
    bound += 2 * layers + 1 + 5 + (0 if CFG.text.num_kv_heads % tensor == 0 else 2)
  if fsdp > 1:
    bound += 4 * layers + 2
  return bound


@pytest.mark.parametrize("shape", MESHES, ids=mesh_id)
def test_collectives_per_decoding_step_are_bounded_and_never_move_the_cache(shape):
  for setting in ("static", "autoregressive"):
    compiled = sampler.lower(model(shape), PROMPTS, SETTINGS[setting]).compile()
    ops = loop_collectives(compiled.as_text())
    bound = collective_bound(shape, CFG.text.num_layers, SETTINGS[setting].algorithm)
    assert len(ops) <= bound, (setting, ops)
    cache_len = SETTINGS[setting].resolve(CFG).cache_len(PROMPTS.bucketed(SETTINGS[setting], CFG).ids.shape[1])
    assert cache_len == 80  # no other dimension of this model or batch has this size
    assert not [op for op in ops if re.search(rf"[\[,]{cache_len}[\],]", op[1])], ops  # no cache resharding
    if shape == (8, 1, 1):
      assert len(ops) == bound  # pure data parallelism: nothing but the loop's predicates


# ---- placement and mesh choice ---------------------------------------------------------------------

def test_kv_heads_beyond_the_tensor_axis_are_replicated_with_one_warning(monkeypatch):
  monkeypatch.setattr(sampling_mesh, "_WARNED", set())
  state = nnx.state(model((1, 1, 8)))
  with pytest.warns(UserWarning, match=r"tensor axis \(8\) does not divide the model's 4 KV heads"):
    placement = Placement.of(CFG, state)
  assert placement.cache.spec == PartitionSpec(None, "data", None, None, None)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    Placement.of(CFG, state)  # warned once only
    assert Placement.of(CFG, nnx.state(model((2, 1, 4)))).cache.spec[3] == "tensor"


def test_params_off_the_logical_rules_are_refused():
  graphdef, state = nnx.split(model())
  mesh = make_mesh((2, 1, 4))
  replicated = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
  with pytest.raises(ValueError, match="the logical rules say"):
    sampler.generate(nnx.merge(graphdef, replicated), PROMPTS, SETTINGS["static"])


def test_suggest_mesh():
  assert suggest_mesh(QWEN25_VL_7B, 8, batch=8) == (2, 1, 4)  # tensor = the 4 KV heads
  assert suggest_mesh(QWEN25_VL_3B, 8, batch=8) == (4, 1, 2)  # 2 KV heads
  assert suggest_mesh(QWEN25_VL_7B, 8, batch=1) == (1, 2, 4)  # one row: the spare devices split weights
  assert suggest_mesh(QWEN25_VL_7B, 16, batch=2) == (2, 2, 4)
  bf16 = QWEN25_VL_7B.replace(param_dtype="bfloat16")  # ~16.6 GB of params
  assert suggest_mesh(bf16, 8, batch=8, memory_per_device=16 * 2**30) == (2, 1, 4)
  assert suggest_mesh(bf16, 8, batch=8, memory_per_device=4 * 2**30) == (1, 2, 4)  # 4.1 GB/device > half of 4 GiB
  assert suggest_mesh(QWEN25_VL_7B, 8, override="1,2,4") == (1, 2, 4)
  assert suggest_mesh(QWEN25_VL_7B, 8, override="8x1x1") == (8, 1, 1)
  with pytest.raises(ValueError, match="whose product is 8"):
    suggest_mesh(QWEN25_VL_7B, 8, override=(2, 2, 1))
