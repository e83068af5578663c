"""Checkpoint layouts (spec §8): which files hold the weights and how their names map to Hub names.

The family's key map (`dvl_jax.models.<family>.key_map`: `LAYOUTS`, `SIDE_FILES`) says which layouts
exist; every layout is reduced to the family's Hub names, the only names its `RULES` know.
"""

from __future__ import annotations

import dataclasses
import os
from types import ModuleType

from checkpoints_convert import safetensors_reader
from checkpoints_convert.errors import UnknownLayoutError
from checkpoints_convert.safetensors_reader import TensorRef
from dvl_jax.models.key_map import Layout


@dataclasses.dataclass(frozen=True)
class Source:
  """The tensors of a checkpoint under their Hub names (`TensorRef.name` keeps the original name)."""

  layout: str
  tensors: dict[str, TensorRef]
  duplicates: list[str]  # original names whose Hub name another tensor already took


def open_source(src_dir: str, key_map: ModuleType) -> Source:
  """Reads every header of the checkpoint and renames its tensors to the family's Hub names."""
  side_files = key_map.SIDE_FILES
  side = {f: p for f, p in side_files.items() if os.path.isfile(os.path.join(src_dir, f))}
  main = [ref for path in safetensors_reader.weight_files(src_dir, exclude=tuple(side_files))
          for ref in safetensors_reader.read_header(path).values()]
  if side:
    named = [(ref.name, ref) for ref in main]
    named += [(prefix + ref.name, ref) for f, prefix in side.items()
              for ref in safetensors_reader.read_header(os.path.join(src_dir, f)).values()]
    return _collect(key_map.SIDE_FILES_LAYOUT, named)
  return from_refs(main, src_dir, key_map)


def from_refs(refs: list[TensorRef], where: str, key_map: ModuleType) -> Source:
  """Tensors of a one-namespace layout (all but a side-file layout), renamed to Hub names."""
  layout = detect([ref.name for ref in refs], where, key_map)
  return _collect(layout.name, [(_rename(ref.name, layout), ref) for ref in refs])


def detect(names: list[str], where: str, key_map: ModuleType) -> Layout:
  for layout in key_map.LAYOUTS:
    if any(n.startswith(layout.markers) for n in names):
      return layout
  seen = sorted({".".join(n.split(".")[:2]) for n in names})
  known = "; ".join(f"{l.name} ({', '.join(p + '*' for p in l.markers)})" for l in key_map.LAYOUTS)
  side = f"; {key_map.SIDE_FILES_LAYOUT} ({' + '.join(key_map.SIDE_FILES)})" if key_map.SIDE_FILES else ""
  raise UnknownLayoutError(
      f"{where}: unknown checkpoint layout; tensor names start with {seen[:12]}"
      f"{' ...' if len(seen) > 12 else ''}; known layouts: {known}{side}")


def _rename(name: str, layout: Layout) -> str:
  for old, new in layout.renames:
    if name.startswith(old):
      return new + name[len(old):]
  return name


def _collect(layout: str, named: list[tuple[str, TensorRef]]) -> Source:
  tensors, duplicates = {}, []
  for hub_name, ref in named:
    if hub_name in tensors:
      duplicates.append(f"{ref.name} in {os.path.basename(ref.path)} (same as {tensors[hub_name].name})")
    else:
      tensors[hub_name] = ref
  return Source(layout, tensors, duplicates)
