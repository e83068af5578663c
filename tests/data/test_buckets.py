"""Bucket choice (least padding), the batch plan, and the ViT layout of shard-padded pixels."""

import itertools

import numpy as np
import pytest

from dvl_jax.testing.tiny import tiny_config
from dvl_jax.data.buckets import BatchPlan, choose_buckets
from dvl_jax.data.sharded_layout import sharded_vision_layout
from dvl_jax.core.vision_layout import vision_layout


def _padding(buckets, rounded):
  edges = np.asarray(buckets)
  return int((edges[np.searchsorted(edges, rounded)] - rounded).sum())


@pytest.mark.parametrize("seed", range(20))
def test_chosen_buckets_minimise_padding(seed):
  rng = np.random.default_rng(seed)
  lengths, k = rng.integers(1, 300, size=rng.integers(1, 40)), int(rng.integers(1, 5))
  buckets = choose_buckets(lengths, k, 8, 256)
  rounded = np.minimum(-(-lengths // 8) * 8, 256)
  values = np.unique(rounded)
  best = min(_padding([*c, values[-1]], rounded) for n in range(k) for c in itertools.combinations(values[:-1], n))
  assert len(buckets) <= k and buckets[-1] == values[-1] and _padding(buckets, rounded) == best
  assert all(b % 8 == 0 or b == 256 for b in buckets)


def test_plan_groups_by_modality_carries_remainders_up_and_drops_the_last():
  lengths = np.array([8] * 5 + [16] * 3 + [8] * 4 + [24] * 2)
  patches = np.array([0] * 8 + [16] * 4 + [32] * 2)
  plan = BatchPlan(lengths, patches, batch_size=4, buckets=(8, 16, 24), num_shards=2, seed=3)
  batches = plan.epoch(0)
  # text: 5 of length 8 -> one batch + 1 carried into 16 (with 3) -> one batch; images: 4 + 2 -> 1 batch, 2 dropped
  assert sorted((b.length, b.patches) for b in batches) == [(8, 0), (8, 2 * 16), (16, 0)]
  for b in batches:
    assert (lengths[b.rows] <= b.length).all() and len(set(patches[b.rows] > 0)) == 1
  assert plan.batches_per_epoch == 3 and plan[4].rows.tolist() == plan.epoch(1)[1].rows.tolist()
  with pytest.raises(ValueError, match="multiple of the 3 batch shards"):
    BatchPlan(lengths, patches, batch_size=4, buckets=(8, 16, 24), num_shards=3)
  with pytest.raises(ValueError, match="largest bucket is 16"):
    BatchPlan(lengths, patches, batch_size=4, buckets=(8, 16), num_shards=2)


def test_sharded_layout_of_one_shard_is_the_padded_layout():
  cfg = tiny_config().vision
  grids = np.array([[1, 4, 6], [1, 8, 8], [1, 2, 2]])
  want = vision_layout(grids, cfg, pad_patches=200)
  got = sharded_vision_layout([grids], [np.prod(grids, -1) // 4], 200, cfg)
  for name in ("window_index", "reverse_index", "window_segments", "image_segments", "hw"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


def test_sharded_layout_puts_spliced_tokens_first_in_batch_order():
  cfg = tiny_config().vision
  shards = [np.array([[1, 4, 4]]), np.zeros((0, 3)), np.array([[1, 2, 4], [1, 4, 4]])]
  used = [np.array([3]), np.zeros(0), np.array([2, 4])]
  lay = sharded_vision_layout(shards, used, 48, cfg)
  # merged cells in the padded chunks: shard 0 -> 0..3, shard 2 -> 24..25 and 26..29
  cells = np.asarray(lay.window_index)[np.asarray(lay.reverse_index)]
  np.testing.assert_array_equal(cells[:9], [0, 1, 2, 24, 25, 26, 27, 28, 29])
  assert cells[9] == 3  # the cut token of image 0 comes after every spliced one
  assert (np.asarray(lay.image_segments) > 0).sum() == 16 + 8 + 16
