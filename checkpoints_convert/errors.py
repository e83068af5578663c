"""User-facing conversion errors: one clear line each (or one headline plus the full list)."""

from __future__ import annotations

from typing import Sequence


class ConversionError(ValueError):
  """Base class: a problem with the user's input, never a bug; the CLI prints it as one line."""


class NotACheckpointError(ConversionError):
  """The source is not a directory holding `config.json` and weights."""


class DestinationExistsError(ConversionError):
  """The output directory exists and `overwrite=True` was not given."""


class OutputIsInputError(ConversionError):
  """The output directory is an input directory or holds one (with `overwrite=True` it would delete it)."""


class UnknownLayoutError(ConversionError):
  """The tensor names match none of the known checkpoint layouts."""


class CorruptCheckpointError(ConversionError):
  """A safetensors file is truncated or its header is invalid."""


class WeightsMismatchError(ConversionError):
  """The weights do not fit `config.json`: every missing, unexpected and mis-shaped tensor at once."""

  def __init__(self, source: str, *, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
               mismatched: Sequence[str] = ()):
    self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
    counts = [f"{len(v)} {k}" for k, v in (("missing", self.missing), ("unexpected", self.unexpected),
                                            ("mismatched", self.mismatched)) if v]
    lines = [f"{source}: the weights do not match config.json ({', '.join(counts)})"]
    lines += [f"  missing:    {m}" for m in self.missing]
    lines += [f"  unexpected: {u}" for u in self.unexpected]
    lines += [f"  mismatched: {s}" for s in self.mismatched]
    super().__init__("\n".join(lines))
