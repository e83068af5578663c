"""The serving engine's host loop: continuous batching of block-diffusion and AR requests over fixed slots.

`submit` validates a request and queues it; each `step` admits waiting requests into free slots (prefill of
the bucketed prompt, written over the slot: the other slots keep their state), runs at most `chunk` decoding
forwards over all busy slots, and hands out each request's newly final blocks and its output once done; a freed
slot takes the next waiting request at the next step. Each algorithm has its own pool of slots (one KV cache,
made on its first request; the params are shared). The device programs are `dvl_jax.diffusion`'s own sampler
pieces (`dvl_jax.serving.slots`) with each row's own strategy, steps, threshold, temperature / top-k / top-p
and key, so a request's tokens are those of `dvl.generate` on it alone under `request.config(engine.config)`
(rng `jax.random.key(request.seed)`), whatever shares the slots and whenever it arrives. After warm-up (per
algorithm, one `insert` compile per prompt-length bucket and one `generate` per cache view: `warm_up`) nothing
recompiles. A model whose params are on a mesh (`dvl.load(ckpt, mesh=...)`) serves on it: slots sharded over
`data` like a sampled batch, same tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dvl_jax.attention import dispatch
from dvl_jax.core import mappings
from dvl_jax.core.config import ModelConfig
from dvl_jax.diffusion import compaction, kv_cache, remask, split_cache
from dvl_jax.diffusion.sampler import algorithm_of
from dvl_jax.diffusion.sampler_common import PromptArrays, compile_key
from dvl_jax.diffusion.sampling_config import (ALGORITHMS, GenerateOutput, Prompts, SamplingConfig, checked_config,
                                              round_up)
from dvl_jax.models.interface import DiffusionLM
from dvl_jax.serving import slots as programs
from dvl_jax.serving.request import Request, Result

# Each cache view is this share of the next longer one. On the CPU a forward's dense attention over the view is
# most of its cost (the demo's model, 8 slots: 1.3 ms at 160 slots, 2.0 at 320, 3.9 at 640), and a request with
# an image (~390 slots with its answer) in any slot sets the view for all: halving views left it at 640.
VIEW_RATIO = 2 ** -0.5
DEFAULT_VIEWS = 7  # `Engine(views=None)` where attention reads the whole view (a CPU)
MAX_PROMPT = 1024  # `longest_prompt`'s cap: a server's default
log = logging.getLogger(__name__)


def cache_length(max_prompt: int, max_tokens: int, bucket: int, block_size: int) -> int:
  """A row's cache slots: the longest prompt's bucket, then `max_tokens`, in whole blocks."""
  return round_up(round_up(max_prompt, bucket) + max_tokens, block_size)


def longest_prompt(model_config: ModelConfig, config: SamplingConfig = SamplingConfig(), max_tokens: int | None = None,
                   cap: int = MAX_PROMPT) -> int:
  """The longest `max_prompt` (at most `cap`) whose cache, with `max_tokens` (default `config.gen_length`) after
  it, fits the model's `max_position_embeddings`: a default that serves any checkpoint (the demo's has 1024
  positions, so 1024 prompt tokens would not leave room for an answer)."""
  positions, gen = model_config.text.max_position_embeddings, max_tokens or config.gen_length
  bs, bucket = config.block_size or model_config.block_size, config.length_bucket
  prompt = min(cap, positions)
  while prompt > 0 and cache_length(prompt, gen, bucket, bs) > positions:
    prompt = round_up(prompt, bucket) - bucket  # the longest prompt of the bucket below
  if prompt < 1:
    raise ValueError(f"max_tokens (--gen-length) {gen} leaves no room for a prompt in this model's {positions} "
                     "positions (max_position_embeddings); ask for fewer")
  return prompt


@dataclasses.dataclass
class _Active:
  """A request on the host: its arrays until admitted, then its slot and what was handed out."""

  prefill: programs.Prefill
  algorithm: str
  length: int  # prompt length P
  gen: int  # max_tokens G
  program: tuple  # what its `insert` compiles for: the algorithm and the prefill's shapes
  emitted: int = 0  # generated tokens handed out as pieces


@dataclasses.dataclass
class _Pool:
  """One algorithm's slots: its programs' static part, the device state and which request is in which slot."""

  static: programs.Static
  slots: programs.Slots
  free: list[int]
  slot_of: dict[int, int] = dataclasses.field(default_factory=dict)  # request id -> slot
  decoders: set[tuple[int, int]] = dataclasses.field(default_factory=set)  # (view, width)s `generate` compiled for


class Engine:
  """`slots` requests of each algorithm decode at once, each in a row of its pool's KV cache of `max_len` slots.

  `config`: what every request shares (mode, block size, `length_bucket`, AR's `positions`: None for the
  model's); the engine never reads its per-request settings (algorithm, strategy, steps, threshold, temperature,
  top-k, top-p: each `Request` carries its own; a server may take them as its defaults). Its `max_len` is the
  cache length (default: `max_prompt` bucketed plus `max_tokens`, rounded up to a block). `max_prompt`: the
  longest prompt (it bounds the buckets, hence the compiles). `max_tokens`: the longest gen length a request may
  ask (default `config.gen_length`). `slots`: per algorithm, a multiple of the mesh's `data` axis. `chunk`:
  decoding forwards per `step` at most (the latency of handing out blocks; a step also ends when a request
  finishes, so its slot is refilled at once). `admit_every`: the forwards of a step while its pool has a free slot
  and no request waits for it, so that one arriving mid-step waits at most that long for its slot (a closed-loop
  client sends its next request when the last one's answer reaches it). `views`: how many
  cache lengths a decoding chunk may attend to (`max_len`, then each `VIEW_RATIO` of the one before, in whole
  blocks): each chunk takes the shortest that holds every busy request, so attention costs what the requests in
  the slots need, at one `generate` compile per view. Default (None): `DEFAULT_VIEWS` where the model's attention
  backend reads the whole cache (a CPU's dense attention), 1 where it reads each row's live tiles in place (the
  GPU and TPU kernels, for the head dims and dtypes they take: `dispatch.reads_cache_in_place`; a shorter view
  would save nothing there, and its slice of the cache is copied in and out every chunk). `config.compact_rows`
  (one device only): each chunk runs only the narrowest of `S`, S/2, ..., 1 rows that holds its busy slots, one
  compile per view and row width: where a forward's cost grows with its rows (a CPU), the few requests left after
  a burst no longer pay for a whole batch's; on an accelerator a forward over a few rows costs about one row's, so
  it is off by default.
  """

  def __init__(self, model: DiffusionLM, config: SamplingConfig = SamplingConfig(), *, slots: int = 4,
               max_prompt: int = 256, max_tokens: int | None = None, chunk: int = 16, admit_every: int = 2,
               views: int | None = None):
    checked_config(config)
    if min(slots, chunk, admit_every, 1 if views is None else views) < 1:
      raise ValueError(f"slots, chunk, admit_every and views must be >= 1, got slots={slots}, chunk={chunk}, "
                       f"admit_every={admit_every}, views={views}")
    graphdef, self.state, self._placement = split_cache.split(model)
    if self._placement.batch(slots) != slots:
      raise ValueError(f"slots={slots} must be a multiple of the mesh's data axis "
                       f"({self._placement.mesh.shape['data']})")
    self.model, self.graphdef, self.slots, self.max_prompt = model, graphdef, slots, max_prompt
    self.chunk, self.admit_every = chunk, min(admit_every, chunk)
    max_tokens = max_tokens or config.gen_length
    bs = config.block_size or model.config.block_size
    max_len = config.max_len or cache_length(max_prompt, max_tokens, config.length_bucket, bs)
    if max_len > (positions := model.config.text.max_position_embeddings):
      if config.max_len:
        raise ValueError(f"max_len {max_len} exceeds the model's {positions} positions (max_position_embeddings)")
      raise ValueError(f"max_prompt {max_prompt} + max_tokens {max_tokens} need a {max_len}-slot cache, more than "
                       f"the model's {positions} positions (max_position_embeddings); lower max_prompt to "
                       f"{longest_prompt(model.config, config, max_tokens)} or max_tokens")
    self.config = dataclasses.replace(config, block_size=bs, gen_length=max_tokens, max_len=max_len)
    if views is None:
      text, dtype = model.config.text, jnp.dtype(model.config.compute_dtype)  # the queries' and the cache's
      in_place = dispatch.reads_cache_in_place(model.config.attention_backend, heads=text.num_heads,
                                               kv_heads=text.num_kv_heads, head_dim=text.head_dim, length=max_len,
                                               dtype=dtype, cache_dtype=dtype)
      views = 1 if in_place else DEFAULT_VIEWS
    self.views = sorted({min(round_up(round(max_len * VIEW_RATIO ** k), bs), max_len) for k in range(views)})
    if config.compact_rows and self._placement.mesh is not None:
      raise ValueError("compact_rows needs the params on one device (on a mesh the slots are split over `data`)")
    self.widths = sorted(compaction.widths(slots) if config.compact_rows else (slots,))
    self._pools: dict[str, _Pool] = {}
    self._waiting: collections.deque[int] = collections.deque()
    self._requests: dict[int, _Active] = {}
    self._ids = itertools.count()
    self._inserted: set[tuple] = set()  # `_Active.program`s admitted so far: their `insert` is compiled

  @property
  def busy(self) -> int:
    """Requests in a slot."""
    return sum(len(p.slot_of) for p in self._pools.values())

  @property
  def waiting(self) -> int:
    return len(self._waiting)

  def submit(self, request: Request) -> int:
    """Queues `request` (checked now: a bad one raises `ValueError` and changes nothing) -> its id. A request
    whose `insert` is not compiled yet (a new prompt-length bucket or image shape) raises `mappings.NoRoom` when
    the process is near its limit on memory mappings: refused, rather than a compile that aborts the process."""
    if request.max_tokens is None:
      request = dataclasses.replace(request, max_tokens=self.config.gen_length)
    prefill = self._prefill(request)
    program = (request.algorithm, jax.tree.structure(prefill), tuple(np.shape(x) for x in jax.tree.leaves(prefill)))
    if program not in self._inserted:
      mappings.check_room(f"a {len(request.prompt)}-token {request.algorithm} prompt"
                          f"{' with an image' if request.pixel_values is not None else ''}")
    rid = next(self._ids)
    self._requests[rid] = _Active(prefill, request.algorithm, len(request.prompt), request.max_tokens, program)
    self._waiting.append(rid)
    return rid

  def cancel(self, rid: int) -> bool:
    """Drops request `rid`, waiting or decoding (its slot is free for the next step) -> whether it was there."""
    if rid not in self._requests:
      return False
    pool = self._pools.get(self._requests[rid].algorithm)
    if pool is not None and rid in pool.slot_of:
      slot = pool.slot_of.pop(rid)
      pool.slots = programs.release(pool.static, pool.slots, np.int32(slot))
      pool.free.append(slot)
    else:
      self._waiting.remove(rid)
    del self._requests[rid]
    return True

  def step(self) -> Result:
    """Admits waiting requests into free slots of their algorithm's pool, runs one chunk of decoding in each pool
    with a busy slot and hands out what became final."""
    admitted, still = [], collections.deque()
    for rid in self._waiting:
      pool = self._pool(self._requests[rid].algorithm)
      if not pool.free:
        still.append(rid)
        continue
      slot = pool.free.pop(0)
      pool.slots = programs.insert(pool.static, self.state, pool.slots, np.int32(slot), self._requests[rid].prefill)
      pool.slot_of[rid] = slot
      self._inserted.add(self._requests[rid].program)
      admitted.append(rid)
    self._waiting = still
    pieces, finished, nfe = [], [], {}
    for pool in self._pools.values():
      if pool.slot_of:
        forwards = np.int32(self.admit_every if pool.free else self.chunk)  # the waiting ones were admitted
        view, width = self._decoder(pool)
        picked = np.array(sorted(pool.slot_of.values()) + sorted(pool.free), np.int32)[:width]  # busy ones first
        pool.slots, out = programs.generate(pool.static, forwards, view, width, self.state, pool.slots, picked)
        pool.decoders.add((view, width))
        out = jax.device_get(out)
        nfe |= {rid: int(out["nfe"][slot]) for rid, slot in pool.slot_of.items()}
        p, f = self._hand_out(pool, out)
        pieces += p
        finished += f
    return Result(admitted, pieces, finished, nfe)

  def run(self, requests: Iterable[Request] = ()) -> dict[int, GenerateOutput]:
    """Submits `requests` and steps until nothing is left -> every request's output by id."""
    for r in requests:
      self.submit(r)
    done = {}
    while self._waiting or self.busy:
      done.update(self.step().finished)
    return done

  def warm_up(self, algorithms: Iterable[str] = ALGORITHMS, images: Iterable[Request] = ()) -> None:
    """Compiles every program text requests need (each algorithm's pool, an `insert` per prompt-length bucket,
    `generate` per cache view and row width), so that serving text then never waits for a compile; the warm-up
    outputs are dropped. An image request compiles an `insert` per pair of prompt and patch-row buckets on first
    use, stalling every slot meanwhile (seconds): `images`, requests with one image each of the sizes to expect
    (as the processor makes them; their settings are not read), compile theirs for every prompt-length bucket
    that holds them. Logs a warning when the programs hold much of the process's memory mappings on a CPU
    (`mappings`: past the limit a compile aborts the process)."""
    bucket, pad = self.config.length_bucket, self.model.config.pad_token_id
    lengths = sorted({min(round_up(n, bucket), self.max_prompt) for n in range(1, self.max_prompt + 1)})
    algorithms = list(algorithms)
    images = list(images)
    for image in images:
      if len(image.prompt) > self.max_prompt:
        raise ValueError(f"a warm-up image prompt of {len(image.prompt)} tokens exceeds the engine's "
                         f"max_prompt={self.max_prompt}; raise max_prompt or warm up a smaller image")
    self.run(Request([pad] * n, max_tokens=1, algorithm=a) for a in algorithms for n in lengths)
    self.run(Request(list(image.prompt) + [pad] * (n - len(image.prompt)), max_tokens=1, algorithm=a,
                     pixel_values=image.pixel_values, image_grid_thw=image.image_grid_thw)
             for image in images for a in algorithms for n in lengths if n >= len(image.prompt))
    for pool in (self._pools[a] for a in algorithms):
      for view, width in itertools.product(self.views, self.widths):  # every slot is idle: the program compiles
        pool.slots, _ = programs.generate(pool.static, np.int32(self.chunk), view, width, self.state, pool.slots,
                                          np.arange(width, dtype=np.int32))
        pool.decoders.add((view, width))
    if (warning := mappings.warning()) is not None:
      log.warning("after warm-up %s", warning)

  def _decoder(self, pool: _Pool) -> tuple[int, int]:
    """The (view, row width) of the pool's next chunk: the shortest of `views` that holds every busy slot's
    decoded span (`P + G` rounded up to a block; the longest view is the whole cache, which holds any admitted
    request) and the narrowest of `widths` that holds the busy slots. Near the memory-mapping limit
    (`mappings.full`), rather than compile that program the smallest compiled one that holds them: a longer view
    or a wider chunk gives the same tokens, at more cost; if none does, every compiled program is dropped first
    (`_drop_programs`)."""
    need = max(round_up(self._requests[rid].length + self._requests[rid].gen, self.config.block_size)
               for rid in pool.slot_of)
    view = min(v for v in self.views if v >= need)
    width = min(w for w in self.widths if w >= len(pool.slot_of))
    if (view, width) in pool.decoders or not mappings.full():
      return view, width
    compiled = [(v, w) for v, w in pool.decoders if v >= view and w >= width]
    if compiled:
      return min(compiled, key=lambda vw: vw[0] * vw[1])
    self._drop_programs()
    return view, width

  def _drop_programs(self) -> None:
    """Drops every compiled program (each compiles again when next used): near the memory-mapping limit, the
    room a program that must compile now needs, rather than a compile that aborts the process."""
    log.warning("near the memory-mapping limit with no compiled program for this chunk: dropping every compiled "
                "program; they compile again as requests need them (%s)", mappings.warning())
    jax.clear_caches()
    self._inserted.clear()
    for pool in self._pools.values():
      pool.decoders.clear()

  def _pool(self, algorithm: str) -> _Pool:
    """The pool of `algorithm`, made on its first request: every slot idle (a dead row, prompt length 0)."""
    if algorithm not in self._pools:
      pad = self.model.config.pad_token_id
      widest = Request([pad], max_tokens=self.config.gen_length, algorithm=algorithm, temperature=1.0)
      config = compile_key(widest.config(self.config).resolve(self.model.config))  # rows may sample
      static = programs.Static(algorithm_of(config), self.graphdef, config, self._placement)
      idle = self._prefill(Request([pad], max_tokens=1, algorithm=algorithm), self.slots)
      idle = idle._replace(prompt=idle.prompt._replace(lengths=np.zeros(self.slots, np.int32)))
      cache = kv_cache.init(self.model.config, self.slots, self.config.max_len, self._placement.cache)
      self._pools[algorithm] = _Pool(static, programs.empty(static, self.state, cache, idle), list(range(self.slots)))
    return self._pools[algorithm]

  def _prefill(self, request: Request, rows: int = 1) -> programs.Prefill:
    """The host arrays of `request` (repeated over `rows`), its settings validated."""
    cfg = self.model.config
    if not 1 <= request.max_tokens <= self.config.gen_length:
      raise ValueError(f"max_tokens must be in [1, {self.config.gen_length}], got {request.max_tokens}")
    if len(request.prompt) > self.max_prompt:
      raise ValueError(f"prompt of {len(request.prompt)} tokens exceeds the engine's max_prompt={self.max_prompt}")
    config = request.config(self.config).resolve(cfg)
    prompts = Prompts.from_lists([list(request.prompt)] * rows, cfg.pad_token_id, pixel_values=request.pixel_values,
                                 image_grid_thw=request.image_grid_thw).bucketed(config, cfg, few_shapes=True)
    keys = remask.row_keys(jax.random.key(request.seed), 1)[np.zeros(rows, int)]
    return programs.Prefill(PromptArrays(prompts.ids, prompts.lengths, prompts.pixel_values, prompts.vision),
                            np.full(rows, request.max_tokens, np.int32),
                            remask.Sampling.of(keys, config.temperature, config.top_k, config.top_p),
                            algorithm_of(config).inputs(self.model, prompts, config))

  def _hand_out(self, pool: _Pool, out: dict[str, np.ndarray]) -> tuple[list, list]:
    """(pieces, finished) from each busy slot's tokens so far; finished requests free their slots."""
    pieces, finished = [], []
    bs, blocks = self.config.block_size, pool.static.config.algorithm == "block_diffusion"
    for rid, slot in list(pool.slot_of.items()):
      a = self._requests[rid]
      decoded = out["steps"][slot, :a.gen] >= 0
      final = a.gen if decoded.all() else int(np.argmin(decoded))  # the decoded prefix
      offset = a.length if blocks else 0  # pieces end at whole blocks: absolute ones, AR's of generated tokens
      while (end := min(a.emitted + bs - (offset + a.emitted) % bs, a.gen)) <= final and a.emitted < final:
        pieces.append((rid, out["tokens"][slot, a.emitted:end]))
        a.emitted = end
      if out["done"][slot]:
        if a.emitted < final:
          pieces.append((rid, out["tokens"][slot, a.emitted:final]))
        row = lambda k: out[k][slot:slot + 1]
        finished.append((rid, GenerateOutput.build(row("tokens")[:, :a.gen], row("decoded"), row("nfe"),
                                                   int(row("nfe")[0]), row("steps")[:, :a.gen],
                                                   self.model.config.eos_token_id)))
        del pool.slot_of[rid], self._requests[rid]
        pool.free.append(slot)
    return pieces, finished
