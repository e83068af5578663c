"""`benchmarks/deviceless.py`: tracing for a chip this machine lacks. The compile itself needs libtpu or JAX's CUDA
plugin, which the test environment does not install; the lowering for a TPU does not."""

import types

import jax
import jax.numpy as jnp

from benchmarks import deviceless
from dvl_jax.attention import splash
from tests.attention.cases import Case, problem

V5E = types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite", num_cores=1)


def test_target_answers_the_chips_platform_inside_and_restores_it_after():
  before = jax.default_backend()
  with deviceless.target(V5E):
    assert jax.default_backend() == "tpu"
    assert jax.sharding.get_abstract_mesh().abstract_device.device_kind == "TPU v5 lite"
  assert jax.default_backend() == before
  with deviceless.target(types.SimpleNamespace(platform="cuda", device_kind="NVIDIA H200")):
    assert jax.default_backend() == "gpu"  # what this project's code compares with


def test_splash_kernels_are_built_between_two_traces_and_the_second_uses_them():
  q, k, v, spec = problem(Case("bd3_train", 96, (4, 2), 64, block_size=8), dtype=jnp.bfloat16)
  loss = lambda q, k, v: splash.attend(q, k, v, spec).astype(jnp.float32).sum()  # noqa: E731
  texts = []

  def lower():
    texts.append(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(lowering_platforms=("tpu",))
                 .as_text())
    return texts[-1]

  real = splash._kernel
  built = real.cache_info().currsize
  with deviceless.target(V5E):
    final = deviceless.prebuilt_splash_kernels(lower)
  assert splash._kernel is real
  assert len(texts) == 2 and "tpu_custom_call" not in texts[0]  # the first trace ran the stand-in kernel
  assert final.count("tpu_custom_call") == 2  # forward, fused dQ/dK/dV
  assert real.cache_info().currsize == built + 1  # the one kernel it asked for, built once
