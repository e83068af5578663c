"""Serving load: continuous batching through `dvl serve` vs the same requests as static batches of `dvl.generate`,
block diffusion vs AR, in one table (in the style of `vllm bench serve`).

N chat requests with mixed question lengths, mixed answer lengths (`max_tokens` drawn from `--answers`) and a
random image on a fraction of them go to a running server, `--concurrency` at a time or as Poisson arrivals at
`--request-rate` per second, streamed (one SSE chunk per block), after an untimed pass of the same requests (the
server compiles each prompt bucket and image shape once). Per request: TTFT (send to first chunk), TPOT
((latency - TTFT) / (tokens - 1)), ITL (the gaps between chunks; a chunk is a block), latency; overall: output
tokens/s, requests/s and tokens per forward (answer tokens over their rows' forwards: a static row keeps
decoding to its batch's longest answer). With `--checkpoint` the same requests then run in process as static
batches of up to `--concurrency` (`dvl.generate`, gen length = the batch's longest `max_tokens`: a row that is
done waits for the slowest, and the next batch waits for the whole batch; TTFT is the batch's time, there is no
stream), each batch shape compiled off the clock the first time it comes up. Closed loop: a batch's requests are
sent when it starts. With `--request-rate` they arrive at the server rows' times and queue, a batch taking the
queued ones, and a latency counts the wait for the batches before (a static server under the same load).
`--in-process SERVE_ARGS` adds the server's rows without HTTP: the same bodies through the engine and request
builder `dvl serve SERVE_ARGS` would serve, stepped in this process (what HTTP, streaming and the server's
threads cost is the difference). Each algorithm of `--algorithms` runs the whole workload (the server takes
`algorithm` per request). `--temperature` (with `--top-p`, `--top-k`) samples every request with its own seed, the
static rows with the same keys (the same tokens). `--repeats R` runs R rounds of every row back to back and ends
with each row's median output tok/s and latency p99, and the medians of the rounds' ratios of both to the static
row's: on a shared machine a ratio of neighbours is much steadier than either number (one round's p99 is one slow
batch or request away from another value).

    dvl serve --checkpoint CKPT --slots 8 &                      # or with --port 0 and the printed URL
    python benchmarks/serve.py --url http://127.0.0.1:8000 --checkpoint CKPT [--num-requests 64]
        [--concurrency 8 | --request-rate 4] [--answers 8,16,64,128] [--image-fraction 0.25] [--repeats 3]
        [--in-process "--slots 8"] [--temperature 0.7 --top-p 0.9]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import os
import sys
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = ("what colour is the shape in the image how many squares circles triangles are there where is it top left "
         "bottom right describe picture grid grey red blue green one two three").split()


@dataclasses.dataclass(frozen=True)
class Job:
  question: str
  image: bytes | None  # PNG
  max_tokens: int
  seed: int = 0  # a sampled request's `seed`


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Every request's sampling settings (temperature 0: greedy, no seed sent). A sampled request sends its job's
  seed, and the static rows give each row the key `dvl.generate` alone takes from that seed: every request draws
  the same tokens in both."""

  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0

  def fields(self, seed: int) -> dict[str, Any]:
    if self.temperature == 0:
      return {}
    return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "seed": seed}


GREEDY = Sampling()


@dataclasses.dataclass
class Timing:
  latency: float
  tokens: int
  ttft: float
  gaps: list[float]
  forwards: int = 0

  @property
  def tpot(self) -> float:
    return (self.latency - self.ttft) / (self.tokens - 1) if self.tokens > 1 else 0.0


def workload(n: int, answers: list[int], words: tuple[int, int], image_fraction: float, seed: int) -> list[Job]:
  from PIL import Image

  rng = np.random.default_rng(seed)
  jobs = []
  for _ in range(n):
    question = " ".join(rng.choice(WORDS, rng.integers(words[0], words[1], endpoint=True))) + " ?"
    image = None
    if rng.random() < image_fraction:
      buf = io.BytesIO()
      side = int(rng.choice([56, 84, 112]))
      Image.fromarray(rng.integers(0, 255, (side, side, 3), np.uint8)).save(buf, "PNG")
      image = buf.getvalue()
    jobs.append(Job(question, image, int(rng.choice(answers)), seed=len(jobs)))
  return jobs


