"""Evaluation through a `dvl serve` server (`dvl eval --server URL`), over its OpenAI-compatible chat API.

Each sample is one `POST /v1/chat/completions`: the task's prompt text (what the in-process runner hands to
`dvl.generation_prompt`) and the images as PNG `data:` URLs, the decoder's settings in dvl's extension fields,
and `return_token_ids`. The server builds the same prompt and decodes it with the same model, so a greedy
answer, its NFE and its length equal the in-process ones. `batch_size` requests are in flight at once (a
thread pool), so the server's slots stay full; each answer's seconds are the wall time since the previous
answer finished, so a run's seconds add up to its wall time, as the in-process batches' do.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import threading
import time
from typing import Any, Iterator, Sequence

import requests
from PIL import Image

from dvl_jax.diffusion.sampling_config import SamplingConfig
from dvl_jax.evaluation.runner import Answer
from dvl_jax.evaluation.task import Sample, Task

def png_data_url(image: Image.Image) -> str:
  """The image as a lossless `data:image/png;base64,...` URL."""
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_body(task: Task, sample: Sample, config: SamplingConfig, model: str) -> dict[str, Any]:
  """The `/v1/chat/completions` body that asks the server for `config`'s answer to `sample`."""
  content = [{"type": "text", "text": task.prompt(sample)},
             *({"type": "image_url", "image_url": {"url": png_data_url(image)}} for image in sample.images)]
  return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": config.gen_length,
          "temperature": config.temperature, "top_k": config.top_k, "seed": 0,
          "algorithm": config.algorithm, "remasking_strategy": config.remasking_strategy,
          "steps": config.steps, "confidence_threshold": config.confidence_threshold, "return_token_ids": True}


@dataclasses.dataclass
class Server:
  """An answerer (`runner.Answerer`) backed by the server at `url`; `api_key` for a server started with one;
  `timeout` bounds one request (seconds)."""

  url: str
  api_key: str | None = None
  timeout: float = 600.0

  def __post_init__(self):
    self.url = self.url.rstrip("/")
    self._local = threading.local()  # a requests.Session per thread (sessions are not thread-safe), kept alive
    self._model: str | None = None

  def model(self) -> str:
    """The served model's name (`GET /v1/models`); also checks that the server answers."""
    if self._model is None:
      self._model = self._call("GET", "/v1/models")["data"][0]["id"]
    return self._model

  def answer(self, task: Task, sample: Sample, config: SamplingConfig) -> Answer:
    """One sample's answer; `seconds` is left 0 (the caller knows the wall time)."""
    reply = self._call("POST", "/v1/chat/completions", chat_body(task, sample, config, self.model()))
    usage = reply["usage"]
    return Answer(reply["choices"][0]["message"]["content"], int(usage["nfe"]), int(usage["completion_tokens"]), 0.0)

  def __call__(self, task: Task, samples: Sequence[Sample], config: SamplingConfig,
               batch_size: int) -> Iterator[tuple[Sample, Answer]]:
    self.answer(task, samples[0], config)  # warm-up, untimed: the server may compile this decoder's program
    with concurrent.futures.ThreadPoolExecutor(max_workers=batch_size) as pool:
      futures = {pool.submit(self.answer, task, s, config): s for s in samples}
      last = time.perf_counter()
      try:
        for future in concurrent.futures.as_completed(futures):
          answer = future.result()
          now = time.perf_counter()
          yield futures[future], answer._replace(seconds=now - last)
          last = now
      finally:  # an error or Ctrl-C: drop the requests not yet sent
        pool.shutdown(wait=True, cancel_futures=True)

  def _session(self) -> requests.Session:
    session = getattr(self._local, "session", None)
    if session is None:
      session = self._local.session = requests.Session()
      if self.api_key:
        session.headers["Authorization"] = f"Bearer {self.api_key}"
    return session

  def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
      response = self._session().request(method, self.url + path, json=body, timeout=self.timeout)
    except requests.RequestException as e:
      raise ConnectionError(f"no answer from the server at {self.url} ({type(e).__name__}); start it with "
                            "`dvl serve --checkpoint DIR` or fix --server") from None
    if not response.ok:
      try:
        message = response.json()["error"]["message"]
      except (ValueError, KeyError, TypeError):
        message = response.text[:200]
      raise RuntimeError(f"the server at {self.url} answered {method} {path} with {response.status_code}: {message}")
    return response.json()
