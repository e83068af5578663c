"""The serving engine: a request's tokens (greedy, or sampled with its seed) equal `dvl.generate` run on it alone
under its own settings, whatever shares the slots and whenever it arrives; its pieces rebuild its output;
nothing recompiles after warm-up; bad requests raise one-line errors."""

import dataclasses
import functools
import logging

import jax
import numpy as np
import pytest

from dvl_jax.core import mappings
from dvl_jax.diffusion import remask, sampler
from dvl_jax.diffusion.sampling_config import Prompts, SamplingConfig, round_up
from dvl_jax.parallel.mesh import make_mesh
from dvl_jax.parallel.rules import shard_model
from dvl_jax.serving import slots
from dvl_jax.serving.engine import Engine, longest_prompt
from dvl_jax.serving.request import Request
from dvl_jax.testing.tiny import tiny_config, tiny_model

EOS = 249  # a token the tiny model decodes often, so some requests stop early (free their slot) and others run on
CFG = tiny_config(eos_token_id=EOS)
BUCKET = 8
CONFIG = SamplingConfig(length_bucket=BUCKET)
# shared: the tests reuse each other's compiles
SIZES = {"slots": 3, "max_prompt": 16, "max_tokens": 14, "chunk": 3, "views": 4}
DECODERS = [{"steps": 2}, {"steps": 4}, {"remasking_strategy": "low_confidence_dynamic", "confidence_threshold": 0.6},
            {"remasking_strategy": "threshold", "confidence_threshold": 0.7}, {"algorithm": "autoregressive"}]
SAMPLING = [{}, {"temperature": 0.9, "top_k": 40, "top_p": 0.95}, {"temperature": 0.6}]  # coprime with DECODERS


@functools.cache
def model():
  """Confidences spread over (0, 1), so the strategies decide differently."""
  return tiny_model(CFG, logit_scale=40.0)


def requests(n, seed, lengths=(1, 16), gens=(6, 14), decoders=DECODERS):
  """`n` requests cycling through the (decoder, sampling) pairs, with random prompts, lengths and seeds."""
  rng = np.random.default_rng(seed)
  return [Request([int(t) for t in rng.integers(3, 200, rng.integers(*lengths, endpoint=True))],
                  max_tokens=int(rng.choice(gens)), seed=int(rng.integers(0, 2 ** 32)),
                  **decoders[i % len(decoders)], **SAMPLING[i % len(SAMPLING)]) for i in range(n)]


def interleaved(engine, batches, steps_between=2):
  """Submits each batch after `steps_between` steps -> ({id: request}, {id: output}, {id: pieces})."""
  sent, outputs, pieces = {}, {}, {}

  def step():
    result = engine.step()
    outputs.update(result.finished)
    for rid, p in result.pieces:
      pieces.setdefault(rid, []).append(p)

  for batch in batches:
    sent.update({engine.submit(r): r for r in batch})
    for _ in range(steps_between):
      step()
  while engine.busy or engine.waiting:
    step()
  return sent, outputs, pieces