def chat_body(job: Job, model: str, algorithm: str, sampling: Sampling = GREEDY) -> dict[str, Any]:
  content: list[dict[str, Any]] = [{"type": "text", "text": job.question}]
  if job.image is not None:
    url = "data:image/png;base64," + base64.b64encode(job.image).decode()
    content.insert(0, {"type": "image_url", "image_url": {"url": url}})
  return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": job.max_tokens,
          "stream": True, "stream_options": {"include_usage": True}, "algorithm": algorithm,
          **sampling.fields(job.seed)}


async def one_request(client: Any, body: dict[str, Any]) -> Timing:
  start = time.perf_counter()
  arrivals, usage = [], None
  async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
    if reply.status_code != 200:
      raise RuntimeError(f"server answered {reply.status_code}: {(await reply.aread()).decode()[:300]}")
    async for line in reply.aiter_lines():
      if not line.startswith("data: {"):
        continue
      event = json.loads(line[6:])
      if "error" in event:
        raise RuntimeError(f"stream failed: {event['error']['message']}")
      if event.get("usage"):
        usage = event["usage"]
      elif event["choices"] and event["choices"][0]["finish_reason"] is None:  # a block (not the end)
        arrivals.append(time.perf_counter())
  latency = time.perf_counter() - start
  first = arrivals[0] - start if arrivals else latency
  return Timing(latency, usage["completion_tokens"], first, list(np.diff(arrivals)), usage["nfe"])


async def through_server(url: str, key: str | None, model: str, jobs: list[Job], algorithm: str, concurrency: int,
                         arrivals: np.ndarray | None, warm: bool = True, sampling: Sampling = GREEDY
                         ) -> tuple[list[Timing], float]:
  import httpx

  headers = {"Authorization": f"Bearer {key}"} if key else {}
  limits = httpx.Limits(max_connections=max(concurrency, 1) * 2)
  async with httpx.AsyncClient(base_url=url, headers=headers, timeout=3600, limits=limits) as client:
    gate = asyncio.Semaphore(concurrency if arrivals is None else len(jobs))

    async def gated(job: Job) -> Timing:
      async with gate:
        return await one_request(client, chat_body(job, model, algorithm, sampling))

    if warm:  # untimed: every prompt bucket and image shape compiles
      await asyncio.gather(*(gated(job) for job in jobs))
    waits = np.zeros(len(jobs)) if arrivals is None else arrivals

    async def scheduled(job: Job, wait: float) -> Timing:
      await asyncio.sleep(wait)
      return await gated(job)

    start = time.perf_counter()
    timings = await asyncio.gather(*(scheduled(j, w) for j, w in zip(jobs, waits)))
    return list(timings), time.perf_counter() - start


def arrival_times(n: int, rate: float | None, seed: int) -> np.ndarray | None:
  """Seconds from the start at which each of `n` requests is sent: Poisson arrivals at `rate` per second (the
  server rows and the static rows get the same), None for a closed loop."""
  return np.cumsum(np.random.default_rng(seed).exponential(1 / rate, n)) if rate else None


def static_schedule(jobs: list[Job], batch: int, generate: Any, arrivals: np.ndarray | None
                    ) -> tuple[list[Timing], float]:
  """Static batching as a server runs it: the queued jobs in order, at most `batch` at a time, the next batch
  starting when the previous one is done. `generate(group)` -> (its outputs, seconds to leave off the clock:
  a first compile). Closed loop (`arrivals` None): `batch` clients send a batch's jobs when it starts, so a job
  waits for nothing but its batch. With `arrivals`, jobs queue as they arrive (in real time) and a job's
  latency counts its wait for the batches before it; a batch takes every queued job up to `batch`."""
  timings: list[Timing | None] = [None] * len(jobs)
  start, first = time.perf_counter(), 0
  clock = lambda: time.perf_counter() - start
  while first < len(jobs):
    if arrivals is not None and arrivals[first] > clock():
      time.sleep(arrivals[first] - clock())
    sent = clock()
    last = min(first + batch, len(jobs)) if arrivals is None else int(
        np.searchsorted(arrivals, sent, side="right").clip(first + 1, first + batch))
    group = list(range(first, last))
    out, untimed = generate([jobs[i] for i in group])
    start += untimed
    done = clock()
    for row, i in enumerate(group):
      latency = done - (sent if arrivals is None else arrivals[i])
      timings[i] = Timing(latency, int(min(out.lengths[row], jobs[i].max_tokens)), latency, [], int(out.nfe[row]))
    first = last
  return timings, clock()


