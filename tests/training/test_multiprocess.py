"""Two processes on localhost (`jax.distributed`, gloo, 4 CPU devices each) run sharded stage-2 train
steps over one 8-device mesh; the result equals the single-process run on 8 devices."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

MESH = (2, 2, 2)


def _train_two_steps() -> tuple[dict[str, np.ndarray], list[float]]:
  """Params (gathered to every host) and losses after two stage-2 steps on the global mesh."""
  import jax
  from jax.experimental import multihost_utils

  from dvl_jax.parallel.mesh import make_mesh
  from dvl_jax.parallel.rules import shard_model
  from dvl_jax.training.optimizer import OptimizerConfig
  from dvl_jax.training.state import stage
  from dvl_jax.training.step import TrainStep
  from tests.training.helpers import pipeline, synthetic_rows, tiny_model

  mesh = make_mesh(MESH)
  model = shard_model(tiny_model(), mesh)
  trainer = TrainStep(model, stage("stage2"), OptimizerConfig(learning_rate=1e-3, warmup_ratio=0.0), 10, mesh)
  state, data, losses = trainer.init(model), iter(pipeline(synthetic_rows(32), mesh)), []
  for _ in range(2):
    state, metrics = trainer(state, next(data), jax.random.key(0))
    losses.append(float(metrics["loss"]))
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  return {jax.tree_util.keystr(p): np.asarray(multihost_utils.process_allgather(x, tiled=True))
          for p, x in flat}, losses


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "USE_TORCH": "0"}
  out = str(tmp_path / "two.npz")
  procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), out], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=400) for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][1][-3000:] + outs[1][1][-3000:]
  two = dict(np.load(out))
  params, losses = _train_two_steps()
  np.testing.assert_allclose(two.pop("__losses__"), losses, rtol=1e-5)
  assert sorted(two) == sorted(params)
  for key, value in params.items():
    np.testing.assert_allclose(two[key], value, atol=1e-5, err_msg=key)


if __name__ == "__main__":  # one of the two processes
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  from tests.user_process import FAST_COMPILE
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}"
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
  params, losses = _train_two_steps()
  if jax.process_index() == 0:
    np.savez(sys.argv[3], __losses__=np.array(losses), **params)
