"""Prometheus metrics of `dvl serve` (`GET /metrics`): load, latency and how many tokens a forward yields.

One registry per app, so several servers in a process (tests) keep their own counts. TTFT runs from the
request's hand-off to the engine to its first final block; TPOT is vLLM's (latency - TTFT) / (tokens - 1).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dvl_jax.core import mappings

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OUTCOMES = ("finished", "stopped", "rejected", "cancelled", "timeout", "failed")


class Metrics:
  def __init__(self, slots: int):
    self.registry = CollectorRegistry()
    r = self.registry
    self.requests = Counter("dvl_requests", "Requests that reached the engine, by outcome (stopped: ended at a "
                            "stop sequence; rejected: the engine refused its settings; cancelled: the client went "
                            "away)", ["outcome"], registry=r)
    for outcome in OUTCOMES:
      self.requests.labels(outcome)
    self.responses = Counter("dvl_http_responses", "HTTP responses by route and status code (a 4xx: a bad request)",
                             ["route", "code"], registry=r)
    self.queue = Gauge("dvl_queue_depth", "Requests waiting for a slot", registry=r)
    self.busy = Gauge("dvl_slots_busy", "Slots decoding a request", registry=r)
    Gauge("dvl_slots", "Slots of the engine", registry=r).set(slots)
    self.ttft = Histogram("dvl_time_to_first_token_seconds", "Hand-off to the first final block", registry=r,
                          buckets=LATENCY_BUCKETS)
    self.tpot = Histogram("dvl_time_per_output_token_seconds", "(latency - TTFT) / (tokens - 1) of a finished "
                          "request", registry=r, buckets=LATENCY_BUCKETS)
    self.tokens_per_forward = Histogram("dvl_tokens_per_forward", "A finished request's tokens over its forwards",
                                        registry=r, buckets=(0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0))
    self.tokens = Counter("dvl_generated_tokens", "Tokens of finished answers (through EOS)", registry=r)
    self.forwards = Counter("dvl_forwards", "Model forwards of finished answers (prefill included)", registry=r)
    nan = float("nan")
    Gauge("dvl_memory_mappings", "Memory mappings the process holds (XLA:CPU: 3 per compiled kernel; read at each "
          "scrape)", registry=r).set_function(lambda: (mappings.usage() or (nan,))[0])
    Gauge("dvl_memory_mappings_limit", "Linux's vm.max_map_count: a compile past it aborts the process",
          registry=r).set_function(lambda: mappings.limit() or nan)

  def finished(self, tokens: int, forwards: int, latency: float, ttft: float) -> None:
    self.requests.labels("finished").inc()
    self.tokens.inc(tokens)
    self.forwards.inc(forwards)
    self.tokens_per_forward.observe(tokens / max(forwards, 1))
    if tokens > 1:
      self.tpot.observe((latency - ttft) / (tokens - 1))

  def text(self) -> bytes:
    return generate_latest(self.registry)