class StaticBatches:
  """The same jobs through `dvl.generate` as `static_schedule`'s batches of up to `batch`; each batch shape
  compiles the first time it comes up, off the clock."""

  def __init__(self, checkpoint: str, batch: int, pixels: tuple | None, sampling: Sampling = GREEDY):
    import dvl_jax as dvl

    self.processor = dvl.Processor.from_pretrained(checkpoint, **({} if pixels is None else
                                                                 dict(min_pixels=pixels[0], max_pixels=pixels[1])))
    # per layer, as `dvl generate` and `dvl serve` load it (weights read in place)
    self.model, self.batch, self.compiled = dvl.load(checkpoint, scan_layers=False), batch, set()
    self.sampling = sampling

  def _generate(self, group: list[Job], algorithm: str) -> tuple[Any, float]:
    import jax
    from PIL import Image

    import dvl_jax as dvl
    from dvl_jax.diffusion import remask

    images = [[Image.open(io.BytesIO(j.image)).convert("RGB")] if j.image else [] for j in group]
    inputs = self.processor([dvl.generation_prompt(j.question, len(i)) for j, i in zip(group, images)], images)
    config = dvl.SamplingConfig(gen_length=max(j.max_tokens for j in group), algorithm=algorithm,
                                temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                                top_k=self.sampling.top_k)
    rng = None if self.sampling.temperature == 0 else jax.numpy.stack(
        [remask.row_keys(jax.random.key(j.seed), 1)[0] for j in group])  # each row's key alone
    grids = inputs.get("image_grid_thw")
    shapes = (algorithm, config.gen_length, *(np.shape(v) for v in inputs.values() if v is not None),
              None if grids is None else tuple(np.ravel(grids)))
    untimed = 0.0
    if shapes not in self.compiled:  # a first run compiles, off the clock
      tic = time.perf_counter()
      dvl.generate(self.model, inputs, config, rng=rng)
      self.compiled.add(shapes)
      untimed = time.perf_counter() - tic
    return dvl.generate(self.model, inputs, config, rng=rng), untimed

  def run(self, jobs: list[Job], algorithm: str, arrivals: np.ndarray | None) -> tuple[list[Timing], float]:
    return static_schedule(jobs, self.batch, lambda group: self._generate(group, algorithm), arrivals)


def engine_schedule(jobs: list[Job], concurrency: int, arrivals: np.ndarray | None, submit: Any, step: Any
                    ) -> tuple[list[Timing], float]:
  """Continuous batching as the server runs it, without HTTP: `submit(i)` queues job i on the engine (its
  preprocessing on the clock, as a server's is) -> its request id; `step()` runs one `Engine.step` -> its
  `Result`. Closed loop (`arrivals` None): `concurrency` clients, each sending its next job once its last is
  done; with `arrivals`, each job is sent at its time. TTFT: from sending to the step that hands out the job's
  first piece (block); gaps: between the steps that hand out its pieces."""
  timings: list[Timing | None] = [None] * len(jobs)
  sent, pieces, job_of = {}, {}, {}
  start, following = time.perf_counter(), 0
  clock = lambda: time.perf_counter() - start
  while following < len(jobs) or job_of:
    while following < len(jobs) and (len(job_of) < concurrency if arrivals is None else
                                     arrivals[following] <= clock()):
      sent[following] = clock() if arrivals is None else arrivals[following]
      job_of[submit(following)] = following
      following += 1
    if not job_of:  # idle until the next arrival
      time.sleep(max(arrivals[following] - clock(), 0))
      continue
    result = step()
    now = clock()
    for rid, _ in result.pieces:
      pieces.setdefault(job_of[rid], []).append(now)
    for rid, out in result.finished:
      i = job_of.pop(rid)
      times = pieces.pop(i, [now])
      timings[i] = Timing(now - sent[i], int(min(out.lengths[0], jobs[i].max_tokens)), times[0] - sent[i],
                          list(np.diff(times)), int(out.nfe[0]))
  return timings, clock()


