"""Images of chat requests: `data:` URLs, or local files under an explicit `--allowed-local-media-path`.

The server never fetches a URL (a request must not make it reach the network) and checks an image's size
before decoding it: the bytes of the payload first, then the pixel count from the header alone, so a small
file that decompresses to a huge bitmap is refused before it takes the memory.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import urllib.parse
from typing import Any


class MediaError(ValueError):
  """An image the server refuses: the message names the problem and the fix (a 400)."""


@dataclasses.dataclass(frozen=True)
class MediaLimits:
  """`max_bytes`: an image's encoded size; `max_pixels`: width x height; `local_root`: the one folder local
  files may come from (None: no local files)."""

  max_bytes: int = 20 * 2 ** 20
  max_pixels: int = 4096 * 4096
  local_root: str | None = None


def load_image(url: str, limits: MediaLimits) -> Any:
  """`url` (`data:image/...;base64,...`, `file:///abs/path`) -> an RGB PIL image, within `limits`."""
  if url.startswith("data:"):
    return _decode(_data_url_bytes(url, limits.max_bytes), limits)
  scheme = urllib.parse.urlsplit(url).scheme
  if scheme == "file":
    return _decode(_local_bytes(urllib.parse.unquote(urllib.parse.urlsplit(url).path), limits), limits)
  if scheme in ("http", "https"):
    raise MediaError("image URLs are not fetched (no network access); send the image as a data: URL "
                     "(data:image/png;base64,...)")
  raise MediaError(f"unsupported image URL {url[:40]!r}; use a data: URL (data:image/png;base64,...) or a file:// "
                   "path under --allowed-local-media-path")


def _data_url_bytes(url: str, max_bytes: int) -> bytes:
  header, sep, payload = url.partition(",")
  if not sep or not header.endswith(";base64"):
    raise MediaError("an image data: URL looks like data:image/png;base64,<base64 bytes>")
  if len(payload) * 3 // 4 > max_bytes:  # the decoded size, known before decoding
    raise MediaError(f"image of about {len(payload) * 3 // 4} bytes exceeds the server's limit of {max_bytes} bytes")
  try:
    return base64.b64decode(payload, validate=True)
  except (binascii.Error, ValueError) as e:
    raise MediaError(f"image data: URL is not valid base64 ({e})") from e


def _local_bytes(path: str, limits: MediaLimits) -> bytes:
  if limits.local_root is None:
    raise MediaError("local image files are disabled; start the server with --allowed-local-media-path DIR, "
                     "or send the image as a data: URL")
  real, root = os.path.realpath(path), os.path.realpath(limits.local_root)
  if os.path.commonpath([real, root]) != root:
    raise MediaError(f"image {path} is outside --allowed-local-media-path {limits.local_root}")
  if not os.path.isfile(real):
    raise MediaError(f"image {path} does not exist")
  if os.path.getsize(real) > limits.max_bytes:
    raise MediaError(f"image {path} of {os.path.getsize(real)} bytes exceeds the server's limit of "
                     f"{limits.max_bytes} bytes")
  with open(real, "rb") as f:
    return f.read()


def _decode(data: bytes, limits: MediaLimits) -> Any:
  from PIL import Image, UnidentifiedImageError

  try:
    image = Image.open(io.BytesIO(data))  # reads the header only
  except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
    raise MediaError(f"image is not a format PIL can decode ({type(e).__name__})") from e
  width, height = image.size
  if width * height > limits.max_pixels:
    raise MediaError(f"image of {width}x{height} pixels exceeds the server's limit of {limits.max_pixels} pixels")
  try:
    return image.convert("RGB")
  except (OSError, ValueError) as e:
    raise MediaError(f"image data is truncated or corrupt ({type(e).__name__})") from e
