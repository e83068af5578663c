"""The serving engine's host loop: continuous batching of block-diffusion (or AR) requests over fixed slots.

`submit` validates a request and queues it; each `step` admits waiting requests into free slots (prefill of
the bucketed prompt, written over the slot: the other slots keep their state), runs at most `chunk` decoding
forwards over all slots, and hands out each request's newly final blocks and its output once done; a freed
slot takes the next waiting request at the next step. The device programs are `dvl_jax.diffusion`'s own
sampler pieces (`dvl_jax.serving.slots`), so a request's tokens are those of `dvl.generate` on it alone under
`request.config(engine.config)`, whatever shares the slots and whenever it arrives. After warm-up (one
`insert` compile per prompt-length bucket, one `generate`) nothing recompiles. A model whose params are on a
mesh (`dvl.load(ckpt, mesh=...)`) serves on it: slots sharded over `data` like a sampled batch, same tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Iterable

import jax
import numpy as np
from flax import nnx

from dvl_jax.diffusion import kv_cache, remask
from dvl_jax.diffusion.sampler import algorithm_of
from dvl_jax.diffusion.sampler_common import PromptArrays, compile_key
from dvl_jax.diffusion.sampling_config import GenerateOutput, Prompts, SamplingConfig, round_up
from dvl_jax.diffusion.sampling_mesh import Placement
from dvl_jax.models.interface import DiffusionLM
from dvl_jax.serving import slots as programs
from dvl_jax.serving.request import Request, Result


@dataclasses.dataclass
class _Active:
  """A request on the host: its arrays until admitted, then its slot and what was handed out."""

  prefill: programs.Prefill
  length: int  # prompt length P
  gen: int  # max_tokens G
  emitted: int = 0  # generated tokens handed out as pieces


class Engine:
  """`slots` requests decode at once, each in a row of one KV cache of `max_len` slots.

  `config`: what every request shares (algorithm, mode, temperature / top-k / top-p, block size, positions,
  `length_bucket`); its `max_len` is the cache length (default: `max_prompt` bucketed plus `max_tokens`, rounded
  up to a block). `max_prompt`: the longest prompt (it bounds the buckets, hence the compiles). `max_tokens`:
  the longest gen length a request may ask (default `config.gen_length`). `slots`: a multiple of the mesh's
  `data` axis. `chunk`: decoding forwards per `step` (the latency of admitting a request and of handing out blocks).
  """

  def __init__(self, model: DiffusionLM, config: SamplingConfig = SamplingConfig(), *, slots: int = 4,
               max_prompt: int = 256, max_tokens: int | None = None, chunk: int = 16):
    config = config.resolve(model.config)
    if slots < 1 or chunk < 1:
      raise ValueError(f"slots and chunk must be >= 1, got slots={slots}, chunk={chunk}")
    graphdef, self.state = nnx.split(model)
    placement = Placement.of(model.config, self.state)
    if placement.batch(slots) != slots:
      raise ValueError(f"slots={slots} must be a multiple of the mesh's data axis ({placement.mesh.shape['data']})")
    self.model, self.chunk, self.max_prompt = model, chunk, max_prompt
    max_tokens = max_tokens or config.gen_length
    max_len = config.max_len or round_up(round_up(max_prompt, config.length_bucket) + max_tokens, config.block_size)
    self.config = dataclasses.replace(config, gen_length=max_tokens, max_len=max_len)
    self.algorithm = algorithm_of(self.config)
    self._static = programs.Static(self.algorithm, graphdef, compile_key(self.config), placement)
    self._waiting: collections.deque[int] = collections.deque()
    self._requests: dict[int, _Active] = {}
    self._slot_of: dict[int, int] = {}  # request id -> slot
    self._free = list(range(slots))
    self._ids = itertools.count()
    idle = self._prefill(Request([model.config.pad_token_id], max_tokens=1), rows=slots)
    idle = idle._replace(prompt=idle.prompt._replace(lengths=np.zeros(slots, np.int32)))  # dead rows
    self._slots = programs.empty(self._static, self.state, kv_cache.init(model.config, slots, max_len, placement.cache),
                                 idle)

  @property
  def busy(self) -> int:
    """Requests in a slot."""
    return len(self._slot_of)

  @property
  def waiting(self) -> int:
    return len(self._waiting)

  def submit(self, request: Request) -> int:
    """Queues `request` (checked now: a bad one raises `ValueError` and changes nothing) -> its id."""
    prefill = self._prefill(request)
    config = request.config(self.config)
    for name in ("algorithm", "temperature", "top_p", "top_k"):  # not per request yet
      if getattr(config, name) != getattr(self.config, name):
        raise ValueError(f"this engine serves {name}={getattr(self.config, name)!r} only, got {name}="
                         f"{getattr(config, name)!r}: make the engine's SamplingConfig match")
    rid = next(self._ids)
    self._requests[rid] = _Active(prefill, len(request.prompt), request.max_tokens)
    self._waiting.append(rid)
    return rid

  def cancel(self, rid: int) -> bool:
    """Drops request `rid`, waiting or decoding (its slot is free for the next step) -> whether it was there."""
    if rid not in self._requests:
      return False
    if rid in self._slot_of:
      slot = self._slot_of.pop(rid)
      self._slots = programs.release(self._static, self._slots, np.int32(slot))
      self._free.append(slot)
    else:
      self._waiting.remove(rid)
    del self._requests[rid]
    return True

  def step(self) -> Result:
    """Admits waiting requests into free slots, runs one chunk of decoding and hands out what became final."""
    admitted = []
    while self._free and self._waiting:
      rid, slot = self._waiting.popleft(), self._free.pop(0)
      self._slots = programs.insert(self._static, self.state, self._slots, np.int32(slot), self._requests[rid].prefill)
      self._slot_of[rid] = slot
      admitted.append(rid)
    if not self._slot_of:
      return Result(admitted, [], [])
    self._slots, view = programs.generate(self._static, self.chunk, self.state, self._slots)
    return Result(admitted, *self._hand_out(jax.device_get(view)))

  def run(self, requests: Iterable[Request] = ()) -> dict[int, GenerateOutput]:
    """Submits `requests` and steps until nothing is left -> every request's output by id."""
    for r in requests:
      self.submit(r)
    done = {}
    while self._waiting or self._slot_of:
      done.update(self.step().finished)
    return done

  def _prefill(self, request: Request, rows: int = 1) -> programs.Prefill:
    """The host arrays of `request` (repeated over `rows`), its settings validated."""
    cfg = self.model.config
    if not 1 <= request.max_tokens <= self.config.gen_length:
      raise ValueError(f"max_tokens must be in [1, {self.config.gen_length}], got {request.max_tokens}")
    if len(request.prompt) > self.max_prompt:
      raise ValueError(f"prompt of {len(request.prompt)} tokens exceeds the engine's max_prompt={self.max_prompt}")
    config = request.config(self.config)
    prompts = Prompts.from_lists([list(request.prompt)] * rows, cfg.pad_token_id, pixel_values=request.pixel_values,
                                 image_grid_thw=request.image_grid_thw).bucketed(config, cfg)
    keys = remask.row_keys(jax.random.key(request.seed), 1)
    return programs.Prefill(PromptArrays(prompts.ids, prompts.lengths, prompts.pixel_values, prompts.vision),
                            np.full(rows, request.max_tokens, np.int32), keys[np.zeros(rows, int)],
                            self.algorithm.inputs(self.model, prompts, config))

  def _hand_out(self, view: dict[str, np.ndarray]) -> tuple[list, list]:
    """(pieces, finished) from each busy slot's tokens so far; finished requests free their slots."""
    pieces, finished = [], []
    bs, blocks = self.config.block_size, self.config.algorithm == "block_diffusion"
    for rid, slot in list(self._slot_of.items()):
      a = self._requests[rid]
      decoded = view["steps"][slot, :a.gen] >= 0
      final = a.gen if decoded.all() else int(np.argmin(decoded))  # the decoded prefix
      offset = a.length if blocks else 0  # pieces end at whole blocks: absolute ones, AR's of generated tokens
      while (end := min(a.emitted + bs - (offset + a.emitted) % bs, a.gen)) <= final and a.emitted < final:
        pieces.append((rid, view["tokens"][slot, a.emitted:end]))
        a.emitted = end
      if view["done"][slot]:
        if a.emitted < final:
          pieces.append((rid, view["tokens"][slot, a.emitted:final]))
        row = lambda k: view[k][slot:slot + 1]
        finished.append((rid, GenerateOutput.build(row("tokens")[:, :a.gen], row("decoded"), row("nfe"),
                                                   int(row("nfe")[0]), row("steps")[:, :a.gen],
                                                   self.model.config.eos_token_id)))
        del self._slot_of[rid], self._requests[rid]
        self._free.append(slot)
    return pieces, finished