class InProcess:
  """The server's rows without HTTP: the same chat bodies through the request builder and the `dvl.Engine` that
  `dvl serve --checkpoint CKPT SERVE_ARGS` would serve (built and warmed up by `dvl serve`'s own code), stepped
  in this process; the difference from the server's rows is what HTTP, streaming and the server's threads cost."""

  def __init__(self, checkpoint: str, serve_args: str):
    import shlex

    from dvl_jax.cli import serve as serve_cli
    from dvl_jax.serving.http.inputs import Inputs

    args = serve_cli.parse(["--checkpoint", checkpoint, *shlex.split(serve_args)])
    self.engine, processor = serve_cli.build_engine(args)
    served = serve_cli.settings(args)
    self.inputs = Inputs(processor, self.engine.config, served.media, served.max_images)
    self.model = served.model_name

  def run(self, jobs: list[Job], algorithm: str, concurrency: int, arrivals: np.ndarray | None, warm: bool = True,
          sampling: Sampling = GREEDY) -> tuple[list[Timing], float]:
    from dvl_jax.serving.http.schema import ChatRequest

    def submit(i: int) -> int:
      body = ChatRequest.model_validate(chat_body(jobs[i], self.model, algorithm, sampling))
      return self.engine.submit(self.inputs.chat(body)[0])

    if warm:  # untimed, as the server rows' first pass
      engine_schedule(jobs, concurrency, None, submit, self.engine.step)
    return engine_schedule(jobs, concurrency, arrivals, submit, self.engine.step)


