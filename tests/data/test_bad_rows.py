"""Each kind of bad row is skipped and counted, at indexing and when it only breaks during training."""

import dataclasses
import json
import logging

import jax
import numpy as np
import pytest

from dvl_jax.data.bad_rows import KINDS
from dvl_jax.data.llava_json import read_rows
from dvl_jax.data.pipeline import DataConfig, DataPipeline
from dvl_jax.parallel.mesh import make_mesh
from tests.data.helpers import make_processor, noise_image, qa_row

CONFIG = DataConfig(batch_size=8, max_length=128, length_multiple=8, shuffle=False, num_threads=0)


def _good(n, folder):
  rows = []
  for i in range(n):
    noise_image(56, 56, i).save(folder / f"good{i}.png")
    rows.append(qa_row(f"good{i}", "What is this ?", "A ball", f"good{i}.png"))
  return rows


def _bad(folder):
  (folder / "corrupt.png").write_bytes(b"\x89PNG not really an image")
  ok = [{"from": "human", "value": "<image>\nWhat is this ?"}, {"from": "gpt", "value": "A"}]
  return {
      "missing_image": [qa_row("m", "What is this ?", "A", "absent.png")],
      "unreadable_image": [qa_row("u", "What is this ?", "A", "corrupt.png")],
      "empty_answer": [qa_row("e1", "What is this ?", "  "),
                       {"id": "e2", "conversations": [{"from": "human", "value": "What is this ?"}]}],
      "malformed_conversation": [
          {"id": "c1", "conversations": "What is this ?"},
          {"id": "c2", "conversations": [{"from": "human"}, {"from": "gpt", "value": "A"}]},
          {"id": "c3", "conversations": [{"from": "system", "value": "x"}, {"from": "gpt", "value": "A"}]},
          {"id": "c4", "image": ["good0.png", "good1.png"], "conversations": ok},  # 1 marker, 2 images
          {"id": "c5", "conversations": ok},  # a marker but no image
          {"id": "c6", "image": 7, "conversations": ok},
          [1, 2, 3],  # not an object
      ],
  }


def test_each_bad_row_kind_is_skipped_and_counted(tmp_path, caplog):
  rows = _good(8, tmp_path)
  bad = _bad(tmp_path)
  path = tmp_path / "data.jsonl"
  lines = [json.dumps(r) for r in rows + [r for kind in KINDS for r in bad[kind]]] + ["{not json"]
  path.write_text("\n".join(lines))
  with caplog.at_level(logging.WARNING):
    pipeline = DataPipeline.from_json(str(path), make_processor(), CONFIG, make_mesh(), image_folder=str(tmp_path))
  expected = {kind: len(bad[kind]) for kind in KINDS}
  expected["malformed_conversation"] += 1  # the unparsable JSONL line
  assert pipeline.bad_rows.as_dict() == expected
  assert len(pipeline.index) == 8 and "skipping row m (missing_image" in caplog.text
  it = iter(pipeline)
  batch = next(it)  # training goes on with the good rows
  assert np.asarray(batch["attention_mask"]).any(axis=1).all()
  metrics = it.metrics()
  assert {k: metrics[f"data/bad_rows/{k}"] for k in KINDS} == expected  # what the training loop logs


def test_a_row_that_breaks_during_training_becomes_a_counted_dead_row(tmp_path):
  rows = _good(8, tmp_path)
  pipeline = DataPipeline(rows, make_processor(), CONFIG, make_mesh(), image_folder=str(tmp_path))
  (tmp_path / "good3.png").unlink()  # deleted after indexing
  (tmp_path / "good5.png").write_bytes(b"garbage")  # corrupted after indexing
  it = iter(pipeline)
  batch = jax.tree.map(np.asarray, next(it))
  assert it.bad_rows.as_dict() == {"missing_image": 1, "unreadable_image": 1, "empty_answer": 0,
                                   "malformed_conversation": 0}
  dead = [3, 5]  # no shuffling: batch row i is dataset row i
  assert not batch["attention_mask"][dead].any() and (batch["labels"][dead] == -100).all()
  image_tokens = (batch["input_ids"] == make_processor().config.image_token_id).sum(axis=1)
  np.testing.assert_array_equal(image_tokens, [4] * 8)  # dead rows keep their image tokens: splice stays aligned
  assert (batch["pixel_values"].reshape(8, 16, -1)[dead] == 0).all()
  alive = np.setdiff1d(np.arange(8), dead)
  assert batch["attention_mask"][alive].any(axis=1).all()
  assert (batch["pixel_values"].reshape(8, 16, -1)[alive] != 0).any(axis=(1, 2)).all()
  state = it.get_state()
  assert json.loads(json.dumps(state))["bad_rows"]["missing_image"] == 1  # counts are checkpointed


def test_unreadable_data_files_and_unusable_data_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    read_rows(str(tmp_path / "absent.json"))
  (tmp_path / "lines.json").write_text('{"id": 1}\n{"id": 2}\n')
  with pytest.raises(ValueError, match=r"not valid JSON .*\*.jsonl"):
    read_rows(str(tmp_path / "lines.json"))
  (tmp_path / "object.json").write_text('{"id": 1}')
  with pytest.raises(ValueError, match="must hold a JSON array"):
    read_rows(str(tmp_path / "object.json"))
  with pytest.raises(ValueError, match="none of the 2 rows is usable"):
    DataPipeline([{"id": 1}, {"id": 2}], make_processor(), CONFIG, make_mesh())


@pytest.mark.parametrize("batch, micro, fix", [(8, 4, "batch_size=16 or micro_batches=2"), (6, 1, "batch_size=8$")])
def test_a_batch_that_does_not_split_into_micro_batches_over_the_shards_names_the_fix(batch, micro, fix):
  """Launch docs once asked for batch 256 as 8 micro-batches over 64 chips: 512 rows a step at the least."""
  config = dataclasses.replace(CONFIG, batch_size=batch, micro_batches=micro)
  with pytest.raises(ValueError, match=rf"batch_size={batch} must be a multiple of the 4 batch shards .* times "
                                       rf"micro_batches={micro}, {4 * micro}: use {fix}"):
    DataPipeline([qa_row(f"r{i}", "What is this ?", "A ball") for i in range(8)], make_processor(), config,
                 make_mesh((1, 4, 1), jax.devices()[:4]))
