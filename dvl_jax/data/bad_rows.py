"""Rows a long training run must survive: skipped, counted by kind and warned about, never raised.

Large LLaVA mixtures always contain a few broken rows; one of them must not end a week-long run,
but silently dropping data hides a broken image folder. Every kind is counted so the totals can be
logged with the training metrics.
"""

from __future__ import annotations

import collections
import logging

log = logging.getLogger(__name__)

MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
EMPTY_ANSWER = "empty_answer"
MALFORMED_CONVERSATION = "malformed_conversation"
KINDS = (MISSING_IMAGE, UNREADABLE_IMAGE, EMPTY_ANSWER, MALFORMED_CONVERSATION)

_WARN_FIRST = 5  # per kind; afterwards only every power of ten, so a bad folder cannot flood the log


class BadRow(Exception):
  """A data row that cannot be trained on; `kind` is one of `KINDS`."""

  def __init__(self, kind: str, detail: str):
    if kind not in KINDS:
      raise ValueError(f"unknown bad-row kind {kind!r}; expected one of {KINDS}")
    super().__init__(f"{kind}: {detail}")
    self.kind, self.detail = kind, detail


class BadRowCounter:
  """Counts of skipped rows per kind, with a rate-limited warning for each one."""

  def __init__(self, counts: dict[str, int] | None = None):
    self.counts = collections.Counter({kind: 0 for kind in KINDS})
    self.counts.update(counts or {})

  def add(self, error: BadRow, row_id: str) -> None:
    self.counts[error.kind] += 1
    n = self.counts[error.kind]
    if n <= _WARN_FIRST or _is_power_of_ten(n):
      log.warning("skipping row %s (%s so far: %d): %s", row_id, error.kind, n, error.detail)

  def as_dict(self) -> dict[str, int]:
    return {kind: int(self.counts[kind]) for kind in KINDS}

  @property
  def total(self) -> int:
    return sum(self.counts.values())


def _is_power_of_ten(n: int) -> bool:
  while n % 10 == 0 and n > 1:
    n //= 10
  return n == 1