def row(name: str, algorithm: str, timings: list[Timing], wall: float, streamed: bool = True) -> str:
  """A table row; a static batch streams nothing, so its TPOT and ITL are "-" (its TTFT is its latency)."""
  def p50_p99(values: list[float], digits: int) -> str:
    return " / ".join(f"{np.percentile(values, q) * 1e3:.{digits}f}" for q in (50, 99)) if values else "-"

  tpot = p50_p99([t.tpot for t in timings], 1) if streamed else "-"
  gaps = p50_p99([g for t in timings for g in t.gaps], 1)
  tokens, forwards = sum(t.tokens for t in timings), sum(t.forwards for t in timings)
  return (f"| {name} | {algorithm} | {tokens / wall:.1f} | {len(timings) / wall:.2f} | "
          f"{p50_p99([t.ttft for t in timings], 0)} | {tpot} | {gaps} | {p50_p99([t.latency for t in timings], 0)} | "
          f"{tokens / max(forwards, 1):.2f} |")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--url", required=True, help="a running `dvl serve`, e.g. http://127.0.0.1:8000 (required)")
  parser.add_argument("--model", default=None, help="model id (default: the server's first in /v1/models)")
  parser.add_argument("--api-key", default=os.environ.get("DVL_API_KEY"), help="bearer token (default: $DVL_API_KEY)")
  parser.add_argument("--checkpoint", default=None,
                      help="the served checkpoint, for the static-batch rows (default: none, server rows only)")
  parser.add_argument("--num-requests", type=int, default=64, help="requests per row (default: 64)")
  parser.add_argument("--concurrency", type=int, default=8,
                      help="requests in flight (closed loop) and the static batch size (default: 8)")
  parser.add_argument("--request-rate", type=float, default=None,
                      help="Poisson arrivals per second instead of a fixed concurrency (default: none)")
  parser.add_argument("--answers", default="8,16,64,128",
                      help="max_tokens values drawn uniformly (mixed answer lengths) (default: 8,16,64,128)")
  parser.add_argument("--words", default="4,40", help="question length range in words (default: 4,40)")
  parser.add_argument("--image-fraction", type=float, default=0.25, help="requests with an image (default: 0.25)")
  parser.add_argument("--algorithms", default="block_diffusion,autoregressive",
                      help="algorithms to compare (default: block_diffusion,autoregressive)")
  parser.add_argument("--pixels", default=None, help="min,max pixels of the static rows' processor, as given to "
                      "dvl serve (default: the checkpoint's bounds)")
  parser.add_argument("--in-process", default=None, metavar="SERVE_ARGS",
                      help="with --checkpoint: also run each row through the engine `dvl serve --checkpoint "
                      "CHECKPOINT SERVE_ARGS` would serve, in this process without HTTP (give the server's options, "
                      "e.g. \"--slots 8 --max-prompt 512 --compact-rows\"; it warms up as they say) (default: none)")
  parser.add_argument("--temperature", type=float, default=0.0,
                      help="every request's temperature; above 0 each also sends its own seed (default: 0, greedy)")
  parser.add_argument("--top-p", type=float, default=1.0, help="every sampled request's top_p (default: 1.0)")
  parser.add_argument("--top-k", type=int, default=0, help="every sampled request's top_k (default: 0, none)")
  parser.add_argument("--seed", type=int, default=0, help="workload and arrival seed (default: 0)")
  parser.add_argument("--repeats", type=int, default=1,
                      help="rounds of every row, alternating server and static batches; with more than one, a last "
                      "table gives each row's median output tok/s and latency p99 and their ratios to static's "
                      "(default: 1)")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  if args.in_process is not None and not args.checkpoint:
    parser.error("--in-process needs --checkpoint (the served checkpoint)")

  import httpx

  headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
  model = args.model or httpx.get(f"{args.url}/v1/models", headers=headers).json()["data"][0]["id"]
  low, high = (int(w) for w in args.words.split(","))
  jobs = workload(args.num_requests, [int(a) for a in args.answers.split(",")], (low, high), args.image_fraction,
                  args.seed)
  pixels = tuple(int(p) for p in args.pixels.split(",")) if args.pixels else None
  sampling = Sampling(args.temperature, args.top_p, args.top_k)
  static = StaticBatches(args.checkpoint, args.concurrency, pixels, sampling) if args.checkpoint else None
  engine = InProcess(args.checkpoint, args.in_process) if args.in_process is not None else None
  arrival = f"Poisson {args.request_rate}/s" if args.request_rate else f"concurrency {args.concurrency}"
  print(f"{len(jobs)} requests, {arrival}, max_tokens from {args.answers}, {args.image_fraction:.0%} with an image, "
        + (f"temperature {args.temperature}, top_p {args.top_p}, top_k {args.top_k}" if args.temperature else "greedy"))
  lines = ["| batching | algorithm | output tok/s | req/s | TTFT ms p50 / p99 | TPOT ms p50 / p99 | "
           "ITL ms p50 / p99 | latency ms p50 / p99 | tokens / forward |", "|---|---|---|---|---|---|---|---|---|"]
  rounds: dict[tuple[str, str], list[tuple[float, float]]] = {}  # (algorithm, batching) -> (tok/s, p99 s) each
  arrivals = arrival_times(len(jobs), args.request_rate, args.seed)  # the same for every row
  for round_ in range(args.repeats):
    for algorithm in args.algorithms.split(","):
      timings, wall = asyncio.run(through_server(args.url, args.api_key, model, jobs, algorithm, args.concurrency,
                                                 arrivals, warm=round_ == 0, sampling=sampling))
      lines.append(row("continuous (dvl serve)", algorithm, timings, wall))
      rounds.setdefault((algorithm, "continuous"), []).append(rate_and_p99(timings, wall))
      print(lines[-1], flush=True)
      if engine is not None:
        timings, wall = engine.run(jobs, algorithm, args.concurrency, arrivals, warm=round_ == 0, sampling=sampling)
        lines.append(row("continuous (engine in process)", algorithm, timings, wall))
        rounds.setdefault((algorithm, "in process"), []).append(rate_and_p99(timings, wall))
        print(lines[-1], flush=True)
      if static is not None:
        timings, wall = static.run(jobs, algorithm, arrivals)
        lines.append(row(f"static batches of {args.concurrency}", algorithm, timings, wall, streamed=False))
        rounds.setdefault((algorithm, "static"), []).append(rate_and_p99(timings, wall))
        print(lines[-1], flush=True)
  print("\n".join(lines))
  if args.repeats > 1:
    print(f"\nmedian over {args.repeats} rounds\n" + "\n".join(medians(rounds)))


def rate_and_p99(timings: list[Timing], wall: float) -> tuple[float, float]:
  """A row's output tokens/s and latency p99 (s)."""
  return sum(t.tokens for t in timings) / wall, float(np.percentile([t.latency for t in timings], 99))


def medians(rounds: dict[tuple[str, str], list[tuple[float, float]]]) -> list[str]:
  """Each row's median output tok/s and latency p99 and the medians of the rounds' ratios of both to the static
  row's (each round's rows ran back to back, so a ratio is steadier than either number)."""
  lines = ["| algorithm | batching | output tok/s | latency p99 ms | tok/s / static's | p99 / static's |",
           "|---|---|---|---|---|---|"]
  for (algorithm, batching), values in rounds.items():
    ours, static = np.array(values), rounds.get((algorithm, "static"))
    rate, p99 = ("-", "-") if static is None or batching == "static" else (
        f"{np.median(ours[:, i] / np.array(static)[:, i]):.2f}x" for i in (0, 1))
    lines.append(f"| {algorithm} | {batching} | {np.median(ours[:, 0]):.1f} | {np.median(ours[:, 1]) * 1e3:.0f} | "
                 f"{rate} | {p99} |")
  return lines


if __name__ == "__main__":
  main()
