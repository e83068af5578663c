"""A procedurally generated visual QA data set: coloured shapes in the cells of a 2x2 grid.

Questions ask for a colour, a shape, a position or a count and have one- or two-word answers, so a
tiny model can learn them on a CPU in minutes, yet no answer can be guessed without the image.
Example `i` of seed `s` depends only on `(s, i)` (NumPy generator + PIL drawing, no fonts), so a
different seed is a held-out split. Rows are LLaVA-format and go through the real pipeline, either in
memory (PIL images) or written to disk (PNG files + a JSON file).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from dvl_jax.data.chat_template import SYSTEM_PROMPT
from dvl_jax.data.processor import IMAGE_MARKER

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # cell index = 2 * row + column
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_KINDS = ("color", "shape", "position", "count")


@dataclasses.dataclass(frozen=True)
class Item:
  shape: str
  color: str
  cell: int


@dataclasses.dataclass(frozen=True)
class Example:
  """One image with one question; `kind` is one of `QUESTION_KINDS`."""

  image: Image.Image
  question: str
  answer: str
  kind: str
  items: tuple[Item, ...]
  follow_ups: tuple[tuple[str, str], ...] = ()  # further (question, answer) turns about the same image


def _scene(rng: np.random.Generator, max_items: int) -> tuple[Item, ...]:
  """1..max_items items in distinct cells, no two with the same (shape, colour)."""
  n = int(rng.integers(1, max_items + 1))
  cells = rng.choice(len(POSITIONS), n, replace=False)
  kinds = rng.choice(len(SHAPES) * len(COLORS), n, replace=False)
  colors = list(COLORS)
  return tuple(Item(SHAPES[k // len(COLORS)], colors[k % len(COLORS)], int(c)) for k, c in zip(kinds, cells))


def draw(items: Sequence[Item], size: int, rng: np.random.Generator) -> Image.Image:
  """White canvas of `size` x `size`; each item fills 55-85% of its cell, jittered inside it."""
  image = Image.new("RGB", (size, size), (255, 255, 255))
  pen, cell = ImageDraw.Draw(image), size / 2
  for item in items:
    extent = cell * rng.uniform(0.55, 0.85)
    x0 = (item.cell % 2) * cell + rng.uniform(0, cell - extent)
    y0 = (item.cell // 2) * cell + rng.uniform(0, cell - extent)
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = COLORS[item.color]
    if item.shape == "circle":
      pen.ellipse(box, fill=fill)
    elif item.shape == "square":
      pen.rectangle(box, fill=fill)
    else:
      pen.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
  return image


def _questions(items: Sequence[Item]) -> dict[str, list[tuple[str, str]]]:
  """Every answerable (question, answer) of a scene, by kind."""
  shapes = [it.shape for it in items]
  colors = [it.color for it in items]
  return {
      "color": [(f"What color is the {it.shape}?", it.color) for it in items if shapes.count(it.shape) == 1],
      "shape": [(f"What shape is the {it.color} object?", it.shape) for it in items if colors.count(it.color) == 1],
      "position": [(f"Where is the {it.color} {it.shape}?", POSITIONS[it.cell]) for it in items],
      "count": [("How many shapes are there?", NUMBERS[len(items)])] + [
          (f"How many {s}s are there?", NUMBERS[shapes.count(s)]) for s in SHAPES],
  }


def example(seed: int, index: int, *, image_size: int = 56, max_items: int = 3, turns: int = 1) -> Example:
  """Example `index` of split `seed`: a random scene and a question of a uniformly drawn kind, then up to
  `turns - 1` other questions about the scene (multi-turn rows give a small model several supervised
  answers per image; the first turn does not depend on `turns`)."""
  rng = np.random.default_rng([seed, index])
  items = _scene(rng, max_items)
  by_kind = {k: qs for k, qs in _questions(items).items() if qs}
  kind = sorted(by_kind)[int(rng.integers(len(by_kind)))]
  question, answer = by_kind[kind][int(rng.integers(len(by_kind[kind])))]
  image = draw(items, image_size, rng)
  others = [qa for qs in by_kind.values() for qa in qs if qa[0] != question]
  picked = rng.permutation(len(others))[:turns - 1]
  return Example(image, question, answer, kind, items, tuple(others[i] for i in picked))


def examples(n: int, seed: int, **kwargs: Any) -> list[Example]:
  return [example(seed, i, **kwargs) for i in range(n)]


def llava_row(ex: Example, row_id: str, image: str | Image.Image | None = None) -> dict[str, Any]:
  """The LLaVA row of an example; `image` defaults to the in-memory PIL image."""
  turns = [{"from": "human", "value": f"{IMAGE_MARKER}\n{ex.question}"}, {"from": "gpt", "value": ex.answer}]
  for question, answer in ex.follow_ups:
    turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
  return {"id": row_id, "image": ex.image if image is None else image, "conversations": turns}


def write_dataset(out_dir: str, n: int, seed: int, **kwargs: Any) -> str:
  """Writes `images/{i:06d}.png` and `data.json` (image paths relative to `out_dir`); returns the JSON path."""
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  rows = []
  for i, ex in enumerate(examples(n, seed, **kwargs)):
    name = os.path.join("images", f"{i:06d}.png")
    ex.image.save(os.path.join(out_dir, name))
    rows.append(llava_row(ex, f"synthetic-{seed}-{i}", name))
  path = os.path.join(out_dir, "data.json")
  with open(path, "w") as f:
    json.dump(rows, f)
  return path


def corpus() -> list[str]:
  """Every text the generator can emit plus the system prompt: the vocabulary of a demo tokenizer."""
  scenes = [(Item(s, c, cell),) for s in SHAPES for c in COLORS for cell in range(len(POSITIONS))]
  texts = [f"{q} {a}" for scene in scenes for qs in _questions(scene).values() for q, a in qs]
  return [SYSTEM_PROMPT, "system user assistant", *texts, *NUMBERS]
