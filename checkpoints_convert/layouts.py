"""Checkpoint layouts (spec §8): which files hold the weights and how their names map to Hub names.

Every layout is reduced to the Hub Qwen2.5-VL names (`visual.*`, `model.*`, `lm_head.weight`), the
only names `key_map` knows. A layout is a list of prefix renames, recognised by marker prefixes.
"""

from __future__ import annotations

import dataclasses
import os

from checkpoints_convert import safetensors_reader
from checkpoints_convert.errors import UnknownLayoutError
from checkpoints_convert.safetensors_reader import TensorRef


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str
  renames: tuple[tuple[str, str], ...]  # (prefix in the files, Hub prefix); first match wins
  markers: tuple[str, ...]  # a name with one of these prefixes identifies the layout


# Checked in this order: the more specific prefixes first (`model.visual.` before `visual.`).
LAYOUTS = (
    Layout("transformers", (("model.visual.", "visual."), ("model.language_model.", "model.")),
           ("model.visual.", "model.language_model.")),
    Layout("diffusionvl", (("model.vision_tower.vision_tower.", "visual."),
                           ("model.mm_projector.merger.", "visual.merger.")),
           ("model.vision_tower.", "model.mm_projector.")),
    Layout("hub", (), ("visual.",)),
)
# DiffusionVL training output (spec §8.1): the tower and projector live in files of their own, unprefixed.
TRAINING_SIDE_FILES = {"vision_tower.safetensors": "visual.", "projector.safetensors": "visual.merger."}
TRAINING_LAYOUT = "diffusionvl-train"


@dataclasses.dataclass(frozen=True)
class Source:
  """The tensors of a checkpoint under their Hub names (`TensorRef.name` keeps the original name)."""

  layout: str
  tensors: dict[str, TensorRef]
  duplicates: list[str]  # original names whose Hub name another tensor already took


def open_source(src_dir: str) -> Source:
  """Reads every header of the checkpoint and renames its tensors to Hub names."""
  side = {f: p for f, p in TRAINING_SIDE_FILES.items() if os.path.isfile(os.path.join(src_dir, f))}
  main = [ref for path in safetensors_reader.weight_files(src_dir, exclude=tuple(TRAINING_SIDE_FILES))
          for ref in safetensors_reader.read_header(path).values()]
  if side:
    named = [(ref.name, ref) for ref in main]
    named += [(prefix + ref.name, ref) for f, prefix in side.items()
              for ref in safetensors_reader.read_header(os.path.join(src_dir, f)).values()]
    return _collect(TRAINING_LAYOUT, named)
  return from_refs(main, src_dir)


def from_refs(refs: list[TensorRef], where: str) -> Source:
  """Tensors of a one-namespace layout (all but the training layout), renamed to Hub names."""
  layout = detect([ref.name for ref in refs], where)
  return _collect(layout.name, [(_rename(ref.name, layout), ref) for ref in refs])


def detect(names: list[str], where: str) -> Layout:
  for layout in LAYOUTS:
    if any(n.startswith(layout.markers) for n in names):
      return layout
  seen = sorted({".".join(n.split(".")[:2]) for n in names})
  known = "; ".join(f"{l.name} ({', '.join(p + '*' for p in l.markers)})" for l in LAYOUTS)
  raise UnknownLayoutError(
      f"{where}: unknown checkpoint layout; tensor names start with {seen[:12]}"
      f"{' ...' if len(seen) > 12 else ''}; known layouts: {known}; {TRAINING_LAYOUT} "
      f"({' + '.join(TRAINING_SIDE_FILES)})")


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
