"""Two processes on localhost (4 CPU devices each) assemble the global batches one process would.

Each process loads only its batch shards' rows; every shard it places must hold exactly the slice of
the whole batch (built on the host for all shards) that the array's sharding assigns to it.
"""

import os
import socket
import subprocess
import sys

import pytest


def _check_placement(steps: int = 3) -> int:
  """Compares every addressable shard of the first global batches with the whole host batch."""
  import jax
  import numpy as np

  from dvl_jax.data import synthetic
  from dvl_jax.data.host_batch import HostBatcher
  from dvl_jax.data.pipeline import DataConfig, DataPipeline
  from dvl_jax.parallel.mesh import make_mesh
  from tests.data.helpers import make_processor, noise_image, qa_row

  rows = [synthetic.llava_row(ex, f"s{i}") for i, ex in enumerate(synthetic.examples(16, seed=0))]
  rows += [qa_row(f"i{i}", "What is this ?", "A big", noise_image(28 * (2 + i % 3), 56, i)) for i in range(16)]
  config = DataConfig(batch_size=16, max_length=128, length_multiple=8, square_pad=False, num_threads=0)
  pipeline = DataPipeline(rows, make_processor(), config, make_mesh((2, 4, 1)))
  assert len(pipeline.batcher.owned) == 8 // jax.process_count()
  whole = HostBatcher(pipeline.index, pipeline.batcher.encoder, pipeline.batcher.config,
                      num_shards=pipeline.num_shards, owned=range(pipeline.num_shards))
  it, checked = iter(pipeline), 0
  for step in range(steps):
    batch, want = next(it), whole(pipeline.plan[step])
    want.pop("bad_rows"), want.pop("pixel_rows")  # host-side bookkeeping, not batch arrays
    for x, y in zip(jax.tree.leaves(batch), jax.tree.leaves(want), strict=True):
      assert x.shape == y.shape
      for shard in x.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), y[shard.index])
        checked += 1
  return checked


def test_single_process_placement():
  assert _check_placement() > 0


@pytest.mark.slow
def test_two_processes_place_their_shards_of_the_global_batch():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "USE_TORCH": "0"}  # transformers would import torch: seconds per process
  procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=240) for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][1][-3000:] + outs[1][1][-3000:]
  assert all("CHECKED" in out for out, _ in outs)


if __name__ == "__main__":  # one of the two processes
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  from tests.user_process import FAST_COMPILE
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}"
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
  print("CHECKED", _check_placement())
