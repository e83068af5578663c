"""`gs://` data and checkpoints: rows, images, config and tokenizer read from a bucket equal the local ones.

The bucket is a local directory behind the fsspec "gcs" filesystem that `etils.epath` uses for
`gs://` paths, so every remote read goes through the same calls it makes on GCS. Params are read by
tensorstore's own GCS driver, which this fake cannot stand in for.
"""

import importlib
import os
import shutil

import jax
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from dvl_jax.core import storage
from dvl_jax.core.config import ModelConfig
from dvl_jax.testing.tiny import tiny_config
from dvl_jax.data import synthetic
from dvl_jax.data.pipeline import DataConfig, DataPipeline
from dvl_jax.data.processor import Processor
from dvl_jax.checkpoints.loading import load
from dvl_jax.testing.tiny import save_tiny_checkpoint
from dvl_jax.parallel.mesh import make_mesh
from tests.data.helpers import make_processor


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """`gs://b/x` is the file `<tmp>/bucket/b/x` for the duration of a test."""
  root = str(tmp_path / "bucket")

  class LocalBucket(LocalFileSystem):
    protocol = ("gs", "gcs")

    def __init__(self, **kwargs):
      super().__init__()  # gcsfs options such as finalize_on_close mean nothing locally

    @classmethod
    def _strip_protocol(cls, path):
      path = str(path)
      for prefix in ("gs://", "gcs://"):
        if path.startswith(prefix):
          path = os.path.join(root, path[len(prefix):])
      return super()._strip_protocol(path)

  from etils.epath import backend

  registry = importlib.import_module("fsspec.registry")._registry  # `fsspec.registry` is a read-only view
  for name in ("gs", "gcs"):
    monkeypatch.setitem(registry, name, LocalBucket)
  backend.fsspec_backend._get_filesystem.cache_clear()
  monkeypatch.setenv("DVL_CACHE", str(tmp_path / "cache"))
  yield root
  backend.fsspec_backend._get_filesystem.cache_clear()


def _batches(pipeline, n=2):
  it = iter(pipeline)
  out = [jax.tree.map(np.asarray, next(it)) for _ in range(n)]
  it.close()
  return out


def test_training_rows_and_images_read_from_a_bucket_equal_the_local_ones(bucket, tmp_path):
  local = str(tmp_path / "local")
  synthetic.write_dataset(local, 24, seed=3)
  os.remove(os.path.join(local, "images", "000005.png"))  # a missing image is a counted bad row
  shutil.copytree(local, os.path.join(bucket, "b", "data"))
  proc, mesh = make_processor(), make_mesh((1, 1, 1), jax.devices()[:1])
  config = DataConfig(batch_size=8, max_length=128, num_buckets=1, num_threads=0)
  remote = DataPipeline.from_json("gs://b/data/data.json", proc, config, mesh, image_folder="gs://b/data")
  reference = DataPipeline.from_json(os.path.join(local, "data.json"), proc, config, mesh, image_folder=local)
  assert remote.bad_rows.as_dict() == reference.bad_rows.as_dict()
  assert remote.bad_rows.as_dict()["missing_image"] == remote.bad_rows.total == 1
  for got, want in zip(_batches(remote), _batches(reference), strict=True):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)


def test_checkpoint_config_and_tokenizer_come_from_a_bucket_via_a_local_cache(bucket, tmp_path):
  cfg = tiny_config()
  local = str(tmp_path / "ckpt")
  save_tiny_checkpoint(local, cfg, tokenizer=make_processor().tokenizer)
  shutil.copytree(local, os.path.join(bucket, "b", "ckpt"))

  assert ModelConfig.load("gs://b/ckpt/config.json") == ModelConfig.load(os.path.join(local, "config.json"))
  remote, reference = Processor.from_pretrained("gs://b/ckpt"), Processor.from_pretrained(local)
  prompt = "<image>\nWhat color is the circle?"
  np.testing.assert_array_equal(remote.encode(prompt, 1), reference.encode(prompt, 1))

  cached = storage.local_side_files("gs://b/ckpt")
  assert cached.startswith(str(tmp_path / "cache"))
  assert "tokenizer.json" in os.listdir(cached) and "params" not in os.listdir(cached)
  assert storage.local_side_files("gs://b/ckpt") == cached  # fetched once
  with open(os.path.join(bucket, "b", "ckpt", "tokenizer_config.json"), "a") as f:
    f.write("\n")  # a re-written checkpoint at the same URL is fetched again
  assert storage.local_side_files("gs://b/ckpt") != cached


def test_a_bucket_path_that_is_not_a_checkpoint_is_a_clear_error(bucket):
  os.makedirs(os.path.join(bucket, "b", "empty"))
  with pytest.raises(FileNotFoundError, match="gs://b/empty is not a converted checkpoint"):
    load("gs://b/empty")


def test_relative_image_paths_join_a_bucket_folder_and_absolute_ones_stay():
  assert storage.join("gs://b/data/", "images/1.png") == "gs://b/data/images/1.png"
  assert storage.join("gs://b/data", "gs://other/1.png") == "gs://other/1.png"
  assert storage.join("/data", "images/1.png") == "/data/images/1.png"
  assert storage.join("/data", "/abs/1.png") == "/abs/1.png"
