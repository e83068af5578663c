"""Test set-up, before jax is first imported: 8 fake CPU devices, exact fp32 matmuls, and cheaper compiles.

Compiling dominates the suite's time on a CPU (the tiny models run in milliseconds), so tests compile with cheap
code generation (`user_process.FAST_COMPILE`: the same HLO, less optimised machine code, values within float
rounding of the default build's) and share one persistent compilation cache for the session, so a program compiled
again by another test (a new `TrainStep`, a new jitted closure) is read back instead of rebuilt. The cache
directory is new for every session: nothing carries over between runs. Under pytest-xdist the workers inherit the
directory the controlling process made (through `DVL_TESTS_XLA_CACHE`), so one worker's compiles serve the other,
and only the process that made it removes it. A size bound turns on the cache's file lock: without it JAX writes an
entry in place, unlocked, and a worker reading the entry the other is still writing crashed in deserialisation (a
segfault in one CI run).
"""

import atexit
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.user_process import FAST_COMPILE  # noqa: E402

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
_CACHE = os.environ.get("DVL_TESTS_XLA_CACHE")
if _CACHE is None:
  _CACHE = os.environ["DVL_TESTS_XLA_CACHE"] = tempfile.mkdtemp(prefix="dvl-tests-xla-cache-")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_compilation_cache_max_size", 2 ** 40)  # never evicts; reads and writes take the lock

from dvl_jax.core import mappings  # noqa: E402  (after the settings above: nothing compiles first)


@pytest.fixture(autouse=True, scope="module")
def _unmap_compiled_programs():
  """Drops the in-memory compiled programs after each test file. XLA:CPU maps 3 memory regions per kernel of a
  loaded executable (a few hundred kernels for a sampler) and keeps them while its jit caches hold it; a worker
  that ran a few hundred tests' programs reached Linux's `vm.max_map_count` (65,530 mappings: the core dump of a
  crashed CI worker had 65,532) and died in the next compile (LLVM's "unable to allocate section memory" abort,
  or a segfault). The next file reads the programs it shares with earlier ones back from the persistent cache."""
  yield
  jax.clear_caches()


@pytest.fixture(autouse=True)
def _room_for_the_next_test():
  """Also after a test once the process holds half the limit (`tests/serving/test_engine.py` alone reaches 26,575
  mappings): a file that grows cannot take a worker down."""
  yield
  if (warning := mappings.warning()) is not None:
    jax.clear_caches()
    print(f"\nconftest: cleared the compiled programs: {warning}")
