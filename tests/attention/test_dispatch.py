"""Backend choice, forcing and fallback; the whole model gives the same loss and samples on every backend."""

import functools
import os
import pathlib
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dvl_jax.attention import dispatch
from dvl_jax.attention.cache_prefix import CachePrefix
from dvl_jax.attention.reference import attend_dense
from dvl_jax.testing.tiny import tiny_config
from dvl_jax.diffusion.loss import bd3_loss
from dvl_jax.core.vision_layout import vision_layout
from dvl_jax.testing.tiny import tiny_model
from tests.attention.cases import Case, cache_window, max_errors, problem

KERNELS = ("pallas_gpu", "splash")  # cudnn is jax's XLA path off a GPU: checked at the attention level


def test_auto_is_xla_on_cpu_and_the_environment_wins(monkeypatch):
  monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
  assert dispatch.resolve_backend("auto") == "xla"
  assert dispatch.resolve_backend("pallas_gpu") == "pallas_gpu"
  monkeypatch.setenv(dispatch.ENV_VAR, "splash")
  assert dispatch.resolve_backend("pallas_gpu") == "splash"
  monkeypatch.setenv(dispatch.ENV_VAR, "flash")
  with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
    dispatch.resolve_backend()


def test_bad_shapes_raise():
  q, k, v, spec = problem(Case("causal", 16, (3, 2)))
  with pytest.raises(ValueError, match="multiple of key/value heads"):
    dispatch.attend(q, k, v, spec)
  q, k, v, spec = problem(Case("causal", 16))
  with pytest.raises(ValueError, match="spec arrays"):
    dispatch.attend(q[:, :8], k, v, spec)


def test_unsupported_input_falls_back_to_xla_with_one_warning(monkeypatch):
  monkeypatch.setattr(dispatch, "_WARNED", set())
  q, k, v, spec = cache_window()  # splash masks are static: a KV-cache window is not positional
  with pytest.warns(UserWarning, match="'splash' cannot run a non-positional spec.*falling back to 'xla'"):
    out = dispatch.attend(q, k, v, spec, backend="splash")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    dispatch.attend(q, k, v, spec, backend="splash")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(attend_dense(q, k, v, spec)))


def test_the_own_gpu_kernel_falls_back_to_cudnn_then_xla(monkeypatch):
  """On a GPU a dense cuDNN kernel is the better stand-in for the own kernel than XLA's attention."""
  monkeypatch.setattr(dispatch, "_WARNED", set())
  q, k, v, spec = problem(Case("bd3_train", 24, (4, 2), 32, block_size=4))
  refuse = lambda backend, reason: backend._replace(unsupported=lambda *_: reason)
  monkeypatch.setitem(dispatch._IMPLS, "pallas_gpu", refuse(dispatch._IMPLS["pallas_gpu"], "inputs here"))
  calls = []
  cudnn = dispatch._IMPLS["cudnn"]
  monkeypatch.setitem(dispatch._IMPLS, "cudnn", cudnn._replace(attend=lambda *a: calls.append(1) or cudnn.attend(*a)))
  with pytest.warns(UserWarning, match="'pallas_gpu' cannot run inputs here; falling back to 'cudnn'"):
    dispatch.attend(q, k, v, spec, backend="pallas_gpu")
  assert calls == [1]
  monkeypatch.setitem(dispatch._IMPLS, "cudnn", refuse(cudnn, "this dtype"))
  with pytest.warns(UserWarning, match="'cudnn' cannot run this dtype; falling back to 'xla'"):
    out = dispatch.attend(q, k, v, spec, backend="pallas_gpu")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(attend_dense(q, k, v, spec)))


