"""grain pipeline: global sharded batches, seeded shuffling, per-process shards, resumable state,
static bucketed shapes, and image features spliced into the right rows across padded shards."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from dvl_jax.data import synthetic
from dvl_jax.data.host_batch import HostBatcher
from dvl_jax.data.pipeline import DataConfig, DataPipeline, batch_shards
from dvl_jax.data.samples import SampleEncoder
from dvl_jax.core.vision_layout import vision_layout
from dvl_jax.models.families import abstract_model
from dvl_jax.parallel.mesh import make_mesh
from tests.data.helpers import make_processor, noise_image, qa_row

PROC = make_processor()
CONFIG = DataConfig(batch_size=16, max_length=128, num_buckets=3, length_multiple=8, square_pad=False,
                    num_threads=0)


def _rows():
  """Synthetic image rows, images of other sizes, text-only rows and two-image dialogues."""
  rows = [synthetic.llava_row(ex, f"s{i}") for i, ex in enumerate(synthetic.examples(24, seed=0))]
  answers = ["A", "A big", "A big red", "A big red ball ."]
  rows += [qa_row(f"i{i}", "What is this ?", answers[i % 4], noise_image(28 * (2 + i % 3), 56, i)) for i in range(16)]
  rows += [qa_row(f"t{i}", "Tell me more about it .", " ".join(["It rolls ."] * (1 + i % 5))) for i in range(24)]
  rows += [{"id": f"d{i}", "image": [noise_image(56 + 28 * (i % 2), 56, i), noise_image(84, 56 + 28 * (i % 3), i)],
            "conversations": [{"from": "human", "value": "<image>\nWhat is this ?"}, {"from": "gpt", "value": "A ball"},
                              {"from": "human", "value": "<image>\nTell me more"},
                              {"from": "gpt", "value": "It rolls ."}]} for i in range(16)]
  return rows


ROWS = _rows()


def _pipeline(**changes):
  return DataPipeline(ROWS, PROC, dataclasses.replace(CONFIG, **changes), make_mesh((2, 4, 1)))


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def test_batches_are_global_arrays_sharded_over_data_and_fsdp():
  it = iter(_pipeline())
  batch = next(b for b in it if "pixel_values" in b)
  rows = PartitionSpec(("data", "fsdp"), None)
  for key in ("input_ids", "labels", "attention_mask", "pixel_values"):
    assert batch[key].sharding.spec == rows
  assert batch["input_ids"].shape[0] == 16 and batch["pixel_values"].shape[0] % 8 == 0
  assert all(x.sharding.spec == PartitionSpec() for x in jax.tree.leaves(batch["vision"]))
  assert batch_shards(make_mesh((2, 2, 2))) == (4, [0, 1, 2, 3])  # tensor replicas share a shard


def test_shuffling_is_seeded_and_reshuffles_every_epoch():
  a, b, c = _pipeline(), _pipeline(), _pipeline(seed=1)
  rows = lambda p, e: np.concatenate([x.rows for x in p.plan.epoch(e)])  # noqa: E731
  np.testing.assert_array_equal(rows(a, 0), rows(b, 0))
  assert not np.array_equal(rows(a, 0), rows(c, 0)) and not np.array_equal(rows(a, 0), rows(a, 1))
  for e in range(3):
    assert len(np.unique(rows(a, e))) == len(rows(a, e)) == a.plan.batches_per_epoch * 16  # each row once
  assert a.padding_report()["dropped_rows"] < 2 * 16  # at most one partial batch per modality
  np.testing.assert_array_equal(next(iter(a))["input_ids"], next(iter(b))["input_ids"])


def test_processes_load_disjoint_shards_that_make_up_the_global_batch():
  pipeline = _pipeline()
  planned = next(p for p in pipeline.plan.epoch(0) if p.patches)
  batcher = lambda owned: HostBatcher(pipeline.index, pipeline.batcher.encoder, PROC.config,  # noqa: E731
                                      num_shards=8, owned=owned)
  whole, first, second = (batcher(o)(planned) for o in (range(8), range(4), range(4, 8)))
  for key in ("input_ids", "labels", "attention_mask", "pixel_values"):
    assert len(first[key]) == len(second[key]) == len(whole[key]) // 2
    np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])
  for x, y in zip(jax.tree.leaves(first["vision"]), jax.tree.leaves(whole["vision"])):
    np.testing.assert_array_equal(x, y)  # every process computes the same global layout


def test_iterator_state_round_trip_resumes_with_the_same_batches():
  pipeline = _pipeline(num_threads=2, prefetch=3)
  it = iter(pipeline)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [_host(next(it)) for _ in range(4)]
  resumed = iter(pipeline)
  resumed.set_state(state)
  for want in expected:
    got = _host(next(resumed))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_length_buckets_keep_shapes_static():
  pipeline = _pipeline()
  traces = []

  @jax.jit
  def step(batch):
    traces.append(1)
    return batch["input_ids"].sum() + (batch["pixel_values"].sum() if "pixel_values" in batch else 0)

  shapes = set()
  it = iter(pipeline)
  for _ in range(2 * pipeline.plan.batches_per_epoch):
    batch = next(it)
    step(batch)
    lengths = np.asarray(batch["attention_mask"]).sum(1)
    assert batch["input_ids"].shape[1] in pipeline.plan.buckets and (lengths <= batch["input_ids"].shape[1]).all()
    shapes.add(str(jax.tree.map(lambda x: x.shape, batch)))
  report = pipeline.padding_report()
  assert len(pipeline.plan.buckets) <= 3 and len(traces) == len(shapes) == len(report["shapes"]) <= 6
  assert 0 <= report["token_padding"] < 0.5 and 0 <= report["patch_padding"] < 0.75


@pytest.fixture(scope="module")
def model():
  """Random weights without the (slow) initialisers: only the splice order is under test."""
  graphdef, state = nnx.split(abstract_model(PROC.config))
  rng = np.random.default_rng(0)
  return nnx.merge(graphdef, jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(x.dtype), state))


def test_spliced_image_features_match_unpadded_processing(model):
  """Padded per-shard pixel chunks + the sharded layout give each image token the feature of its own
  image, also when truncation cuts an image (max_length 56 cuts the second image of the dialogues)."""
  pipeline = _pipeline(max_length=56)
  encoder = SampleEncoder(PROC, max_length=56, square_pad=False)
  cut = lambda shape: sum(shape.used_tokens) < shape.patches // 4  # noqa: E731
  planned = max((p for p in pipeline.plan.epoch(0) if p.patches),
                key=lambda p: sum(cut(pipeline.index.shapes[i]) for i in p.rows))
  assert 0 < sum(cut(pipeline.index.shapes[i]) for i in planned.rows) < len(planned.rows)
  batch = pipeline.batcher(planned)
  image_features = jax.jit(lambda pixels, layout: model.image_features(pixels, layout))
  embedded = jax.jit(model.embed)(batch["input_ids"], image_features(batch["pixel_values"], batch["vision"]))

  samples = [encoder.encode(pipeline.index.records[i]) for i in planned.rows]
  grids = np.array([g for s in samples for g in s.shape.grids])
  features = image_features(np.concatenate([s.pixel_values for s in samples]),
                            vision_layout(grids, PROC.config.vision))  # one contiguous, unpadded chunk
  tokens, used = np.prod(grids, axis=-1) // 4, [u for s in samples for u in s.shape.used_tokens]
  starts = np.cumsum(tokens) - tokens
  want = np.concatenate([features[a:a + u] for a, u in zip(starts, used)])
  is_image = batch["input_ids"] == PROC.config.image_token_id
  np.testing.assert_allclose(np.asarray(embedded)[is_image], want, atol=1e-5)
  np.testing.assert_array_equal(is_image.sum(1), [sum(s.shape.used_tokens) for s in samples])


def test_micro_batches_split_each_shard_and_stack_on_a_leading_axis():
  """Gradient accumulation: micro-batch a of batch shard s holds plan shard s*A + a, every row once, with
  a patch budget sized for its own rows (no more pixel padding than without micro-batches); the global arrays keep the batch axis sharded."""
  plain, micro = _pipeline(), _pipeline(micro_batches=2)
  batch = next(b for b in iter(micro) if "pixel_values" in b)
  assert batch["input_ids"].shape[:2] == (2, 8) and batch["pixel_values"].shape[0] == 2
  assert batch["input_ids"].sharding.spec == PartitionSpec(None, ("data", "fsdp"), None)
  i = next(i for i, p in enumerate(micro.plan.epoch(0)) if p.patches)  # same seed: same rows, own budget
  stacked, whole = micro.batcher(micro.plan.epoch(0)[i]), plain.batcher(plain.plan.epoch(0)[i])
  shard_rows = lambda x: np.split(x, 8)  # noqa: E731
  for key in ("input_ids", "labels", "attention_mask"):
    halves = [shard_rows(stacked[key][a]) for a in range(2)]
    want = np.concatenate([np.concatenate([halves[0][s], halves[1][s]]) for s in range(8)])
    np.testing.assert_array_equal(want, whole[key])
  assert stacked["pixel_values"].shape[1] * 2 == whole["pixel_values"].shape[0]
  assert micro.padding_report()["patch_padding"] == pytest.approx(plain.padding_report()["patch_padding"])
