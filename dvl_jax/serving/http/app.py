"""The FastAPI app of `dvl serve`: OpenAI's `/v1/chat/completions`, `/v1/completions` and `/v1/models` over one
`Engine`, plus `/health` and `/metrics`.

Handlers never touch the engine: they parse and check a body (one-line 4xx for anything wrong), build the
prompt off the event loop, hand the request to the engine's `Worker` and wait for its events under the request's
deadline; a client that disconnects, or a deadline that passes, cancels the request and frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import time
from typing import Any, Callable

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from dvl_jax.serving.engine import Engine
from dvl_jax.serving.http.inputs import Inputs
from dvl_jax.serving.http.media import MediaLimits
from dvl_jax.serving.http.metrics import Metrics
from dvl_jax.serving.http.responses import DONE, Answer, Completion, error_event, usage
from dvl_jax.serving.http.schema import ApiError, ChatRequest, CompletionRequest, Decoding, parse
from dvl_jax.serving.http.worker import Event, Ticket, Worker
from dvl_jax.serving.request import SEEDS

log = logging.getLogger("dvl.serve")


@dataclasses.dataclass
class Settings:
  """The server's limits (`dvl serve --help` gives each one's meaning and default); read at every request."""

  model_name: str
  api_key: str | None = None
  max_queue: int = 64
  request_timeout: float = 600.0
  max_body_bytes: int = 64 * 2 ** 20
  max_images: int = 8
  media: MediaLimits = MediaLimits()


class _Disconnected(Exception):
  """The client went away: its request is cancelled and nothing is sent."""


def create_app(engine: Engine, processor: Any, settings: Settings, *, slots: int) -> FastAPI:
  """An app serving `engine` of `slots` slots (its worker thread runs while the app's lifespan does) with
  `processor` (the checkpoint's `dvl.Processor`) building prompts."""
  metrics = Metrics(slots)
  worker = Worker(engine, metrics, settings.max_queue)
  inputs = Inputs(processor, engine.config, settings.media, settings.max_images)
  eos_id = processor.config.eos_token_id

  @contextlib.asynccontextmanager
  async def lifespan(_: FastAPI):
    worker.start()
    yield
    worker.stop()

  app = FastAPI(title="dvl serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
  app.state.settings, app.state.worker, app.state.metrics = settings, worker, metrics

  app.add_middleware(_CountResponses, metrics=metrics)

  @app.exception_handler(ApiError)
  async def _api_error(_: HttpRequest, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(HTTPException)
  async def _http_error(http: HttpRequest, e: HTTPException) -> JSONResponse:
    message = f"{http.method} {http.url.path}: {e.detail}"
    return JSONResponse(ApiError(e.status_code, message).body(), status_code=e.status_code, headers=e.headers)

  @app.get("/health")
  async def health() -> JSONResponse:
    if worker.healthy:
      return JSONResponse({"status": "ok", "slots_busy": engine.busy})
    return JSONResponse({"status": "unavailable", "reason": worker.error or "shutting down"}, status_code=503)

  @app.get("/metrics")
  async def prometheus() -> Response:
    return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

  served = {"id": settings.model_name, "object": "model", "created": int(time.time()), "owned_by": "dvl"}

  @app.get("/v1/models")
  async def models(http: HttpRequest) -> dict[str, Any]:
    _authorize(http, settings)
    return {"object": "list", "data": [served]}

  @app.get("/v1/models/{name:path}")
  async def model(http: HttpRequest, name: str) -> dict[str, Any]:
    """OpenAI's retrieve (`client.models.retrieve`): the served model, else a 404."""
    _authorize(http, settings)
    _check_model(name, settings)
    return served

  @app.post("/v1/chat/completions")
  async def chat(http: HttpRequest) -> Response:
    return await complete(http, ChatRequest, inputs.chat, "chat")

  @app.post("/v1/completions")
  async def completions(http: HttpRequest) -> Response:
    return await complete(http, CompletionRequest, inputs.completion, "text")

  async def complete(http: HttpRequest, kind: type[Decoding], build: Callable, name: str) -> Response:
    _authorize(http, settings)
    body = parse(kind, await _read_body(http, settings.max_body_bytes))
    _check_model(body.model, settings)
    try:
      prompts = await run_in_threadpool(build, body)
    except ValueError as e:
      raise ApiError(400, _one_line(e)) from e
    requests = [dataclasses.replace(r, seed=_choice_seed(r.seed, j)) for r in prompts for j in range(body.n)]
    answers = [Answer(name, inputs.decode, eos_id, body.stops, index) for index in range(len(requests))]
    prompt_tokens = sum(len(r.prompt) for r in prompts)
    deadline = asyncio.get_running_loop().time() + settings.request_timeout
    completion = Completion(name, settings.model_name)
    tickets = worker.submit_all(requests)
    if body.stream:
      try:
        for ticket in tickets:  # accepted, or the engine's 400 before the stream starts
          await _next(worker, ticket, deadline, settings)
      except BaseException:
        for ticket in tickets:
          worker.cancel(ticket)
        raise
      return StreamingResponse(_stream(worker, tickets, deadline, settings, completion, answers, body,
                                       prompt_tokens),
                               media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    gone = asyncio.ensure_future(_disconnect(http))
    events = _Events(worker, tickets, deadline, settings, gone)
    outputs: dict[int, Any] = {}
    try:
      while len(outputs) < len(tickets):
        index, event = await events.next()
        answer = answers[index]
        if event.kind == "piece" and answer.stop:  # watched for its stop sequences
          answer.add(event.value, event.forwards)
          if answer.stopped:
            events.drop(index, "stopped")  # its slot goes to the next request
            outputs[index] = None
        elif event.kind == "finished":
          outputs[index] = event.value
    except _Disconnected:
      return Response(status_code=499)  # nobody reads it
    finally:
      gone.cancel()
      events.close()
    return JSONResponse(completion.body([a.choice(outputs[a.index], body.return_token_ids) for a in answers],
                                        usage(prompt_tokens, [a.usage(outputs[a.index]) for a in answers])))

  return app


class _CountResponses:
  """Counts responses by route and status: a plain ASGI wrapper of `send`, so the handlers get the server's own
  `receive` (the disconnect a cancellation waits for) untouched."""

  ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")  # bounded labels

  def __init__(self, app: Any, metrics: Metrics):
    self.app, self.metrics = app, metrics

  async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    path = scope["path"]
    route = path if path in self.ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"

    async def counted(message: dict) -> None:
      if message["type"] == "http.response.start":
        self.metrics.responses.labels(route, str(message["status"])).inc()
      await send(message)

    await self.app(scope, receive, counted)


async def _stream(worker: Worker, tickets: list[Ticket], deadline: float, settings: Settings, completion: Completion,
                  answers: list[Answer], body: Decoding, prompt_tokens: int):
  """Server-Sent Events: one chunk per final block of a choice (up to a stop sequence), each choice's end with its
  finish reason, then `[DONE]`; a request that times out ends with an error event. As OpenAI's API does, the
  usage is sent only when `stream_options.include_usage` asks for it: in a chunk with no choices before `[DONE]`,
  every other chunk carrying `"usage": null`. Starlette cancels this generator when the client disconnects."""
  extra = {"usage": None} if body.include_usage else {}
  events = _Events(worker, tickets, deadline, settings)
  outputs: dict[int, Any] = {}
  named: set[int] = set()  # choices whose first chunk (naming the assistant) went out
  try:
    while len(outputs) < len(tickets):
      try:
        index, event = await events.next()
      except ApiError as e:
        yield error_event(e.message, e.status)
        break
      answer = answers[index]
      if event.kind == "piece":
        tokens, text = answer.add(event.value, event.forwards)
        yield completion.event([answer.piece(tokens, text, body.return_token_ids, role=index not in named)], **extra)
        named.add(index)
        if answer.stopped:
          events.drop(index, "stopped")
      if event.kind == "finished" or answer.stopped:
        outputs[index] = None if answer.stopped else event.value
        yield completion.event([answer.last_piece()], **extra)
    else:
      if body.include_usage:
        yield completion.event([], usage=usage(prompt_tokens, [a.usage(outputs[a.index]) for a in answers]))
    yield DONE
  finally:
    events.close()


class _Events:
  """The events of a response's tickets, one at a time as they come, as (choice index, event); a failure (a
  passed deadline, the client gone, the engine's refusal) is raised. Each ticket is read by a task of its own
  until its request finishes or is dropped."""

  def __init__(self, worker: Worker, tickets: list[Ticket], deadline: float, settings: Settings,
               gone: asyncio.Future | None = None):
    self.worker, self.tickets = worker, tickets
    self._dropped: set[int] = set()
    self._queue: asyncio.Queue = asyncio.Queue()
    self._tasks = [asyncio.ensure_future(self._read(i, t, deadline, settings, gone)) for i, t in enumerate(tickets)]

  async def _read(self, index: int, ticket: Ticket, deadline: float, settings: Settings,
                  gone: asyncio.Future | None) -> None:
    try:
      while True:
        event = await _next(self.worker, ticket, deadline, settings, gone)
        self._queue.put_nowait((index, event))
        if event.kind == "finished":
          return
    except (ApiError, _Disconnected) as e:
      self._queue.put_nowait((index, e))

  async def next(self) -> tuple[int, Event]:
    while True:
      index, item = await self._queue.get()
      if index not in self._dropped:  # else read before its choice was dropped
        break
    if isinstance(item, BaseException):
      raise item
    return index, item

  def drop(self, index: int, outcome: str) -> None:
    """Ends choice `index`'s request now (`outcome`, for the metrics): nothing more comes from it."""
    self._dropped.add(index)
    self._tasks[index].cancel()
    self.worker.cancel(self.tickets[index], outcome)

  def close(self) -> None:
    for task, ticket in zip(self._tasks, self.tickets):
      task.cancel()
      self.worker.cancel(ticket)


def _choice_seed(seed: int, choice: int) -> int:
  """Choice j's seed: the request's + j, wrapped within the valid seeds (a bad seed is left for the engine to
  refuse)."""
  return seed if choice == 0 or not 0 <= seed < SEEDS else (seed + choice) % SEEDS


async def _next(worker: Worker, ticket: Ticket, deadline: float, settings: Settings,
                gone: asyncio.Future | None = None) -> Event:
  """The ticket's next event; a failure is raised, a passed deadline cancels the request (504), even when the
  next event is already waiting (a loaded event loop may come back only after the engine has finished it)."""
  timeout, done = deadline - asyncio.get_running_loop().time(), set()
  if timeout > 0:
    get = asyncio.ensure_future(ticket.events.get())
    try:
      waits = {get} if gone is None else {get, gone}
      done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
      if not get.done():
        get.cancel()
    if get in done:
      event = get.result()
      if event.kind == "failed":
        raise event.value
      return event
  if gone is not None and gone in done:
    worker.cancel(ticket, "cancelled")
    raise _Disconnected()
  worker.cancel(ticket, "timeout")
  raise ApiError(504, f"the request did not finish within {settings.request_timeout:g} s (--request-timeout); "
                 "ask for fewer max_tokens or retry later", "timeout_error")


async def _disconnect(http: HttpRequest) -> None:
  """Returns when the client closes the connection (after the body, the next ASGI message is the disconnect)."""
  while (await http.receive())["type"] != "http.disconnect":
    pass


async def _read_body(http: HttpRequest, limit: int) -> bytes:
  declared = http.headers.get("content-length", "")
  too_big = ApiError(413, f"request body exceeds the server's limit of {limit} bytes (--max-body-bytes)")
  if declared.isdigit() and int(declared) > limit:
    raise too_big
  chunks, size = [], 0
  async for chunk in http.stream():
    size += len(chunk)
    if size > limit:
      raise too_big
    chunks.append(chunk)
  return b"".join(chunks)


def _authorize(http: HttpRequest, settings: Settings) -> None:
  if settings.api_key is None:
    return
  scheme, _, token = http.headers.get("authorization", "").partition(" ")
  if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
    raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the key "
                   "given to dvl serve --api-key", "authentication_error")


def _check_model(name: str, settings: Settings) -> None:
  if name != settings.model_name:
    raise ApiError(404, f"model {name!r} is not served here; this server serves {settings.model_name!r}",
                   "not_found_error")


def _one_line(error: Exception) -> str:
  return " ".join(str(error).split()) or type(error).__name__
