"""Request bodies -> engine `Request`s, the prompt built exactly as `dvl generate` and the evaluator build it.

A chat request's messages are the conversation, each message's text parts joined with newlines and its image
parts its images, in order: the prompt is `conversation_prompt` of its turns under its system message (else the
checkpoint's chat format's own) run through the checkpoint's `dvl.Processor`. One user message is
`dvl.generation_prompt(question, n_images)`, so a greedy answer through the server is the token-for-token answer
of `dvl.generate` (a message that already places its `<image>` markers keeps them, as the evaluator's tasks do).
A completion's prompts (one or several) are raw text or token ids, with no chat template. Decoding settings a
request leaves out take the server's defaults.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import numpy as np

from dvl_jax.data.chat_template import SYSTEM_PROMPT, conversation_prompt
from dvl_jax.data.processor import IMAGE_MARKER
from dvl_jax.diffusion.sampling_config import SamplingConfig
from dvl_jax.serving.http.media import MediaLimits, load_image
from dvl_jax.serving.http.schema import ChatRequest, CompletionRequest, Decoding
from dvl_jax.serving.request import Request

PER_REQUEST = ("algorithm", "remasking_strategy", "steps", "confidence_threshold", "temperature", "top_p", "top_k")


class Inputs:
  """Builds `Request`s with `processor` (a `dvl.Processor`); `defaults`: the engine's `SamplingConfig`."""

  def __init__(self, processor: Any, defaults: SamplingConfig, limits: MediaLimits, max_images: int):
    self.processor, self.defaults, self.limits, self.max_images = processor, defaults, limits, max_images
    self._lock = threading.Lock()  # a fast tokenizer refuses concurrent calls ("Already borrowed")
    self._decoder = copy.deepcopy(processor.tokenizer)  # the event loop's own: decoding never waits for an image

  def chat(self, body: ChatRequest) -> list[Request]:
    """The request of the conversation (one); raises `ValueError` (a 400) for a bad image or a prompt the
    processor refuses."""
    urls = body.image_urls
    if len(urls) > self.max_images:
      raise ValueError(f"{len(urls)} images exceed the server's limit of {self.max_images} per request "
                       "(--max-images)")
    images = [load_image(url, self.limits) for url in urls]
    turns = [(m.role, m.text, 0 if IMAGE_MARKER in m.text else len(m.image_urls)) for m in body.turns]
    prompt = conversation_prompt(turns, SYSTEM_PROMPT if body.system is None else body.system)
    with self._lock:
      inputs = self.processor([prompt], [images])
    return [self._request(inputs["input_ids"][0], body, inputs["pixel_values"], inputs["image_grid_thw"])]

  def completion(self, body: CompletionRequest) -> list[Request]:
    """A request per prompt."""
    return [self._completion(prompt, body) for prompt in body.prompts]

  def _completion(self, prompt: str | list[int], body: CompletionRequest) -> Request:
    if isinstance(prompt, str):
      with self._lock:
        ids = self.processor([prompt], [[]])["input_ids"][0]
      return self._request(ids, body)
    cfg = self.processor.config
    bad = [t for t in prompt if not 0 <= t < cfg.text.vocab_size or t in (cfg.image_token_id, cfg.video_token_id)]
    if bad:
      raise ValueError(f"prompt token {bad[0]} is not a text token of this model (ids 0..{cfg.text.vocab_size - 1}, "
                       "no image tokens: send images to /v1/chat/completions)")
    return self._request(np.asarray(prompt), body)

  def decode(self, tokens: Any) -> str:
    """Generated ids -> text, as `dvl.generate(..., tokenizer=)` decodes them (on the event loop's thread only)."""
    return self._decoder.decode(list(tokens), skip_special_tokens=True)

  def _request(self, ids: np.ndarray, body: Decoding, pixel_values: Any = None, image_grid_thw: Any = None) -> Request:
    settings = {name: getattr(self.defaults, name) if getattr(body, name) is None else getattr(body, name)
                for name in PER_REQUEST}
    tokens = body.answer_tokens
    return Request([int(t) for t in ids], max_tokens=self.defaults.gen_length if tokens is None else tokens,
                   seed=body.seed or 0, pixel_values=pixel_values, image_grid_thw=image_grid_thw, **settings)
