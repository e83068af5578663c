"""The serving engine: a request's tokens equal `dvl.generate` run on it alone, whatever shares the slots and
whenever it arrives; its pieces rebuild its output; nothing recompiles after warm-up; bad requests raise."""

import functools

import jax
import numpy as np
import pytest

from dvl_jax.diffusion import sampler
from dvl_jax.diffusion.sampling_config import Prompts, SamplingConfig
from dvl_jax.parallel.mesh import make_mesh
from dvl_jax.parallel.rules import shard_model
from dvl_jax.serving import slots
from dvl_jax.serving.engine import Engine
from dvl_jax.serving.request import Request
from dvl_jax.testing.tiny import tiny_config, tiny_model

EOS = 249  # a token the tiny model decodes often, so some requests stop early (free their slot) and others run on
CFG = tiny_config(eos_token_id=EOS)
BUCKET = 8
ENGINES = {"fused": SamplingConfig(length_bucket=BUCKET),
           "reference": SamplingConfig(length_bucket=BUCKET, mode="reference"),
           "autoregressive": SamplingConfig(length_bucket=BUCKET, algorithm="autoregressive")}
SETTINGS = [{}, {"steps": 2}, {"steps": 4}, {"remasking_strategy": "low_confidence_dynamic", "confidence_threshold": 0.6},
            {"remasking_strategy": "threshold", "confidence_threshold": 0.7}]


@functools.cache
def model():
  """Confidences spread over (0, 1), so the strategies decide differently."""
  return tiny_model(CFG, logit_scale=40.0)


def requests(n, seed, lengths=(1, 16), gens=(6, 14), **common):
  rng = np.random.default_rng(seed)
  return [Request([int(t) for t in rng.integers(3, 200, rng.integers(*lengths, endpoint=True))],
                  max_tokens=int(rng.choice(gens)), seed=i, **SETTINGS[i % len(SETTINGS)], **common)
          for i in range(n)]


def interleaved(engine, batches, steps_between=2):
  """Submits each batch after `steps_between` steps -> ({id: request}, {id: output}, {id: pieces})."""
  sent, outputs, pieces = {}, {}, {}
  for batch in batches:
    sent.update({engine.submit(r): r for r in batch})
    for _ in range(steps_between):
      result = engine.step()
      outputs.update(result.finished)
      for rid, p in result.pieces:
        pieces.setdefault(rid, []).append(p)
  while engine.busy or engine.waiting:
    result = engine.step()
    outputs.update(result.finished)
    for rid, p in result.pieces:
      pieces.setdefault(rid, []).append(p)
  return sent, outputs, pieces


@pytest.mark.parametrize("setting", list(ENGINES))
def test_greedy_tokens_equal_generate_alone_with_interleaved_arrivals(setting):
  engine = Engine(model(), ENGINES[setting], slots=3, max_prompt=16, max_tokens=14, chunk=3)
  algorithm = engine.config.algorithm
  sent, outputs, pieces = interleaved(engine, [requests(n, i, algorithm=algorithm) for i, n in enumerate((4, 3, 2))])
  assert sorted(outputs) == sorted(sent)
  rest = CFG.pad_token_id if setting == "autoregressive" else CFG.mask_token_id
  stopped = 0
  for rid, request in sent.items():
    out = outputs[rid]
    want = sampler.generate(model(), [list(request.prompt)], request.config(engine.config),
                            rng=jax.random.key(request.seed))
    np.testing.assert_array_equal(out.tokens, want.tokens)
    np.testing.assert_array_equal(out.steps_per_token, want.steps_per_token)
    np.testing.assert_array_equal(out.nfe, want.nfe)
    streamed = np.concatenate(pieces[rid])
    assert out.lengths[0] <= len(streamed)  # through EOS (block diffusion: the rest of its block too)
    np.testing.assert_array_equal(streamed, out.tokens[0, :len(streamed)])
    assert (out.tokens[0, len(streamed):] == rest).all()
    stopped += out.lengths[0] < request.max_tokens
  assert 0 < stopped < len(sent)  # some stopped at EOS, some ran to max_tokens


def test_an_image_request_equals_generate_alone_among_text_requests():
  grid = np.array([[1, 4, 8]])
  image = [CFG.vision_start_token_id] + [CFG.image_token_id] * 8 + [CFG.vision_end_token_id]
  pixels = np.random.default_rng(3).normal(size=(32, CFG.vision.patch_dim)).astype(np.float32)
  request = Request([5, 9, 11] + image + [7, 8], max_tokens=14, steps=4, pixel_values=pixels, image_grid_thw=grid)
  engine = Engine(model(), ENGINES["fused"], slots=3, max_prompt=16, max_tokens=14, chunk=3)
  text = requests(3, 3)
  outputs = engine.run([text[0], request, *text[1:]])
  want = sampler.generate(model(), Prompts.from_lists([list(request.prompt)], pixel_values=pixels, image_grid_thw=grid),
                          request.config(engine.config))
  np.testing.assert_array_equal(outputs[1].tokens, want.tokens)
  np.testing.assert_array_equal(outputs[1].nfe, want.nfe)


