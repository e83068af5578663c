"""`dvl.Processor` of a text-only (`qwen2`) checkpoint: its family has no image hook, so it has no image
processor, text prompts pad as for any family and an image is a one-line error naming the family."""

import numpy as np
import pytest
from PIL import Image

import dvl_jax as dvl
from dvl_jax.data.word_tokenizer import word_tokenizer
from dvl_jax.testing.tiny import save_tiny_checkpoint, tiny_text_config
from tests.data.helpers import CORPUS


def test_text_only_checkpoints_have_a_text_processor(tmp_path):
  cfg = tiny_text_config()
  tokenizer = word_tokenizer(CORPUS, cfg)
  processor = dvl.Processor.from_pretrained(save_tiny_checkpoint(str(tmp_path / "ckpt"), cfg, tokenizer=tokenizer))
  assert processor.image_processor is None
  out = processor(["What is this ?", "It rolls ."])
  want = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("What is this ?", "It rolls .")]
  np.testing.assert_array_equal(out["input_ids"][1, :len(want[1])], want[1])
  np.testing.assert_array_equal(out["attention_mask"].sum(-1), [len(w) for w in want])
  assert out["pixel_values"] is None and out["image_grid_thw"] is None
  with pytest.raises(ValueError, match="the qwen2 family takes no images"):
    processor(["<image> What is this ?"], [[Image.new("RGB", (28, 28))]])