def test_reads_cache_in_place_says_what_decoding_with_a_cache_prefix_does(monkeypatch):
  """`reads_cache_in_place` (the serving engine's default views) answers what `attend` does with a cache prefix: the
  own GPU kernel reads it where it is unless the head dim is not a power of two >= 16, the cache is shorter than a
  tile or in another dtype (it concatenates it then), or it refuses the inputs; XLA always concatenates."""
  joined = []
  original = CachePrefix.joined
  monkeypatch.setattr(CachePrefix, "joined", lambda self, k, v: joined.append(1) or original(self, k, v))
  for head_dim, cache, cache_dtype in [(32, 32, jnp.float32), (24, 32, jnp.float32), (32, 8, jnp.float32),
                                       (32, 32, jnp.bfloat16)]:
    q, k, v, spec = cache_window(window=8, cache=cache, head_dim=head_dim)
    prefix = CachePrefix(*(x[None, :, :cache].astype(cache_dtype) for x in (k, v)), jnp.int32(0))
    joined.clear()
    dispatch.attend(q, k[:, cache:], v[:, cache:], spec, backend="pallas_gpu", prefix=prefix)
    in_place = dispatch.reads_cache_in_place("pallas_gpu", heads=4, kv_heads=2, head_dim=head_dim, length=cache,
                                             dtype=jnp.float32, cache_dtype=cache_dtype)
    assert in_place == (not joined) == ((head_dim, cache, cache_dtype) == (32, 32, jnp.float32))
  fits = dict(heads=4, kv_heads=2, head_dim=128, length=2048, dtype=jnp.bfloat16, cache_dtype=jnp.bfloat16)
  assert dispatch.reads_cache_in_place("pallas_gpu", **fits) and dispatch.reads_cache_in_place("splash", **fits)
  assert not dispatch.reads_cache_in_place("xla", **fits)
  assert not dispatch.reads_cache_in_place("pallas_gpu", **{**fits, "head_dim": 512})  # refused: cuDNN takes it
  assert not dispatch.reads_cache_in_place("splash", **{**fits, "dtype": jnp.float16, "cache_dtype": jnp.float16})


def test_a_jax_without_the_triton_backend_still_imports_and_interprets_the_kernel():
  """JAX 0.11 deprecated Pallas' Triton backend for removal: losing it must cost the compiled kernel only."""
  script = """
import sys, warnings
sys.modules["jax.experimental.pallas.triton"] = None  # as a JAX without the Triton backend
import jax, numpy as np
import dvl_jax
from dvl_jax.attention import dispatch, pallas_gpu
from dvl_jax.attention.reference import attend_dense
from tests.attention.cases import Case, problem
assert pallas_gpu.plgpu is None
q, k, v, spec = problem(Case("bd3_train", 24, (4, 2), 32, block_size=4))
with warnings.catch_warnings():
  warnings.simplefilter("error")
  out = dispatch.attend(q, k, v, spec, backend="pallas_gpu")  # interpreted off a GPU, as before
np.testing.assert_allclose(np.asarray(out), np.asarray(attend_dense(q, k, v, spec)), atol=1e-5)
jax.default_backend = lambda: "gpu"
print(pallas_gpu.unsupported(q, k, v, spec))
"""
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                        cwd=pathlib.Path(__file__).parents[2], env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr[-2000:]
  assert re.fullmatch(r"inputs with this JAX \([^)]+\), which has no Pallas Triton backend for the kernel "
                      r"\(JAX <= 0.11 has it\)\n", done.stdout), done.stdout


def test_cudnn_backend_matches_reference():
  """Off a GPU the cuDNN backend runs jax's XLA implementation: this checks its mask and GQA wiring."""
  q, k, v, spec = problem(Case("bd3_train", 40, (4, 1), 64, block_size=4, pad=6))
  fwd, bwd = max_errors(functools.partial(dispatch.attend, spec=spec, backend="cudnn"), q, k, v, spec)
  assert fwd <= 1e-5 and bwd <= 1e-4, (fwd, bwd)


# ---- the whole model ----------------------------------------------------------------------------

def _model(backend: str):
  """Tiny model with widely spread weights (sharp logits, varied greedy tokens), same for every backend."""
  graphdef, state = nnx.split(tiny_model(tiny_config(attention_backend=backend)))
  rng = np.random.default_rng(0)
  spread = lambda x: jnp.asarray(rng.normal(scale=0.3, size=x.shape), x.dtype) + (x if x.ndim == 1 else 0)
  return nnx.merge(graphdef, jax.tree.map(spread, state))