def test_sampled_tokens_equal_generate_alone_with_the_request_seed():
  config = SamplingConfig(length_bucket=16, temperature=0.9, top_k=40, top_p=0.95)
  engine = Engine(model(), config, slots=3, max_prompt=16, max_tokens=10, chunk=2)
  sent = [Request(r.prompt, max_tokens=10, steps=r.steps, seed=r.seed % 3, temperature=0.9, top_k=40, top_p=0.95)
          for r in requests(6, 4, lengths=(9, 16))]
  outputs = engine.run(sent)
  for rid, request in enumerate(sent):
    want = sampler.generate(model(), [list(request.prompt)], request.config(engine.config),
                            rng=jax.random.key(request.seed))
    np.testing.assert_array_equal(outputs[rid].tokens, want.tokens)


def test_on_a_mesh_the_tokens_equal_one_device():
  sharded = shard_model(model(), make_mesh((4, 1, 2)))
  sent = requests(6, 6)
  engine = Engine(sharded, ENGINES["fused"], slots=4, max_prompt=16, max_tokens=14, chunk=3)
  engine.run(sent)
  before = dict(slots.TRACES)
  outputs = engine.run(sent)  # the slots come back on the shardings they went in with: no recompile
  assert dict(slots.TRACES) == before
  want = Engine(model(), ENGINES["fused"], slots=4, max_prompt=16, max_tokens=14, chunk=3).run(sent)
  for rid in want:
    np.testing.assert_array_equal(outputs[rid + len(sent)].tokens, want[rid].tokens)
    np.testing.assert_array_equal(outputs[rid + len(sent)].nfe, want[rid].nfe)


def test_nothing_recompiles_after_warm_up():
  engine = Engine(model(), ENGINES["fused"], slots=4, max_prompt=24, max_tokens=12, chunk=4)
  engine.run([Request([5] * n, max_tokens=4) for n in (3, 12, 20)])  # one prompt per length bucket
  before = dict(slots.TRACES)
  batches = [requests(12, seed, lengths=(1, 24), gens=(3, 12)) for seed in range(8)]
  sent, outputs, _ = interleaved(engine, batches, steps_between=3)
  assert len(outputs) == len(sent) == 96
  assert dict(slots.TRACES) == before
  for rid, request in sent.items():
    assert outputs[rid].tokens.shape == (1, request.max_tokens)


def test_a_cancelled_request_frees_its_slot_and_changes_no_other():
  engine = Engine(model(), ENGINES["fused"], slots=3, max_prompt=16, max_tokens=14, chunk=3)
  sent = [Request(r.prompt, max_tokens=14) for r in requests(5, 5)]  # one token per forward: none ends in a step
  alone = engine.run(sent)
  ids = [engine.submit(r) for r in sent]  # three decode, two wait
  assert not engine.step().finished
  assert engine.cancel(ids[1]) and engine.cancel(ids[4]) and not engine.cancel(ids[4])
  assert engine.busy == 2 and engine.waiting == 1
  outputs = engine.run()
  assert sorted(outputs) == [ids[0], ids[2], ids[3]]
  for i in (0, 2, 3):
    np.testing.assert_array_equal(outputs[ids[i]].tokens, alone[i].tokens)


@pytest.mark.parametrize("request_, message", [
    (Request([5] * 3, max_tokens=13), "max_tokens"),
    (Request([5] * 17, max_tokens=4), "max_prompt"),
    (Request([], max_tokens=4), "prompt lengths"),
    (Request([5] * 3, max_tokens=4, steps=0), "steps"),
    (Request([5] * 3, max_tokens=4, remasking_strategy="top"), "remasking_strategy"),
    (Request([5] * 3, max_tokens=4, temperature=-1.0), "temperature"),
    (Request([5] * 3, max_tokens=4, top_k=-2), "top_k"),
    (Request([5] * 3, max_tokens=4, top_p=1.5), "top_p"),
    (Request([5] * 3, max_tokens=4, seed=-1), "seed"),
    (Request([5] * 3, max_tokens=4, algorithm="beam"), "algorithm"),
])
def test_a_bad_request_raises_and_changes_nothing(request_, message):
  engine = Engine(model(), ENGINES["fused"], slots=2, max_prompt=16, max_tokens=12, chunk=3)
  with pytest.raises(ValueError, match=message):
    engine.submit(request_)
  assert engine.waiting == 0
  assert len(engine.run([Request([5] * 3, max_tokens=4)])) == 1
