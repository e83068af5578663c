"""OpenAI response bodies and Server-Sent Event chunks, for chat (`chat.completion`) and text completions.

An answer is the generated tokens through the first EOS, as `dvl.generate` reports them (`GenerateOutput.lengths`;
block diffusion decodes the rest of the EOS's block too, which no client sees). `usage` adds dvl's speed to
OpenAI's token counts: NFE (model forwards, the prompt's prefill included) and tokens per forward.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable

import numpy as np

from dvl_jax.diffusion.sampling_config import GenerateOutput

DONE = b"data: [DONE]\n\n"


class Answer:
  """The answer of one request as its pieces arrive: tokens through EOS, and the text shown so far (a text
  ending in an incomplete UTF-8 character, U+FFFD, waits for the next piece)."""

  def __init__(self, kind: str, model: str, decode: Callable[[list[int]], str], eos_id: int):
    self.kind, self.model, self.decode, self.eos_id = kind, model, decode, eos_id
    self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    self.created = int(time.time())
    self.tokens: list[int] = []
    self.shown = ""

  def add(self, piece: np.ndarray) -> tuple[list[int], str]:
    """A piece's new tokens (cut after EOS) and the text they add."""
    if self.eos_id in self.tokens:
      return [], ""
    new = [int(t) for t in piece]
    if self.eos_id in new:
      new = new[:new.index(self.eos_id) + 1]
    self.tokens += new
    return new, self._delta(final=False)

  def _delta(self, final: bool) -> str:
    text = self.decode(self.tokens)
    if (text.endswith("\ufffd") and not final) or not text.startswith(self.shown):
      return ""
    delta, self.shown = text[len(self.shown):], text
    return delta

  def body(self, output: GenerateOutput, prompt_tokens: int, token_ids: bool) -> dict[str, Any]:
    """The whole (non-streamed) response."""
    tokens = output.tokens[0, :output.lengths[0]].tolist()
    text = self.decode(tokens)
    choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason(tokens), "logprobs": None}
    if self.kind == "chat":
      choice["message"] = {"role": "assistant", "content": text}
    else:
      choice["text"] = text
    if token_ids:
      choice["token_ids"] = tokens
    return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self.created, "model": self.model, "choices": [choice], "usage": usage(output, prompt_tokens)}

  def chunk(self, tokens: list[int], text: str, token_ids: bool, *, role: bool = False) -> bytes:
    """One streamed piece (`role`: the first chat chunk names the assistant)."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": None, "logprobs": None}
    if self.kind == "chat":
      choice["delta"] = {"role": "assistant", "content": text} if role else {"content": text}
    else:
      choice["text"] = text
    if token_ids:
      choice["token_ids"] = tokens
    return self._event(choice)

  def last_chunk(self, output: GenerateOutput, prompt_tokens: int) -> bytes:
    """The end of a stream: whatever text was held back, the finish reason and the usage."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason(self.tokens), "logprobs": None}
    text = self._delta(final=True)
    if self.kind == "chat":
      choice["delta"] = {"content": text} if text else {}
    else:
      choice["text"] = text
    return self._event(choice, usage=usage(output, prompt_tokens))

  def finish_reason(self, tokens: list[int]) -> str:
    return "stop" if self.eos_id in tokens else "length"

  def _event(self, choice: dict[str, Any], **extra: Any) -> bytes:
    data = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created, "model": self.model, "choices": [choice], **extra}
    return f"data: {json.dumps(data)}\n\n".encode()


def usage(output: GenerateOutput, prompt_tokens: int) -> dict[str, Any]:
  completion = int(output.lengths[0])
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
          "nfe": int(output.nfe[0]), "tokens_per_forward": float(output.tokens_per_forward[0])}


def error_event(message: str, status: int) -> bytes:
  """A stream that cannot finish (timeout, shutdown) ends with an error object, then `[DONE]`."""
  return f"data: {json.dumps({'error': {'message': message, 'code': status}})}\n\n".encode()