def _loss_and_grads(model):
  cfg = model.config
  rng = np.random.default_rng(1)
  n, grid = 23, np.array([[1, 4, 8]])
  ids = rng.integers(3, 200, (3, n))
  ids[0, 2:10] = cfg.image_token_id
  labels = np.where(np.arange(n) >= 5, ids, -100)
  amask = np.ones((3, n), np.int32)
  amask[2, 17:], labels[2, 17:] = 0, -100
  batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels), "attention_mask": jnp.asarray(amask),
           "pixel_values": jnp.asarray(rng.normal(size=(32, cfg.vision.patch_dim)), jnp.float32),
           "vision": vision_layout(grid, cfg.vision)}
  noise = (jnp.full((3, n), 0.5, jnp.float32), jnp.asarray(rng.uniform(size=(3, n)) < 0.5))
  graphdef, state = nnx.split(model)
  loss = lambda state: bd3_loss(nnx.merge(graphdef, state), batch, jax.random.key(0), noise=noise)[0]
  return jax.jit(jax.value_and_grad(loss))(state)


def _greedy_tokens(model):
  from dvl_jax.diffusion import sampler  # pylint: disable=import-outside-toplevel
  from dvl_jax.diffusion.sampling_config import Prompts, SamplingConfig  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(2)
  prompts = Prompts.from_lists([list(rng.integers(3, 200, 13)), list(rng.integers(3, 200, 5))])
  return np.asarray(sampler.generate(model, prompts, SamplingConfig(gen_length=16, steps=8)).tokens)


@functools.lru_cache(maxsize=None)
def _xla_results():
  model = _model("xla")
  return _loss_and_grads(model), _greedy_tokens(model)


@pytest.mark.slow
@pytest.mark.parametrize("backend", KERNELS)
def test_model_loss_gradients_and_greedy_samples_match_across_backends(backend, monkeypatch):
  monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
  (loss, grads), tokens = _xla_results()
  model = _model(backend)
  got_loss, got_grads = _loss_and_grads(model)
  assert abs(float(got_loss) - float(loss)) <= 1e-5, (float(got_loss), float(loss))
  diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), got_grads, grads)
  assert max(jax.tree.leaves(diff)) <= 1e-4, diff
  assert len(set(tokens.ravel().tolist())) > 3  # a non-degenerate sample
  np.testing.assert_array_equal(_greedy_tokens(model), tokens)


def test_environment_variable_reaches_the_model(monkeypatch):
  model = _model("xla")
  ids = jnp.asarray(np.random.default_rng(3).integers(3, 200, (2, 12)))
  forward = lambda: jax.make_jaxpr(lambda ids: model(ids, positions="flat"))(ids)
  assert "pallas_call" not in str(forward())
  monkeypatch.setenv(dispatch.ENV_VAR, "pallas_gpu")
  assert "pallas_call" in str(forward())


@pytest.mark.parametrize("scan", [True, False])
def test_a_decoding_step_with_a_kernel_copies_no_cache(scan, monkeypatch):
  """The decoder hands the kernels the stacked cache and a layer index (no `[cache ; new]` concatenation: on a GPU
  each was a copy of the layer's whole cache per step, on a TPU two) and the own GPU kernel q / k / v as one array;
  the xla backend concatenates."""
  from dvl_jax.attention.spec import AttentionSpec  # pylint: disable=import-outside-toplevel

  monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
  lp, n = 40, 8
  cache = tuple(jnp.zeros((2, 2, lp, 2, 16), jnp.float32) for _ in "kv")
  idx = jnp.broadcast_to(jnp.arange(lp + n, dtype=jnp.int32), (2, lp + n))
  spec = AttentionSpec(q_idx=idx[:, lp:], kv_idx=idx, q_seg=jnp.ones((2, n), jnp.int32),
                       kv_seg=jnp.ones((2, lp + n), jnp.int32), kind="block_causal", block_size=8)

  def concatenated(backend: str, kernel: str | None = None) -> list[str]:
    model = tiny_model(tiny_config(attention_backend=backend, scan_layers=scan))
    x = jnp.zeros((2, n, model.config.text.hidden_size), jnp.float32)
    text = str(jax.make_jaxpr(lambda x: model.decode(x, idx[:, lp:], spec, cache))(x))
    assert kernel is None or kernel in text
    return re.findall(r"\w+:\w+\[([\d,]+)\] = concatenate", text)

  assert any(f",{lp + n}," in shape for shape in concatenated("xla"))  # the reference: [B, Lp + n, Hkv, D]
  own = concatenated("pallas_gpu", "dvl_flash_forward_cached")
  assert own and not any(str(lp + n) in shape.split(",") for shape in own), own  # only q / k / v joined
  assert not any(str(lp + n) in shape.split(",") for shape in concatenated("splash", "dvl_tpu_decode"))
