"""OpenAI response bodies and Server-Sent Event chunks, for chat (`chat.completion`) and text completions.

An answer is the generated tokens through the first EOS, as `dvl.generate` reports them (`GenerateOutput.lengths`;
block diffusion decodes the rest of the EOS's block too, which no client sees). With stop sequences it ends
earlier, at the first token after which its text holds one of them: its text stops before that sequence (as
OpenAI's does), its token ids run through that token. `usage` adds dvl's speed to OpenAI's token counts: NFE
(model forwards, the prompt's prefill included) and tokens per forward.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable, Sequence

import numpy as np

from dvl_jax.diffusion.sampling_config import GenerateOutput

DONE = b"data: [DONE]\n\n"


class Answer:
  """One choice of a response as its request's pieces arrive: tokens through EOS or a stop sequence, and the
  text shown so far (a text ending in an incomplete UTF-8 character, U+FFFD, or in what may begin a stop
  sequence waits for the next piece)."""

  def __init__(self, kind: str, decode: Callable[[list[int]], str], eos_id: int, stop: Sequence[str] = (),
               index: int = 0):
    self.kind, self.decode, self.eos_id, self.stop, self.index = kind, decode, eos_id, tuple(stop), index
    self.tokens: list[int] = []
    self.shown = ""
    self.stopped_at: int | None = None  # where the text ends once a stop sequence was met
    self.forwards = 0  # the request's forwards when its last piece was handed out

  @property
  def stopped(self) -> bool:
    return self.stopped_at is not None

  def add(self, piece: np.ndarray, forwards: int = 0) -> tuple[list[int], str]:
    """A piece's new tokens (cut after EOS or the token that completes a stop sequence) and the text they add;
    `forwards`: the request's forwards so far."""
    if self.eos_id in self.tokens or self.stopped:
      return [], ""
    new = [int(t) for t in piece]
    if self.eos_id in new:
      new = new[:new.index(self.eos_id) + 1]
    before, self.forwards = len(self.tokens), forwards
    self.tokens += new
    text = self.decode(self.tokens)
    if self.stop and self._stop_in(text) is not None:
      end = next(n for n in range(before + 1, len(self.tokens) + 1) if self._stop_in(self.decode(self.tokens[:n]))
                 is not None)
      self.tokens, text = self.tokens[:end], self.decode(self.tokens[:end])
      self.stopped_at = self._stop_in(text)
      new = new[:end - before]
    return new, self._delta(text, final=False)

  def _stop_in(self, text: str) -> int | None:
    """Where the first stop sequence in `text` begins, if any."""
    return min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=None)

  def _cut(self, decoded: str) -> str:
    """`decoded` up to where a stop sequence was met."""
    return decoded if self.stopped_at is None else decoded[:self.stopped_at]

  def _delta(self, decoded: str, final: bool) -> str:
    """What of `decoded` (all tokens' text) is new since the last delta."""
    text = self._cut(decoded)
    if not (final or self.stopped):  # hold back what may still turn out to begin a stop sequence
      text = text[:len(text) - max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])),
                                   default=0)]
      if text.endswith("\ufffd"):
        return ""
    if not text.startswith(self.shown):
      return ""
    delta, self.shown = text[len(self.shown):], text
    return delta

  def choice(self, output: GenerateOutput | None, token_ids: bool) -> dict[str, Any]:
    """The whole choice (a non-streamed response): of `output`, or of the pieces if a stop sequence ended them."""
    tokens = self.tokens if self.stopped else output.tokens[0, :output.lengths[0]].tolist()
    text = self._cut(self.decode(tokens))
    return self._choice(text, self.finish_reason(tokens), tokens if token_ids else None, "message")

  def piece(self, tokens: list[int], text: str, token_ids: bool, *, role: bool = False) -> dict[str, Any]:
    """One streamed piece (`role`: the first chat chunk names the assistant)."""
    return self._choice(text, None, tokens if token_ids else None, "delta", role)

  def last_piece(self) -> dict[str, Any]:
    """The end of a stream: whatever text was held back, and the finish reason."""
    text = self._delta(self.decode(self.tokens), final=True)
    return self._choice(text, self.finish_reason(self.tokens), None, "delta", empty=not text)

  def _choice(self, text: str, finish: str | None, tokens: list[int] | None, field: str, role: bool = False,
              empty: bool = False) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": self.index, "finish_reason": finish, "logprobs": None}
    if self.kind == "chat":
      named = {"role": "assistant"} if role or field == "message" else {}
      choice[field] = {} if empty else {**named, "content": text}
    else:
      choice["text"] = text
    if tokens is not None:
      choice["token_ids"] = tokens
    return choice

  def finish_reason(self, tokens: list[int]) -> str:
    return "stop" if self.stopped or self.eos_id in tokens else "length"

  def usage(self, output: GenerateOutput | None) -> tuple[int, int, int]:
    """(completion tokens, forwards, tokens decoded): of `output`, or, when a stop sequence ended the answer, its
    tokens through the stop and the forwards run until then."""
    if self.stopped:
      return len(self.tokens), self.forwards, len(self.tokens)
    nfe = int(output.nfe[0])
    return int(output.lengths[0]), nfe, round(float(output.tokens_per_forward[0]) * max(nfe, 1))


class Completion:
  """What a response's choices share: its id, time and model, and OpenAI's envelopes around them."""

  def __init__(self, kind: str, model: str):
    self.kind, self.model = kind, model
    self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    self.created = int(time.time())

  def body(self, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
    """The whole (non-streamed) response."""
    return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self.created, "model": self.model, "choices": choices, "usage": usage}

  def event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
    data = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created, "model": self.model, "choices": choices, **extra}
    return f"data: {json.dumps(data)}\n\n".encode()


def usage(prompt_tokens: int, parts: Sequence[tuple[int, int, int]]) -> dict[str, Any]:
  """OpenAI's token counts over a response's choices (`Answer.usage` each) plus dvl's NFE (their forwards,
  prefills included) and tokens per forward (tokens decoded over forwards)."""
  completion, forwards, decoded = (sum(part[k] for part in parts) for k in range(3))
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
          "nfe": forwards, "tokens_per_forward": decoded / max(forwards, 1)}


def error_event(message: str, status: int) -> bytes:
  """A stream that cannot finish (timeout, shutdown) ends with an error object, then `[DONE]`."""
  return f"data: {json.dumps({'error': {'message': message, 'code': status}})}\n\n".encode()
