"""A procedurally generated visual QA data set: copies of one coloured shape in the cells of a 2x2 grid.

Questions ask for the colour, the shape, the number of copies, (with one copy) the position, or a
description ("three blue squares"), with one- to three-word answers; none can be guessed without the
image. The descriptions are the default kinds' longest answers. The opt-in kind "cells" ("Where are the
shapes?") describes every cell in reading order, each as "the", its place and two words, the cells separated
by commas ("the top left red circle , the top right zero shapes , ..."): 23 tokens whatever the scene, an answer
long enough for block diffusion to decode several tokens per forward, and with its EOS exactly three 8-token
blocks (a block diffusion decoder pays a whole forward for a last block that holds one token, as the 16-word
first version did with its 17th). Its width is fixed so that every word's position is known before any word is
decoded: a parallel decoder fills in the places confidently and each cell's two words from that cell's image
token alone (with "one red circle" for an occupied cell and "zero shapes" for an empty one, a later word's
position depended on how many cells before it were occupied, and block diffusion learned it far slower than
AR did). It is drawn only when asked for (`kinds=ALL_KINDS`), so the default splits stay as they were, and it
uses only words the other kinds already have, so `corpus()` and every tokenizer built from it are unchanged.
The design keeps the task learnable by a from-scratch 4-layer model within the demo's CPU budget, which the
first version (up to three different shapes, questions binding one attribute to another) was not:

- the four cells have different grey backgrounds, so each merged image token shows its own cell. The
  ViT has only 2-D RoPE and no absolute position, so on a uniform background "top left" could only be
  told from the token's place in the sequence, which a small LM learns slowly;
- every scene repeats one (shape, colour), so an answer reads one attribute of any occupied cell
  instead of first finding the cell that holds another attribute.

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
IMAGE_SIZE = 56  # pixels: 4x4 ViT patches, one merged token per grid cell
CELL_GREYS = (255, 205, 155, 105)  # background of each cell, by cell index
# An item's size as a fraction of its cell's side: large, because the shapes must be told apart from
# 14-px patches (at 0.55-0.85 the demo's model named the shape right 66% of the time after 800 steps, 97% here).
ITEM_EXTENT = (0.7, 0.95)
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_KINDS = ("color", "shape", "position", "count", "describe")  # drawn by default
ALL_KINDS = (*QUESTION_KINDS, "cells")
# tokens per cell in a "cells" answer: "the", the place (two), "COLOR SHAPE" or "zero shapes", and a comma but
# after the last cell. The leading "the" keeps the answer's first words apart from the "position" answers
# ("top left"): with "top left is red circle , ..." the block-diffusion model answered "top left" to every
# "Where is the shape?" (66% right, AR 100%).
CELL_WORDS = 6
# The "cells" question's chat prompt is 40 tokens with the demo's 56-px image, a whole number of 8-token blocks, so
# its answer and EOS fill exactly three blocks. Block diffusion's blocks sit at absolute positions: with "Where are
# the shapes?" (38 tokens) the first block held the prompt's last 6 tokens and 2 of the answer's, and the same 24
# tokens took four blocks, one forward more (5 instead of 4, prefill included).
QUESTIONS = {"color": "What color do you see?", "shape": "What shape do you see?",
             "position": "Where is the shape?", "count": "How many shapes are there?",
             "describe": "Describe the image.", "cells": "Where do you see the shapes?"}


@dataclasses.dataclass(frozen=True)
class Item:
  shape: str
  color: str
  cell: int


@dataclasses.dataclass(frozen=True)
class Example:
  """One image with one question; `kind` is one of `ALL_KINDS`."""

  image: Image.Image
  question: str
  answer: str
  kind: str
  items: tuple[Item, ...]


def answer(kind: str, items: Sequence[Item]) -> str:
  """The answer to the `kind` question about a scene (position: of its first item; cells: `CELL_WORDS` tokens
  per cell, spaced as the demo's word tokenizer decodes them)."""
  if kind == "cells":
    held = {item.cell: item for item in items}
    return " , ".join(f"the {place} {held[cell].color} {held[cell].shape}" if cell in held
                      else f"the {place} zero shapes" for cell, place in enumerate(POSITIONS))
  if kind == "describe":
    return f"{NUMBERS[len(items)]} {items[0].color} {items[0].shape}{'s' if len(items) > 1 else ''}"
  return {"color": items[0].color, "shape": items[0].shape, "position": POSITIONS[items[0].cell],
          "count": NUMBERS[len(items)]}[kind]


def draw(items: Sequence[Item], size: int, rng: np.random.Generator) -> Image.Image:
  """Grey-shaded cells of a `size` x `size` canvas; each item spans `ITEM_EXTENT` of its cell's side,
  jittered inside it."""
  image = Image.new("RGB", (size, size))
  pen, cell = ImageDraw.Draw(image), size / 2
  for index, grey in enumerate(CELL_GREYS):
    x0, y0 = (index % 2) * cell, (index // 2) * cell
    pen.rectangle((x0, y0, x0 + cell, y0 + cell), fill=(grey, grey, grey))
  for item in items:
    extent = cell * rng.uniform(*ITEM_EXTENT)
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


def example(seed: int, index: int, *, image_size: int = IMAGE_SIZE, max_items: int = 3,
            kinds: Sequence[str] = QUESTION_KINDS) -> Example:
  """Example `index` of split `seed`: a question kind drawn uniformly from `kinds`, then a scene of
  1..max_items copies of a random coloured shape (one copy for a position question, so it has one answer)."""
  unknown = sorted(set(kinds) - set(ALL_KINDS))
  if unknown or not kinds:
    raise ValueError(f"question kinds must be among {', '.join(ALL_KINDS)}; got {list(kinds)}")
  rng = np.random.default_rng([seed, index])
  kind = kinds[int(rng.integers(len(kinds)))]
  n = 1 if kind == "position" else int(rng.integers(1, max_items + 1))
  cells = rng.choice(len(POSITIONS), n, replace=False)
  shape, color = SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))]
  items = tuple(Item(shape, color, int(c)) for c in cells)
  return Example(draw(items, image_size, rng), QUESTIONS[kind], answer(kind, items), kind, items)


def examples(n: int, seed: int, **kwargs: Any) -> list[Example]:
  return [example(seed, i, **kwargs) for i in range(n)]


def llava_row(ex: Example, row_id: str, image: str | Image.Image | None = None) -> dict[str, Any]:
  """The LLaVA row of an example; `image` defaults to the in-memory PIL image."""
  turns = [{"from": "human", "value": f"{IMAGE_MARKER}\n{ex.question}"}, {"from": "gpt", "value": ex.answer}]
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
  return [SYSTEM_PROMPT, "system user assistant", *QUESTIONS.values(), *COLORS, *SHAPES, *(f"{s}s" for s in SHAPES), *POSITIONS, *NUMBERS]
