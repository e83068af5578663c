"""The thread that owns the engine: the engine is not thread-safe, so one thread submits, cancels and steps it
while HTTP handlers on the event loop hand requests over through a queue and get their events back.

Each request travels as a `Ticket`: the handler's `submit` puts it in the inbox (or refuses with 429 when
`max_queue` requests already wait for a slot), the worker submits it to the engine between steps and sends
events back through the handler's loop: `accepted` or `failed` (the engine's `ValueError`: a 400), then
`piece` per final block and `finished` with the `GenerateOutput`. A handler whose client left or whose time ran
out, or whose answer reached a stop sequence, sends `cancel`, which frees the request's slot at the next step
boundary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, NamedTuple

from dvl_jax.core import mappings
from dvl_jax.serving.engine import Engine
from dvl_jax.serving.http.metrics import Metrics
from dvl_jax.serving.http.schema import ApiError
from dvl_jax.serving.request import Request

log = logging.getLogger("dvl.serve")
IDLE_WAIT = 0.05  # seconds an idle worker waits for the inbox before checking whether to stop


class Event(NamedTuple):
  kind: str  # "accepted" | "piece" | "finished" | "failed"
  value: Any = None  # piece: tokens [n]; finished: GenerateOutput; failed: ApiError
  forwards: int = 0  # piece: the request's forwards so far (prefill included)


@dataclasses.dataclass(eq=False)
class Ticket:
  """One request between its handler (on `loop`) and the worker thread."""

  request: Request
  loop: asyncio.AbstractEventLoop
  events: asyncio.Queue
  handed: float  # time.monotonic() of the hand-off
  rid: int | None = None  # the engine's id once submitted
  first: float | None = None  # time of the first piece
  queued: bool = True  # counted among the requests waiting for a slot
  cancelled: str | None = None  # why its handler dropped it: "cancelled" (the client left), "timeout", "stopped"
  over: bool = False  # finished, failed or cancelled (set by the worker): nothing more comes

  def put(self, event: Event) -> None:
    try:
      self.loop.call_soon_threadsafe(self.events.put_nowait, event)
    except RuntimeError:  # the handler's loop is closed: nobody is listening
      pass


class Worker:
  """Steps `engine` on its own thread; `max_queue` bounds the requests handed over but not yet in a slot."""

  def __init__(self, engine: Engine, metrics: Metrics, max_queue: int):
    self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
    self._inbox: queue.SimpleQueue = queue.SimpleQueue()
    self._lock = threading.Lock()
    self._waiting = 0
    self._tickets: dict[int, Ticket] = {}  # engine id -> ticket (worker thread only)
    self._stop = threading.Event()
    self.error: str | None = None
    self._thread = threading.Thread(target=self._run, name="dvl-serve-engine", daemon=True)

  @property
  def healthy(self) -> bool:
    return self._thread.is_alive() and self.error is None and not self._stop.is_set()

  def start(self) -> None:
    self._thread.start()

  def stop(self) -> None:
    """Stops stepping (after the current step); requests still in the engine fail with 503 (the grace period was
    spent before)."""
    self._stop.set()
    self._thread.join()

  def submit(self, request: Request) -> Ticket:
    """Hands `request` to the worker (on the handler's event loop) -> its ticket; 429 / 503 as an `ApiError`."""
    return self.submit_all([request])[0]

  def submit_all(self, requests: list[Request]) -> list[Ticket]:
    """Hands over every request of one HTTP request, or none: a 429 when they do not all fit in the queue."""
    if not self.healthy:
      raise ApiError(503, self.error or "the server is shutting down; retry on another replica", "server_error")
    if len(requests) > max(self.max_queue, 1):  # could never fit (one request alone is merely "busy")
      raise ApiError(400, f"this request asks for {len(requests)} answers (prompts x n), more than the server queues "
                     f"(--max-queue {self.max_queue}); send fewer prompts or a smaller n")
    with self._lock:
      if self._waiting + len(requests) > self.max_queue:
        raise ApiError(429, f"the server is busy: {self._waiting} requests already wait for a slot (--max-queue "
                       f"{self.max_queue}); retry later", "rate_limit_error")
      self._waiting += len(requests)
    tickets = [Ticket(r, asyncio.get_running_loop(), asyncio.Queue(), time.monotonic()) for r in requests]
    for ticket in tickets:
      self._inbox.put(("submit", ticket))
    return tickets

  def cancel(self, ticket: Ticket, outcome: str = "cancelled") -> None:
    """Drops `ticket`'s request wherever it is (`outcome`: "cancelled", "timeout" or "stopped", for the
    metrics)."""
    if not (ticket.over or ticket.cancelled):
      ticket.cancelled = outcome
      self._inbox.put(("cancel", ticket))

  def _run(self) -> None:
    try:
      while not self._stop.is_set():
        engine = self.engine
        self._drain(block=not (engine.busy or engine.waiting))
        if engine.busy or engine.waiting:
          self._deliver(engine.step())
        with self._lock:
          self.metrics.queue.set(self._waiting)
        self.metrics.busy.set(engine.busy)
    except Exception as e:  # noqa: BLE001 - the engine is unusable now: every request learns why, /health says 503
      self.error = f"the engine failed: {type(e).__name__}: {e}"
      log.exception("engine failed")
    finally:
      self._fail_everything()

  def _drain(self, block: bool) -> None:
    try:
      command, ticket = self._inbox.get(timeout=IDLE_WAIT) if block else self._inbox.get_nowait()
      while True:
        self._handle(command, ticket)
        command, ticket = self._inbox.get_nowait()
    except queue.Empty:
      pass

  def _handle(self, command: str, ticket: Ticket) -> None:
    if command == "submit":
      if ticket.cancelled:  # its handler gave up before the worker saw it
        self._close(ticket, ticket.cancelled)
        return
      try:
        ticket.rid = self.engine.submit(ticket.request)
      except (ValueError, TypeError, OverflowError) as e:  # the engine's checks of the request's settings
        self._close(ticket, "rejected")
        ticket.put(Event("failed", ApiError(400, str(e))))
        return
      except mappings.NoRoom as e:  # its program would not fit: the others go on
        self._close(ticket, "rejected")
        ticket.put(Event("failed", ApiError(503, str(e), "server_error")))
        return
      except Exception as e:  # noqa: BLE001 - a bug this request hit; `submit` changed nothing, the others go on
        log.exception("engine.submit failed")
        self._close(ticket, "failed")
        ticket.put(Event("failed", ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error")))
        return
      self._tickets[ticket.rid] = ticket
      ticket.put(Event("accepted"))
    elif ticket.rid in self._tickets:  # a cancel of a request the engine holds
      self.engine.cancel(ticket.rid)
      self._close(ticket, ticket.cancelled)

  def _deliver(self, result: Any) -> None:
    now = time.monotonic()
    for rid in result.admitted:
      self._unqueue(self._tickets[rid])
    for rid, tokens in result.pieces:
      ticket = self._tickets[rid]
      if ticket.first is None:
        ticket.first = now
        self.metrics.ttft.observe(now - ticket.handed)
      ticket.put(Event("piece", tokens, result.forwards[rid]))
    for rid, output in result.finished:
      ticket = self._tickets.pop(rid)
      ticket.over = True
      first = now if ticket.first is None else ticket.first
      self.metrics.finished(int(output.lengths[0]), int(output.nfe[0]), now - ticket.handed, first - ticket.handed)
      ticket.put(Event("finished", output))

  def _close(self, ticket: Ticket, outcome: str) -> None:
    self._tickets.pop(ticket.rid, None)
    ticket.over = True
    self._unqueue(ticket)
    self.metrics.requests.labels(outcome).inc()

  def _unqueue(self, ticket: Ticket) -> None:
    with self._lock:
      if ticket.queued:
        ticket.queued = False
        self._waiting -= 1

  def _fail_everything(self) -> None:
    """On stop or failure: every request the worker holds or has yet to see gets a 503."""
    error = ApiError(503, self.error or "the server shut down before this request finished", "server_error")
    left = list(self._tickets.values())
    while True:
      try:
        command, ticket = self._inbox.get_nowait()
      except queue.Empty:
        break
      if command == "submit":
        left.append(ticket)
    for ticket in left:
      self._close(ticket, ticket.cancelled or "failed")
      ticket.put(Event("failed", error))
    self._tickets.clear()
