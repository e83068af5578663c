"""How close this process is to Linux's limit on memory mappings (`vm.max_map_count`, 65,530 by default).

XLA:CPU loads every kernel of a compiled program through LLVM's JIT, which maps the kernel's code, constants and
data apart (three mappings, kept while the program lives). A decoding program has a few hundred kernels, so a
CPU server's warm-up (a program per cache view, row width, prompt bucket and algorithm) takes tens of thousands:
36,636 for `dvl serve --compact-rows` with both algorithms on a 151,680-token random checkpoint. Past the limit
the next compile aborts the process (LLVM cannot map section memory), however much memory is free; the test
suite's workers died of it (`tests/conftest.py`). The server (`dvl_jax.serving`) and the in-process evaluator
read it; accelerator programs keep their kernels on the device.
"""

from __future__ import annotations

import jax

MAPS = "/proc/self/maps"
LIMIT = "/proc/sys/vm/max_map_count"
HEADROOM = 0.5  # warn past this share of the limit: later programs (image shapes) need room too
FULL = 0.9  # past this share, a program that is not compiled yet is refused (a decoding program takes ~1,500)


class NoRoom(RuntimeError):
  """A request would need a new compiled program and the process is near its limit on memory mappings."""


def limit(path: str = LIMIT) -> int | None:
  """The system's limit on one process's memory mappings, or None where the system does not say (not Linux)."""
  try:
    with open(path) as f:
      return int(f.read())
  except (OSError, ValueError):
    return None


def usage(maps: str = MAPS, limit_path: str = LIMIT) -> tuple[int, int] | None:
  """(mappings this process holds, the system's limit), or None where the system does not say (not Linux)."""
  most = limit(limit_path)
  try:
    with open(maps) as f:
      return (sum(1 for _ in f), most) if most is not None else None
  except OSError:
    return None


def _past(share: float, counts: tuple[int, int] | None) -> bool:
  return counts is not None and counts[0] > share * counts[1]


def warning(maps: str = MAPS, limit_path: str = LIMIT) -> str | None:
  """A one-line warning with the fix when this process holds more than `HEADROOM` of the limit, else None."""
  counts = usage(maps, limit_path)
  if not _past(HEADROOM, counts):
    return None
  used, most = counts
  return (f"this process holds {used:,} of the {most:,} memory mappings Linux allows (vm.max_map_count; XLA:CPU "
          f"maps 3 per compiled kernel) and aborts when a later compile (a new image shape) passes the limit: "
          f"raise it (sudo sysctl -w vm.max_map_count=262144) or compile fewer programs (fewer views, no compact rows)")


def full(maps: str = MAPS, limit_path: str = LIMIT) -> bool:
  """Whether the process holds more than `FULL` of the limit: a new program may not fit."""
  return _past(FULL, usage(maps, limit_path))


def make_room(maps: str = MAPS, limit_path: str = LIMIT) -> None:
  """Drops the process's compiled programs (they compile again when next used) when it holds more than `FULL` of
  the limit: for a loop that compiles per input shape (`dvl generate --requests`, `dvl eval`) before its next
  batch."""
  if full(maps, limit_path):
    jax.clear_caches()


def check_room(what: str, maps: str = MAPS, limit_path: str = LIMIT) -> None:
  """Raises `NoRoom` (one line, with the fix) when compiling `what` could take the process past the limit."""
  counts = usage(maps, limit_path)
  if _past(FULL, counts):
    raise NoRoom(f"{what} needs a program this server has not compiled, and the process holds {counts[0]:,} of "
                 f"the {counts[1]:,} memory mappings Linux allows (a compile past them aborts it): send a shape "
                 f"it has served, or restart it with a higher vm.max_map_count or that shape warmed up")