def assert_decodes_as_alone(engine, request, out, want):
  """The tokens are `want`'s (`dvl.generate` alone); so are NFE and the forward that fixed each token, except that
  in fused mode a block's commit runs alone when few slots commit in that forward, one forward more for the row."""
  np.testing.assert_array_equal(out.tokens, want.tokens)
  config = request.config(engine.config)
  if config.algorithm == "autoregressive" or config.mode == "reference" or config.fused_window_share == 0:
    np.testing.assert_array_equal(out.steps_per_token, want.steps_per_token)
    np.testing.assert_array_equal(out.nfe, want.nfe)
  else:
    blocks = -(-(len(request.prompt) + request.max_tokens) // config.block_size)
    assert want.nfe[0] <= out.nfe[0] <= want.nfe[0] + blocks
    decoded = want.steps_per_token >= 0
    np.testing.assert_array_equal(out.steps_per_token >= 0, decoded)
    assert (out.steps_per_token >= want.steps_per_token)[decoded].all()


def alone(engine, request, **images):
  """`dvl.generate` on `request` alone with its own settings and seed."""
  prompts = Prompts.from_lists([list(request.prompt)], **images)
  return sampler.generate(model(), prompts, request.config(engine.config), rng=jax.random.key(request.seed))


# Each mode's batches of arrivals: block diffusion and AR, greedy and sampled, mixed prompt and gen lengths, each
# mode in one prompt bucket (every bucket and gen length is one more compile of `dvl.generate` alone); the first
# block-diffusion requests are short, so their chunks attend to a shorter cache view until longer ones arrive
BD, AR = DECODERS[:-1], DECODERS[-1:]
ARRIVALS = {"fused": lambda: [requests(4, 0, (1, 8), (6,), BD) + requests(2, 10, (1, 8), (14,), AR),
                              requests(3, 1, (1, 8), decoders=BD) + requests(1, 11, (1, 8), (14,), AR),
                              requests(3, 2, (1, 8), decoders=BD) + requests(2, 12, (1, 8), (14,), AR)],
            "reference": lambda: [requests(3, seed, (9, 16), (14,), BD) for seed in range(3)]}


@pytest.mark.parametrize("mode", list(ARRIVALS))
def test_tokens_equal_generate_alone_with_interleaved_arrivals(mode, monkeypatch):
  packed = {"packed_commit_share": 0.25} if mode == "fused" else {}  # a lone commit rides in a packed forward
  engine = Engine(model(), dataclasses.replace(CONFIG, mode=mode, **packed), **SIZES)
  views, generate = [], slots.generate
  monkeypatch.setattr(slots, "generate", lambda static, n, view, *rest: views.append(view) or
                      generate(static, n, view, *rest))
  sent, outputs, pieces = interleaved(engine, ARRIVALS[mode]())
  assert sorted(outputs) == sorted(sent)
  need = max(round_up(len(r.prompt) + r.max_tokens, engine.config.block_size) for r in sent.values())
  assert max(views) == min(v for v in engine.views if v >= need)  # the longest request's view, no longer
  assert mode == "reference" or min(views) < max(views)  # fused: short requests first, a shorter view
  stopped, differs = 0, 0
  for rid, request in sent.items():
    out, want = outputs[rid], alone(engine, request)
    assert_decodes_as_alone(engine, request, out, want)
    streamed = np.concatenate(pieces[rid])
    assert out.lengths[0] <= len(streamed)  # through EOS (block diffusion: the rest of its block too)
    np.testing.assert_array_equal(streamed, out.tokens[0, :len(streamed)])
    rest = CFG.pad_token_id if request.algorithm == "autoregressive" else CFG.mask_token_id
    assert (out.tokens[0, len(streamed):] == rest).all()
    stopped += out.lengths[0] < request.max_tokens
    if request.temperature > 0:  # the seed matters: another one samples other tokens
      differs += not np.array_equal(alone(engine, dataclasses.replace(request, seed=request.seed + 1)).tokens,
                                    out.tokens)
  assert 0 < stopped < len(sent)  # some stopped at EOS, some ran to max_tokens
  assert differs >= 3


def test_image_requests_equal_generate_alone_and_a_new_image_layout_does_not_recompile():
  image = lambda n: [CFG.vision_start_token_id] + [CFG.image_token_id] * n + [CFG.vision_end_token_id]
  pixels = np.random.default_rng(3).normal(size=(32, CFG.vision.patch_dim)).astype(np.float32)
  wide = Request([5, 9, 11] + image(8) + [7, 8], max_tokens=14, steps=4, pixel_values=pixels,
                 image_grid_thw=np.array([[1, 4, 8]]))
  engine = Engine(model(), CONFIG, **SIZES)
  text = requests(3, 3)
  outputs = engine.run([text[0], wide, *text[1:]])
  before = dict(slots.TRACES)  # another grid, patch count and image-token count in the same buckets
  small = Request([5] + image(4) + [7, 8, 9], max_tokens=14, remasking_strategy="threshold",
                  pixel_values=pixels[:16], image_grid_thw=np.array([[1, 4, 4]]))
  outputs.update(engine.run([small, text[1]]))
  assert dict(slots.TRACES) == before
  for rid, request in ((1, wide), (4, small)):
    want = alone(engine, request, pixel_values=request.pixel_values, image_grid_thw=request.image_grid_thw)
    assert_decodes_as_alone(engine, request, outputs[rid], want)


def test_warm_up_with_an_image_compiles_its_inserts_for_every_bucket_that_holds_it():
  """An image size first met under load would stall every slot for a compile; warmed up, none happens."""
  image = [CFG.vision_start_token_id] + [CFG.image_token_id] * 8 + [CFG.vision_end_token_id]
  pixels = np.random.default_rng(4).normal(size=(32, CFG.vision.patch_dim)).astype(np.float32)
  sample = Request([5] + image, max_tokens=1, pixel_values=pixels, image_grid_thw=np.array([[1, 4, 8]]))
  engine = Engine(model(), CONFIG, **SIZES)
  engine.warm_up(["autoregressive"], images=[sample])  # AR: no other test compiles its image inserts first
  before = dict(slots.TRACES)
  late = Request([5, 9, 11, 12, 13] + image + [7], max_tokens=14, algorithm="autoregressive",
                 pixel_values=pixels[::-1].copy(), image_grid_thw=np.array([[1, 4, 8]]))
  (out,) = engine.run([late]).values()
  assert out.tokens.shape == (1, 14)
  assert dict(slots.TRACES) == before
  with pytest.raises(ValueError, match="warm-up image prompt of 20 tokens exceeds the engine's max_prompt=16"):
    engine.warm_up(["autoregressive"], images=[dataclasses.replace(sample, prompt=[5] * 10 + image)])


def test_on_a_mesh_the_tokens_equal_one_device():
  sharded = shard_model(model(), make_mesh((4, 1, 2)))
  sent = requests(6, 6, (1, 8), decoders=BD)
  engine = Engine(sharded, CONFIG, **{**SIZES, "slots": 4})
  engine.run(sent)
  before = dict(slots.TRACES)
  outputs = engine.run(sent)  # the slots come back on the shardings they went in with: no recompile
  assert dict(slots.TRACES) == before
  for i, request in enumerate(sent):
    assert_decodes_as_alone(engine, request, outputs[i + len(sent)], alone(engine, request))  # on one device


def test_nothing_recompiles_after_warm_up():
  engine = Engine(model(), CONFIG, **SIZES)
  engine.warm_up()  # both algorithms, one prompt per length bucket
  before = dict(slots.TRACES)
  batches = [requests(30, seed, lengths=(1, 16), gens=(3, 14)) for seed in range(8)]
  sent, outputs, _ = interleaved(engine, batches, steps_between=3)
  assert len(outputs) == len(sent) == 240
  assert dict(slots.TRACES) == before
  for rid, request in sent.items():
    assert outputs[rid].tokens.shape == (1, request.max_tokens)


def test_warm_up_warns_when_its_programs_hold_much_of_the_memory_mappings(monkeypatch, caplog):
  engine = Engine(model(), CONFIG, **SIZES)
  monkeypatch.setattr(mappings, "HEADROOM", 1.0)  # never
  with caplog.at_level(logging.WARNING, logger="dvl_jax.serving.engine"):
    engine.warm_up(["autoregressive"])
    assert not caplog.records
    monkeypatch.setattr(mappings, "HEADROOM", 0.0)  # any mapping is too many
    engine.warm_up(["autoregressive"])
  (record,) = caplog.records
  assert "memory mappings Linux allows (vm.max_map_count" in record.getMessage()


def test_near_the_mapping_limit_only_requests_with_a_compiled_insert_are_taken(monkeypatch):
  """A new prompt bucket would compile an `insert` past the limit (which aborts the process): refused, one line,
  nothing changed; requests of a compiled shape keep coming in and decode."""
  engine = Engine(model(), CONFIG, **SIZES)
  engine.run([Request([5, 6, 7], max_tokens=4, algorithm="autoregressive")])  # its 8-token bucket is compiled
  monkeypatch.setattr(mappings, "usage", lambda *_: (95, 100))
  same = Request([8, 9], max_tokens=4, algorithm="autoregressive")
  rid = engine.submit(same)
  with pytest.raises(mappings.NoRoom, match=r"^a 13-token autoregressive prompt needs a program this server has not "
                                            r"compiled, and the process holds 95 of the 100 memory mappings"):
    engine.submit(Request([5] * 13, max_tokens=4, algorithm="autoregressive"))
  assert engine.waiting == 1
  outputs = engine.run()
  assert list(outputs) == [rid]
  assert_decodes_as_alone(engine, same, outputs[rid], alone(engine, same))


def test_near_the_mapping_limit_a_chunk_runs_on_a_compiled_longer_view_with_the_same_tokens(monkeypatch):
  engine = Engine(model(), CONFIG, **SIZES)
  assert engine.views == [16, 24, 32]
  real, views = slots.generate, []
  monkeypatch.setattr(slots, "generate", lambda static, forwards, view, *rest: (views.append(view),
                                                                                real(static, forwards, view, *rest))[1])
  engine.run([Request([5] * 16, max_tokens=14, algorithm="autoregressive")])  # P + G = 30: the 32-slot view
  assert set(views) == {32}
  short = Request(list(range(5, 14)), max_tokens=4, algorithm="autoregressive")  # same bucket; P + G = 13: 16 slots
  with monkeypatch.context() as near_the_limit:
    near_the_limit.setattr(mappings, "usage", lambda *_: (95, 100))
    (out,) = engine.run([short]).values()
  assert set(views) == {32}  # the compiled program, not a new one for the shorter view
  assert_decodes_as_alone(engine, short, out, alone(engine, short))
  engine.run([short])
  assert views[-1] == 16  # with room, the shortest view that holds it


def test_near_the_mapping_limit_with_no_compiled_program_that_fits_every_program_is_dropped_first(monkeypatch):
  engine = Engine(model(), CONFIG, **SIZES)
  engine.run([Request(list(range(5, 14)), max_tokens=4, algorithm="autoregressive")])  # P + G = 13: 16 slots only
  long = Request([5] * 16, max_tokens=14, algorithm="autoregressive")  # the same bucket; P + G = 30: 32 slots
  real, clears = jax.clear_caches, []
  with monkeypatch.context() as near_the_limit:
    near_the_limit.setattr(mappings, "usage", lambda *_: (95, 100))
    near_the_limit.setattr(jax, "clear_caches", lambda: (clears.append(1), real()))
    (out,) = engine.run([long]).values()
  assert len(clears) == 1 and engine._pools["autoregressive"].decoders == {(32, engine.slots)}
  assert_decodes_as_alone(engine, long, out, alone(engine, long))


def test_a_step_ends_when_a_request_finishes_and_looks_often_while_a_slot_is_free(monkeypatch):
  """So a finished request's slot is refilled at once, and a request that arrives while a slot is free waits at
  most `admit_every` forwards."""
  engine = Engine(model(), CONFIG, **{**SIZES, "chunk": 64, "admit_every": 1})
  forwards, generate = [], slots.generate
  monkeypatch.setattr(slots, "generate", lambda static, n, *rest: forwards.append(int(n)) or
                      generate(static, n, *rest))
  sent = [Request(r.prompt, max_tokens=gen, algorithm="autoregressive") for r, gen in zip(requests(3, 9), (4, 9, 14))]
  nfe = [int(alone(engine, r).nfe[0]) for r in sent]
  ids = [engine.submit(r) for r in sent]
  first = engine.step()  # every slot busy: up to 64 forwards, but only until the first request is done
  assert forwards == [64] and 1 <= len(first.finished) < 3
  assert {rid for rid, _ in first.finished} == {rid for rid, n in zip(ids, nfe) if n == min(nfe)}
  late = engine.submit(Request([5, 6], max_tokens=3, algorithm="autoregressive"))
  second = engine.step()
  assert late in second.admitted and forwards[1] == 64  # the freed slot took the waiting request
  engine.run()
  assert forwards[2:] and set(forwards[2:]) == {1}  # from then on a slot is free: one forward per look


def test_the_cache_views_step_down_by_about_a_square_root_of_two():
  """Finer than halving: a request with an image (~390 slots with its answer) in a 640-slot cache reads 456
  slots rather than all 640."""
  engine = Engine(model(), CONFIG, slots=8, max_prompt=512, max_tokens=128, views=7)
  assert engine.config.max_len == 640 and engine.views == [80, 120, 160, 232, 320, 456, 640]
  assert all(v % engine.config.block_size == 0 for v in engine.views)


@pytest.mark.parametrize("backend, head_dim, views", [("auto", 16, 7), ("pallas_gpu", 16, 1), ("splash", 16, 1),
                                                      ("pallas_gpu", 24, 7)])
def test_one_view_by_default_where_decoding_reads_only_each_rows_live_cache(backend, head_dim, views):
  """The GPU and TPU decoding kernels read each row's live cache tiles in place: there a shorter view would only
  add compiles and copy its slice of the cache in and out every chunk. The CPU's dense attention (`auto` here)
  reads the whole view, and so does the own GPU kernel at a head dim it pads (it concatenates the cache)."""
  cfg = dataclasses.replace(CFG, attention_backend=backend,
                            text=dataclasses.replace(CFG.text, hidden_size=CFG.text.num_heads * head_dim))
  engine = Engine(tiny_model(cfg), CONFIG, slots=8, max_prompt=512, max_tokens=128)
  with pytest.raises(ValueError, match="views must be >= 1"):  # 0 is not the default
    Engine(tiny_model(cfg), CONFIG, slots=8, max_prompt=512, max_tokens=128, views=0)
  assert len(engine.views) == views and engine.views[-1] == engine.config.max_len == 640


def test_the_longest_prompt_is_the_longest_whose_cache_fits_the_positions():
  """`longest_prompt` (`dvl serve`'s default max_prompt) against a search over every prompt length: the longest
  with `round_up(round_up(P, bucket) + G, block)` within `max_position_embeddings`, capped."""
  rng = np.random.default_rng(0)
  for _ in range(200):
    positions, gen, bucket, block = (int(rng.integers(*r)) for r in ((16, 600), (1, 200), (1, 70), (1, 17)))
    cap = int(rng.choice([positions, rng.integers(1, 700)]))
    cfg = with_positions(positions)
    config = SamplingConfig(gen_length=gen, length_bucket=bucket, block_size=block)
    fits = [p for p in range(1, cap + 1) if round_up(round_up(p, bucket) + gen, block) <= positions]
    if not fits:
      with pytest.raises(ValueError, match="leaves no room for a prompt"):
        longest_prompt(cfg, config, cap=cap)
    else:
      assert longest_prompt(cfg, config, cap=cap) == max(fits)
  demo = with_positions(1024)  # the demo's model: 1024 prompt tokens + 128 do not fit
  assert longest_prompt(demo, SamplingConfig()) == 896 and longest_prompt(CFG, SamplingConfig()) == 1024
  with pytest.raises(ValueError, match="lower max_prompt to 896 or max_tokens"):
    Engine(tiny_model(demo), SamplingConfig(), max_prompt=1024, max_tokens=128)


def with_positions(positions):
  return CFG.replace(text=dataclasses.replace(CFG.text, max_position_embeddings=positions))


def test_compacted_chunks_run_narrower_decode_as_alone_and_nothing_recompiles(monkeypatch):
  """`SamplingConfig.compact_rows`: a chunk runs on the narrowest of 3, 2, 1 rows that holds its busy slots (one
  compile per view and width, all at warm-up), and every request's tokens are still those of `dvl.generate`
  alone."""
  engine = Engine(model(), dataclasses.replace(CONFIG, compact_rows=True), **{**SIZES, "views": 2})
  assert engine.widths == [1, 2, 3]
  engine.warm_up(["block_diffusion"])
  before = dict(slots.TRACES)
  widths, generate = [], slots.generate
  monkeypatch.setattr(slots, "generate", lambda static, n, view, width, *rest: widths.append(width) or
                      generate(static, n, view, width, *rest))
  sent, outputs, _ = interleaved(engine, [requests(4, 20, gens=(6, 14), decoders=BD),
                                          requests(2, 21, gens=(6, 14), decoders=BD)])
  assert dict(slots.TRACES) == before and set(widths) == {1, 2, 3}
  for rid, request in sent.items():
    assert_decodes_as_alone(engine, request, outputs[rid], alone(engine, request))
  with pytest.raises(ValueError, match="compact_rows needs the params on one device"):
    Engine(shard_model(model(), make_mesh((4, 1, 2))), dataclasses.replace(CONFIG, compact_rows=True), slots=4)


def test_ar_slots_run_the_sampled_proposal_only_while_a_row_samples(monkeypatch):
  """The AR pool compiles for sampling, but a forward whose rows all decode greedily takes the argmax path only
  (no top-k / top-p sorts over the vocabulary): the sampled proposal runs while a sampling request decodes."""
  runs, sampled = [], remask.propose

  def counted(*args, **kwargs):
    jax.debug.callback(lambda: runs.append(1))
    return sampled(*args, **kwargs)

  monkeypatch.setattr(remask, "propose", counted)
  engine = Engine(model(), CONFIG, **dict(SIZES, slots=2))  # its own compile, traced with the counter
  greedy = [Request([5, 6, 7], max_tokens=6, algorithm="autoregressive"), Request([9] * 11, max_tokens=14,
                                                                                   algorithm="autoregressive")]
  for request, out in zip(greedy, engine.run(greedy).values()):
    assert_decodes_as_alone(engine, request, out, alone(engine, request))
  assert not runs
  engine.run([dataclasses.replace(greedy[0], temperature=0.8, seed=3)])
  assert len(runs) >= 5  # one per forward of the sampled request (its last token may end the loop early)


def test_a_cancelled_request_frees_its_slot_and_changes_no_other():
  engine = Engine(model(), CONFIG, **SIZES)
  sent = [Request(r.prompt, max_tokens=14) for r in requests(5, 5)]  # one token per forward: none ends in a step
  first = engine.run(sent)
  ids = [engine.submit(r) for r in sent]  # three decode, two wait
  assert not engine.step().finished
  assert engine.cancel(ids[1]) and engine.cancel(ids[4]) and not engine.cancel(ids[4])
  assert engine.busy == 2 and engine.waiting == 1
  outputs = engine.run()
  assert sorted(outputs) == [ids[0], ids[2], ids[3]]
  for i in (0, 2, 3):
    np.testing.assert_array_equal(outputs[ids[i]].tokens, first[i].tokens)


@pytest.mark.parametrize("request_, message", [
    (Request([5] * 3, max_tokens=15), "max_tokens"),
    (Request([5] * 17, max_tokens=4), "max_prompt"),
    (Request([], max_tokens=4), "every prompt needs at least one token"),
    (Request([5, CFG.text.vocab_size], max_tokens=4), r"token ids must be in \[0, 256\)"),
    (Request([5] * 3, max_tokens=0), r"max_tokens must be in \[1, 14\], got 0"),
    (Request([5] * 3, max_tokens=4, steps=0), "steps"),
    (Request([5] * 3, max_tokens=4, remasking_strategy="top"), "remasking_strategy"),
    (Request([5] * 3, max_tokens=4, confidence_threshold=1.0), "confidence_threshold"),
    (Request([5] * 3, max_tokens=4, temperature=-1.0), "temperature"),
    (Request([5] * 3, max_tokens=4, temperature=float("nan")), "temperature"),
    (Request([5] * 3, max_tokens=4, top_k=-2), "top_k"),
    (Request([5] * 3, max_tokens=4, top_p=1.5), "top_p"),
    (Request([5] * 3, max_tokens=4, seed=-1), "seed"),
    (Request([5] * 3, max_tokens=4, seed=2 ** 32), "seed"),
    (Request([5] * 3, max_tokens=4, algorithm="beam"), "algorithm"),
])
def test_a_bad_request_raises_one_line_and_changes_nothing(request_, message):
  engine = Engine(model(), CONFIG, **SIZES)
  with pytest.raises(ValueError, match=message) as raised:
    engine.submit(request_)
  assert "\n" not in str(raised.value)
  assert engine.waiting == 0
  assert len(engine.run([Request([5] * 3, max_tokens=4)])) == 1


def test_a_request_without_max_tokens_asks_for_the_engines_longest_answer_and_text_is_refused():
  engine = Engine(model(), CONFIG, **SIZES)
  request = Request([5] * 3, steps=4)
  (out,) = engine.run([request]).values()
  assert out.tokens.shape == (1, SIZES["max_tokens"])
  np.testing.assert_array_equal(out.tokens, alone(engine, request).tokens)
  with pytest.raises(TypeError, match="a Request's prompt is token ids, not text"):
    Request("what is this?")
  with pytest.raises(TypeError, match="config must be a dvl.SamplingConfig"):
    Engine(model(), {"gen_length": 8}, **SIZES)


def test_the_engine_config_per_request_settings_change_no_request():
  """A server keeps its defaults there: a request's own settings decide (M-RoPE positions reach AR requests only,
  so block-diffusion ones still run)."""
  defaults = dataclasses.replace(CONFIG, algorithm="autoregressive", positions="mrope", temperature=0.7, steps=3)
  sent = requests(3, 7, (1, 8), (14,), DECODERS[:1])
  outputs = Engine(model(), defaults, **SIZES).run(sent)
  for rid, want in Engine(model(), CONFIG, **SIZES).run(sent).items():
    np.testing.assert_array_equal(outputs[rid].tokens, want.tokens)
