"""Reading a local copy of a Hub dataset: the parquet layouts, `save_to_disk` folders, images, and the errors."""

import os

import pytest
from PIL import Image

from dvl_jax.evaluation import hf_data
from tests.evaluation.fixtures import colour, image_cell, write_parquet, write_saved

REPO = "lmms-lab/ChartQA"
ROWS = [{"question": f"q{i}", "answer": str(i), "image": image_cell((i, 0, 0))} for i in range(40)]


def read(data_dir, split="test", columns=("question", "answer"), **kwargs):
  return list(hf_data.read_rows(str(data_dir), split, columns, REPO, images=("image",), **kwargs))


def check(rows):
  assert [r["question"] for r in rows] == [f"q{i}" for i in range(40)]  # in order, across record batches
  assert [colour(r["image"]) for r in rows[:3]] == [(0, 0, 0), (1, 0, 0), (2, 0, 0)]


def test_hub_parquet_files_of_the_split(tmp_path):
  write_parquet(os.path.join(tmp_path, "data", "test-00000-of-00002.parquet"), ROWS[:25], ["image"])
  write_parquet(os.path.join(tmp_path, "data", "test-00001-of-00002.parquet"), ROWS[25:], ["image"])
  write_parquet(os.path.join(tmp_path, "data", "train-00000-of-00001.parquet"), ROWS[:1], ["image"])
  check(read(tmp_path))


def test_hub_converted_layout(tmp_path):
  write_parquet(os.path.join(tmp_path, "default", "test", "0000.parquet"), ROWS, ["image"])
  check(read(tmp_path))


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
  check(read(write_saved(os.path.join(tmp_path, "one"), ROWS, ["image"])))
  write_saved(os.path.join(tmp_path, "dict", "test"), ROWS, ["image"])
  with open(os.path.join(tmp_path, "dict", "dataset_dict.json"), "w") as f:
    f.write('{"splits": ["test"]}')
  check(read(os.path.join(tmp_path, "dict")))


def test_images_stored_as_paths_are_read_from_the_data_dir(tmp_path):
  Image.new("L", (4, 4), 200).save(os.path.join(tmp_path, "chart.png"))
  row = {"question": "q", "answer": "a", "image": {"bytes": None, "path": "chart.png"}}
  write_parquet(os.path.join(tmp_path, "test-00000-of-00001.parquet"), [row], ["image"])
  (only,) = read(tmp_path)
  assert only["image"].mode == "RGB" and colour(only["image"]) == (200, 200, 200)


def one_line_naming_the_download(error, data_dir):
  message = str(error.value)
  assert "\n" not in message
  assert f"huggingface-cli download {REPO} --repo-type dataset --local-dir {data_dir}" in message


def test_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="no data directory") as error:
    read(tmp_path / "absent")
  one_line_naming_the_download(error, tmp_path / "absent")


def test_missing_split(tmp_path):
  write_parquet(os.path.join(tmp_path, "data", "train-00000-of-00001.parquet"), ROWS, ["image"])
  with pytest.raises(FileNotFoundError, match="no 'test' split") as error:
    read(tmp_path)
  one_line_naming_the_download(error, tmp_path)


def test_missing_columns(tmp_path):
  write_parquet(os.path.join(tmp_path, "test-00000-of-00001.parquet"), ROWS, ["image"])
  with pytest.raises(ValueError, match=r"lacks the columns \['type'\]") as error:
    read(tmp_path, columns=("type", "question"))
  one_line_naming_the_download(error, tmp_path)


def test_no_data_argument():
  with pytest.raises(ValueError, match="--data DIR") as error:
    list(hf_data.read_rows(None, "test", ("question",), REPO))
  one_line_naming_the_download(error, "DIR")
