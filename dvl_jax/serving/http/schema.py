"""The request bodies of `/v1/chat/completions` and `/v1/completions` (OpenAI's schema plus dvl's decoding
fields), and how a body that does not fit becomes a one-line 4xx.

Types are strict (`"10"` is not a number) and a field this server does not implement is refused by name rather
than ignored: a client that sends `tools`, `logprobs` or a penalty would otherwise get an answer to a different
question than it asked. Values the engine checks (max_tokens, sampling ranges, prompt length) are left to it.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field


MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_CHOICES = 16  # n: a request's choices per prompt
_TYPE_NAME = re.compile(r"^([A-Z]|str$|int$|float$|bool$|.*\[)")  # a union branch in an error's location


class ApiError(Exception):
  """A request the server answers with `status` and a one-line `message` (OpenAI's error body)."""

  def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.kind = status, message, kind

  def body(self) -> dict[str, Any]:
    return {"error": {"message": self.message, "type": self.kind, "code": self.status}}


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
  include_usage: bool = False


class Decoding(_Strict):
  """What both endpoints share: the model, the answer's length, sampling and dvl's own decoding fields
  (None: the server's default, `dvl serve --help`)."""

  model: str
  max_tokens: int | None = None
  max_completion_tokens: int | None = None  # newer clients' name for max_tokens
  temperature: float | None = None
  top_p: float | None = None
  top_k: int | None = None
  seed: int | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  user: str | None = None  # an end-user id: no effect on the answer
  stop: str | list[str] | None = None  # up to MAX_STOP strings: the answer ends before the first one it holds
  n: int = 1  # choices per prompt, up to MAX_CHOICES: choice j samples with seed + j
  # Standard fields accepted only at the value that changes nothing.
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logprobs: bool | int | None = None
  # dvl's decoding (extensions)
  algorithm: str | None = None
  remasking_strategy: str | None = None
  steps: int | None = None
  confidence_threshold: float | None = None
  return_token_ids: bool = False

  @pydantic.model_validator(mode="after")
  def _refuse_what_changes_the_answer(self) -> "Decoding":
    if not 1 <= self.n <= MAX_CHOICES:
      raise ValueError(f"n must be in [1, {MAX_CHOICES}] (choices per prompt), got {self.n}")
    if not all(self.stops) or len(self.stops) > MAX_STOP:
      raise ValueError(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings, got "
                       f"{self.stop!r}")
    if self.presence_penalty or self.frequency_penalty:
      raise ValueError("presence / frequency penalties are not supported; omit them or send 0")
    if self.logprobs:
      raise ValueError("logprobs are not supported; omit logprobs (return_token_ids gives the tokens)")
    if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
      raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
    if self.stream_options is not None and self.stream_options.model_fields_set and not self.stream:  # as vLLM
      raise ValueError("stream_options is only allowed with stream: true; remove it or stream the answer")
    return self

  @property
  def include_usage(self) -> bool:
    """Whether a stream ends with the usage (OpenAI's `stream_options.include_usage`)."""
    return self.stream_options is not None and self.stream_options.include_usage

  @property
  def stops(self) -> tuple[str, ...]:
    return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

  @property
  def answer_tokens(self) -> int | None:
    return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


class ImageUrl(_Strict):
  url: str
  detail: str | None = None  # OpenAI's resolution hint; the checkpoint's pixel bounds decide here


class TextPart(_Strict):
  type: Literal["text"]
  text: str


class ImagePart(_Strict):
  type: Literal["image_url"]
  image_url: ImageUrl


class Message(_Strict):
  role: Literal["system", "developer", "user", "assistant"]  # developer: newer clients' name for system
  content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]
  name: str | None = None

  @property
  def text(self) -> str:
    """The text parts, joined with newlines."""
    content = self.content
    return content if isinstance(content, str) else "\n".join(p.text for p in content if isinstance(p, TextPart))

  @property
  def image_urls(self) -> list[str]:
    return [] if isinstance(self.content, str) else [p.image_url.url for p in self.content if isinstance(p, ImagePart)]


class ChatRequest(Decoding):
  """A conversation: an optional system (or developer) message first, then user and assistant turns ending with
  the user's; images only in user turns."""

  messages: list[Message]

  @pydantic.model_validator(mode="after")
  def _a_conversation_to_answer(self) -> "ChatRequest":
    roles = [m.role for m in self.messages]
    if not roles or roles[-1] != "user":
      raise ValueError(f"messages must end with a user message (the question to answer), got roles {roles}")
    if any(role in ("system", "developer") for role in roles[1:]):
      raise ValueError(f"a system or developer message may only come first, got roles {roles}")
    if any(m.image_urls for m in self.messages if m.role != "user"):
      raise ValueError("only user messages may hold images")
    return self

  @property
  def system(self) -> str | None:
    """The system message's text, if the conversation has one (else the checkpoint's chat format's own)."""
    return self.messages[0].text if self.messages[0].role in ("system", "developer") else None

  @property
  def turns(self) -> list[Message]:
    """The user and assistant messages, in order."""
    return [m for m in self.messages if m.role in ("user", "assistant")]

  @property
  def image_urls(self) -> list[str]:
    return [url for m in self.turns for url in m.image_urls]


class CompletionRequest(Decoding):
  prompt: Any  # a string or a list of token ids, or a list of either (several prompts; checked below: a union's
  # errors would be several lines)

  @pydantic.field_validator("prompt")
  @classmethod
  def _prompts(cls, prompt: Any) -> Any:
    ids = lambda p: isinstance(p, list) and p and all(type(t) is int for t in p)  # noqa: E721,E731 (bool: no token)
    if isinstance(prompt, str) or ids(prompt) or (isinstance(prompt, list) and prompt and (
        all(isinstance(p, str) for p in prompt) or all(ids(p) for p in prompt))):
      return prompt
    raise ValueError("prompt must be a string or a non-empty list of token ids, or a non-empty list of strings or of "
                     "such lists (several prompts)")

  @property
  def prompts(self) -> list[str | list[int]]:
    """The prompts, each a string or token ids."""
    several = isinstance(self.prompt, list) and not isinstance(self.prompt[0], int)
    return list(self.prompt) if several else [self.prompt]


def parse(kind: type[Decoding], body: bytes) -> Decoding:
  """`body` (JSON bytes) -> a validated request, or an `ApiError` 400 naming the first problem."""
  try:
    data = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ApiError(400, f"body is not valid JSON ({e})") from e
  if not isinstance(data, dict):
    raise ApiError(400, f"body must be a JSON object, got {type(data).__name__}")
  try:
    return kind.model_validate(data)
  except pydantic.ValidationError as e:
    raise ApiError(400, _first_error(e)) from e


def _first_error(error: pydantic.ValidationError) -> str:
  """One line: where and what, for the most specific problem (a union's deepest branch), and how many more."""
  errors = error.errors(include_url=False)
  first = max(errors, key=lambda e: len(e["loc"]))
  where = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or not _TYPE_NAME.match(p))
  if first["type"] == "extra_forbidden":
    message = f"unsupported field {where!r}: this server does not implement it; remove it"
  else:
    message = f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}"
  more = len({tuple(e["loc"][:1]) for e in errors}) - 1  # further problems (a union's branches are one)
  return message + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")
