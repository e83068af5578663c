"""Processor: LLaVA `<image>` markers expanded to image tokens, transformers' image processor, padding."""


import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from dvl_jax.core.config import tiny_config
from dvl_jax.data.processor import Processor


@pytest.fixture
def ckpt_dir(tmp_path):
  """A directory laid out like `dvl convert` output: our config.json plus tokenizer files."""
  cfg = tiny_config()
  vocab = {w: i + 3 for i, w in enumerate("look at this and that now a b c".split())}
  tok = Tokenizer(models.WordLevel({**vocab, "[UNK]": 1}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
  cfg.save(str(tmp_path / "config.json"))
  return tmp_path, cfg, vocab


def _image(h, w, seed):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_markers_expand_to_image_tokens_and_rows_are_padded(ckpt_dir):
  path, cfg, vocab = ckpt_dir
  proc = Processor.from_pretrained(str(path), min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
  images = [[_image(60, 90, 0), _image(100, 40, 1)], []]
  out = proc(["look <image> at this <image> now", "a b c"], images)
  ref = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)(
      images=images[0], return_tensors="np")
  np.testing.assert_array_equal(out["pixel_values"], ref["pixel_values"])
  np.testing.assert_array_equal(out["image_grid_thw"], ref["image_grid_thw"])
  n0, n1 = (int(g.prod()) // 4 for g in ref["image_grid_thw"])
  expected = [vocab["look"]] + [cfg.image_token_id] * n0 + [vocab["at"], vocab["this"]] + \
      [cfg.image_token_id] * n1 + [vocab["now"]]
  np.testing.assert_array_equal(out["input_ids"][0], expected)
  np.testing.assert_array_equal(out["input_ids"][1, :3], [vocab["a"], vocab["b"], vocab["c"]])
  assert (out["input_ids"][1, 3:] == cfg.pad_token_id).all()
  np.testing.assert_array_equal(out["attention_mask"].sum(1), [len(expected), 3])


def test_text_only_and_user_mistakes(ckpt_dir):
  path, _, _ = ckpt_dir
  proc = Processor.from_pretrained(str(path))
  out = proc("a b", pad_to=6)
  assert out["input_ids"].shape == (1, 6) and out["pixel_values"] is None
  with pytest.raises(ValueError, match="1 <image> markers but 0 images"):
    proc("a <image>")
  with pytest.raises(ValueError, match="more than pad_to"):
    proc("a b c", pad_to=2)
  (path / "tokenizer.json").unlink()
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    Processor.from_pretrained(str(path))
