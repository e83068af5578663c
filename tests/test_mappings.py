"""The memory-mapping headroom that `dvl serve` reports (`/metrics`) and warns about after warm-up: a compiled
XLA:CPU program holds mappings for as long as it lives, and past Linux's limit the next compile aborts."""

import jax
import jax.numpy as jnp

from dvl_jax.core import mappings


def _files(tmp_path, lines: int, limit: str) -> tuple[str, str]:
  maps, most = tmp_path / "maps", tmp_path / "max_map_count"
  maps.write_text("".join(f"{i:x}000-{i:x}fff r-xp 00000000 00:00 0\n" for i in range(lines)))
  most.write_text(limit)
  return str(maps), str(most)


def test_usage_counts_the_mappings_and_reads_the_limit(tmp_path):
  maps, most = _files(tmp_path, 7, "65530\n")
  assert mappings.usage(maps, most) == (7, 65530) and mappings.limit(most) == 65530
  assert mappings.usage(str(tmp_path / "absent"), str(tmp_path / "absent")) is None
  assert mappings.usage(*_files(tmp_path, 7, "unlimited")) is None


def test_a_warning_past_half_of_the_limit_names_the_limit_and_the_fix(tmp_path):
  assert mappings.warning(*_files(tmp_path, 5, "10")) is None
  message = mappings.warning(*_files(tmp_path, 6, "10"))
  assert message.startswith("this process holds 6 of the 10 memory mappings Linux allows (vm.max_map_count")
  assert "sudo sysctl -w vm.max_map_count=" in message and "\n" not in message


def test_a_compiled_cpu_program_holds_mappings_while_it_lives():
  """What the warning rests on: compiling a program adds mappings (its kernels' code, constants and data)."""
  before, _ = mappings.usage()
  program = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0) + jnp.cos(x).max()).lower(jnp.ones((8, 8))).compile()
  after, _ = mappings.usage()
  assert after - before >= 3
  assert program(jnp.ones((8, 8))).shape == (8,)


def test_dropping_the_compiled_programs_gives_their_mappings_back():
  """What `tests/conftest.py` relies on to keep a long-lived test worker under the limit."""
  programs = [jax.jit(lambda x, k=k: jnp.sin(x * k).sum() + jnp.tanh(x).max()) for k in range(10)]
  for program in programs:
    program(jnp.ones((4, 4))).block_until_ready()
  held, _ = mappings.usage()
  jax.clear_caches()
  released, _ = mappings.usage()
  assert held - released >= 3 * len(programs)
