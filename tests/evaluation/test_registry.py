"""Tasks by name, the chat prompt every decoder receives, and the clean-up every score starts from."""

import pytest
from PIL import Image

from dvl_jax.data.chat_template import SYSTEM_PROMPT
from dvl_jax.evaluation import TASKS, Sample, get_task

HUB_TASKS = ("mmmu_val", "mme", "ai2d", "mmstar", "chartqa", "realworldqa")


def test_registered_tasks():
  assert set(TASKS) == {*HUB_TASKS, "synthetic", "easy_vqa"}
  assert all(name == task.name and task.metric for name, task in TASKS.items())
  for name in HUB_TASKS:
    assert get_task(name).data_hint.startswith("huggingface-cli download ")
  with pytest.raises(KeyError, match="known tasks: mmmu_val, mme"):
    get_task("mmbench")


def test_chat_prompt_puts_one_marker_per_image_in_front():
  image = Image.new("RGB", (4, 4))
  two = Sample("validation_Art_1", "Compare <image 1> and <image 2>.", (image, image), ("x",), (),
               {"question_type": "open", "subject": "Art"})
  prompt = get_task("mmmu_val").chat_prompt(two)
  assert prompt == (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<image> <image>\n"
                    "Compare <image 1> and <image 2>.\n\nAnswer the question using a single word or phrase.<|im_end|>\n"
                    "<|im_start|>assistant\n")
  placed = Sample("0", "<image>\nWhat is it?", (image,), ("x",))
  assert get_task("synthetic").chat_prompt(placed).count("<image>") == 1  # a text that places its image keeps it


def test_aggregates_accept_an_empty_run():
  for task in TASKS.values():
    metrics = task.aggregate([], [])
    assert metrics[task.metric] == 0.0
