"""Token ids and training labels of one conversation, exactly as DiffusionVL's `preprocess_qwen` (spec §4.2).

Each message is rendered with the per-message template and tokenized on its own; assistant messages
are supervised in full (header and trailing `<|im_end|>\\n` included), and the structural tokens
`\\n`, `<|im_start|>`, `<|im_end|>` are supervised everywhere, even inside system and user turns.
Labels are not shifted: `labels[i]` is the target at position `i`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from dvl_jax.data.chat_template import IM_END, IM_START, SYSTEM_PROMPT, render_message
from dvl_jax.core.batch import IGNORE
from dvl_jax.data.image_tokens import IMAGE_PLACEHOLDER


@dataclasses.dataclass(frozen=True)
class StructuralTokens:
  """Ids of `\\n`, `<|im_start|>`, `<|im_end|>` (198, 151644, 151645 in Qwen's vocabulary)."""

  newline: int
  im_start: int
  im_end: int

  @classmethod
  def from_tokenizer(cls, tokenizer: Any) -> "StructuralTokens":
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if len(newline) != 1:
      raise ValueError(f"the tokenizer splits '\\n' into {newline}; the qwen_2_5 labels need it as one token")
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (IM_START, IM_END)]
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
      raise ValueError(f"the tokenizer has no {IM_START} / {IM_END} tokens; it is not a Qwen (ChatML) tokenizer")
    return cls(newline[0], *ids)

  @property
  def ids(self) -> tuple[int, int, int]:
    return self.newline, self.im_start, self.im_end


def tokenize_conversation(messages: Sequence[tuple[str, str]], encode: Callable[[str], np.ndarray],
                          structural: StructuralTokens) -> tuple[np.ndarray, np.ndarray]:
  """`[(role, content)]` (no system message) -> `(input_ids [n], labels [n])` with one
  `IMAGE_PLACEHOLDER` per `<image>` in `input_ids` (labelled `IGNORE`).

  `encode(text)` tokenizes one rendered message and maps each `<image>` to `IMAGE_PLACEHOLDER`.
  """
  ids, labels = [], []
  for role, content in [("system", SYSTEM_PROMPT), *messages]:
    piece = np.asarray(encode(render_message(role, content)), np.int64)
    ids.append(piece)
    labels.append(piece if role == "assistant" else np.full_like(piece, IGNORE))
  input_ids, target = np.concatenate(ids), np.concatenate(labels)
  target = np.where(np.isin(input_ids, structural.ids), input_ids, target)
  return input_ids, np.where(input_ids == IMAGE_PLACEHOLDER, IGNORE, target)
