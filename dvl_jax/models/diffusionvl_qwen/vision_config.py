"""The SigLIP tower and LLaVA image-packing settings of the DiffusionVL-Qwen family (spec §7.2, §11).

`depth` counts the encoder layers the model runs: DiffusionVL deletes SigLIP-so400m's last layer (27 -> 26)
and takes that output without the post-layernorm, the same as transformers' LLaVA-OneVision with
`vision_feature_layer=-1` on a 26-layer tower. Packing: `image_aspect_ratio` "anyres_max_<n>" (stage 2:
crops + global view, unpadded, downscaled above `n` crops) or "square" (stage 1: one plain resize);
`patch_merge_type` "spatial_unpad" adds the learned `image_newline` per row, "flat" adds none.
"""

from __future__ import annotations

import dataclasses
import re

# DiffusionVL's "(1x1),...,(6x6)": LLaVA expands it to (i, j) for i, j in 1..6 and reads each pair as
# (width, height) in crops; stored here as (rows, cols) in the same order, which breaks best-fit ties.
GRID_1_TO_6 = tuple((j, i) for i in range(1, 7) for j in range(1, 7))


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
  depth: int = 26  # encoder layers run (so400m has 27; the last is removed)
  hidden_size: int = 1152
  num_heads: int = 16
  intermediate_size: int = 4304
  out_hidden_size: int = 3584  # the projector's output: the LM hidden size
  in_channels: int = 3
  patch_size: int = 14
  image_size: int = 384
  layer_norm_eps: float = 1e-6
  image_aspect_ratio: str = "anyres_max_4"  # or "square"
  grid_pinpoints: tuple[tuple[int, int], ...] = GRID_1_TO_6  # (rows, cols) of crops, in best-fit order
  patch_merge_type: str = "spatial_unpad"  # or "flat"

  def __post_init__(self):
    # JSON gives lists; the config is a static jit argument, so it must hash.
    object.__setattr__(self, "grid_pinpoints", tuple(tuple(int(x) for x in p) for p in self.grid_pinpoints))
    if self.image_aspect_ratio != "square" and not re.fullmatch(r"anyres_max_\d+", self.image_aspect_ratio):
      raise ValueError(f"image_aspect_ratio={self.image_aspect_ratio!r}; use 'square' (stage 1) or "
                       "'anyres_max_<n>' (stage 2, DiffusionVL: anyres_max_4)")
    if self.patch_merge_type not in ("spatial_unpad", "flat"):
      raise ValueError(f"patch_merge_type={self.patch_merge_type!r}; use 'spatial_unpad' or 'flat'")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one `pixel_values` row: C * p * p (Conv2d weight order)."""
    return self.in_channels * self.patch_size**2

  @property
  def grid(self) -> int:
    """Patches per side of one crop: 27 for 384 px / 14 (the valid Conv2d drops the last 6 pixels)."""
    return self.image_size // self.patch_size

  @property
  def tokens_per_crop(self) -> int:
    return self.grid**2

  @property
  def anyres(self) -> bool:
    return self.image_aspect_ratio != "square"

  @property
  def max_crops(self) -> int:
    """`n` of anyres_max_n: the unpadded map is downscaled when it exceeds ~1.1x (linear) n crops."""
    return int(self.image_aspect_ratio.rsplit("_", 1)[1]) if self.anyres else 1

  @property
  def newline(self) -> bool:
    return "unpad" in self.patch_merge_type


def pinpoints_from_llava(value: str | list, crop: int) -> tuple[tuple[int, int], ...]:
  """LLaVA's `image_grid_pinpoints` -> (rows, cols) crop multiples, in LLaVA's iteration order.

  A string "(AxB),...,(CxD)" is the range expansion of `mm_utils.get_anyres_image_grid_shape` (pairs in
  crops); a list holds [width, height] pairs in pixels, multiples of the `crop` size.
  """
  if isinstance(value, str) and "x" in value:
    pairs = re.findall(r"\((\d+)x(\d+)\)", value)
    if not pairs:
      raise ValueError(f"image_grid_pinpoints {value!r} has no '(AxB)' pair")
    (a0, b0), (a1, b1) = (tuple(map(int, pairs[0])), tuple(map(int, pairs[-1])))
    return tuple((j, i) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1))
  if isinstance(value, (list, tuple)) and all(len(p) == 2 and p[0] % crop == 0 == p[1] % crop for p in value):
    return tuple((int(h) // crop, int(w) // crop) for w, h in value)
  raise ValueError(f"image_grid_pinpoints {value!r}: expected '(1x1),...,(6x6)' or [[width, height], ...] "
                   f"in multiples of the {crop}-pixel crop")
