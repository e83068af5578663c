"""Processor: LLaVA `<image>` markers expanded to image tokens, transformers' image processor, padding,
and the pixel bounds a checkpoint records."""

import json

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from dvl_jax.testing.tiny import tiny_config
from dvl_jax.data import synthetic
from dvl_jax.data.processor import MAX_PIXELS, MIN_PIXELS, PREPROCESSOR_CONFIG, SOURCE_CONFIG, Processor
from dvl_jax.data.word_tokenizer import word_tokenizer

SMALL = 56 * 56  # bounds under which a 56x56 image stays 56x56: a (1, 4, 4) grid, 4 image tokens


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


@pytest.mark.parametrize("width, height", [(60, 3), (60, 1), (3, 60), (1, 60), (2, 2)])
def test_images_a_few_pixels_thin_keep_their_orientation(ckpt_dir, width, height):
  """transformers guesses the channel axis from the array's shape: told nothing, it read a 60x3 image as 3x60 and
  failed on a 60x1 one. The grid must be the one `image_shape` predicts from the size alone (smart_resize)."""
  path, cfg, _ = ckpt_dir
  proc = Processor.from_pretrained(str(path))
  image = _image(height, width, 5)
  out = proc("look <image>", [[image]])
  predicted = proc.images.image_shape(proc.image_processor, width, height, cfg.vision)
  assert out["image_grid_thw"].tolist() == [list(predicted.grid)]
  tokens, rows = proc.images.counts(out["image_grid_thw"], cfg.vision)  # what `Prompts.bucketed` checks
  assert (out["input_ids"] == cfg.image_token_id).sum() == tokens.sum() and rows == len(out["pixel_values"])
  as_array = proc("look <image>", [[np.asarray(image)]])  # a [height, width, 3] uint8 array is the same image
  np.testing.assert_array_equal(as_array["pixel_values"], out["pixel_values"])


def test_images_in_the_wrong_form_are_refused_with_the_form_to_use(ckpt_dir):
  path, _, _ = ckpt_dir
  proc = Processor.from_pretrained(str(path))
  with pytest.raises(TypeError, match=r"one list per prompt \(e.g. \[\[image\]\]"):
    proc("look <image>", [_image(8, 8, 0)])
  with pytest.raises(TypeError, match="PIL image or a .* uint8 array .* got str"):
    proc("look <image>", [["cat.png"]])
  with pytest.raises(TypeError, match=r"got ndarray \(8, 8\)"):
    proc("look <image>", [[np.zeros((8, 8), np.uint8)]])


def _write(path, name, content):
  (path / name).write_text(json.dumps(content))


def _grid_and_tokens(proc, cfg):
  """A 56x56 image's grid and its image tokens in the prompt (the defaults upsize it to 392x392: 196)."""
  out = proc("look <image>", [[_image(56, 56, 0)]])
  return out["image_grid_thw"].tolist(), int((out["input_ids"] == cfg.image_token_id).sum())


@pytest.mark.parametrize("preprocessor", [
    None, {"patch_size": 14},
    {"min_pixels": 3136, "max_pixels": 12845056},  # the Hub Qwen2.5-VL file: DiffusionVL replaces its bounds
    {"size": {"shortest_edge": 3136, "longest_edge": 12845056}, "min_pixels": None, "max_pixels": None},
], ids=["no preprocessor file", "no bounds in it", "stock qwen bounds", "stock qwen size"])
def test_without_recorded_bounds_diffusionvl_defaults_apply(ckpt_dir, preprocessor):
  path, cfg, _ = ckpt_dir
  if preprocessor is not None:
    _write(path, PREPROCESSOR_CONFIG, preprocessor)
  proc = Processor.from_pretrained(str(path))
  assert (proc.image_processor.min_pixels, proc.image_processor.max_pixels) == (MIN_PIXELS, MAX_PIXELS)
  assert _grid_and_tokens(proc, cfg) == ([[1, 28, 28]], 196)


@pytest.mark.parametrize("saved", [
    {SOURCE_CONFIG: {"model_type": "diffusionvl_qwenvl", "min_pixels": SMALL, "max_pixels": SMALL}},
    {PREPROCESSOR_CONFIG: {"min_pixels": SMALL, "max_pixels": SMALL}},
    {PREPROCESSOR_CONFIG: {"size": {"shortest_edge": SMALL, "longest_edge": SMALL}}},  # newer transformers
    {SOURCE_CONFIG: {"min_pixels": SMALL, "max_pixels": SMALL},  # DiffusionVL's config wins (spec §2.1)
     PREPROCESSOR_CONFIG: {"min_pixels": 4 * SMALL, "max_pixels": 16 * SMALL}},
    {PREPROCESSOR_CONFIG: {"min_pixels": SMALL, "max_pixels": SMALL,  # min/max_pixels win over size
                           "size": {"shortest_edge": 4 * SMALL, "longest_edge": 16 * SMALL}}},
], ids=["diffusionvl config", "preprocessor", "preprocessor size", "config over preprocessor", "keys over size"])
def test_bounds_saved_with_the_checkpoint_are_used(ckpt_dir, saved):
  path, cfg, _ = ckpt_dir
  for name, content in saved.items():
    _write(path, name, content)
  proc = Processor.from_pretrained(str(path))
  assert (proc.image_processor.min_pixels, proc.image_processor.max_pixels) == (SMALL, SMALL)
  assert _grid_and_tokens(proc, cfg) == ([[1, 4, 4]], 4)


def test_arguments_override_the_checkpoint_one_bound_at_a_time(ckpt_dir):
  path, cfg, _ = ckpt_dir
  _write(path, SOURCE_CONFIG, {"min_pixels": SMALL, "max_pixels": SMALL})
  proc = Processor.from_pretrained(str(path), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  assert _grid_and_tokens(proc, cfg) == ([[1, 28, 28]], 196)
  proc = Processor.from_pretrained(str(path), max_pixels=28 * 28 * 16)  # min from the checkpoint
  assert (proc.image_processor.min_pixels, proc.image_processor.max_pixels) == (SMALL, 28 * 28 * 16)


@pytest.mark.parametrize("files, error", [
    ({SOURCE_CONFIG: {"min_pixels": "big"}}, "min_pixels from hf_config.json must be a positive integer"),
    ({PREPROCESSOR_CONFIG: {"max_pixels": 0}}, "max_pixels from preprocessor_config.json must be a positive"),
    ({SOURCE_CONFIG: {"min_pixels": 10 * SMALL}, PREPROCESSOR_CONFIG: {"max_pixels": SMALL}},
     r"min_pixels=31360 \(from hf_config.json\) is above max_pixels=3136 \(from preprocessor_config.json\)"),
    ({PREPROCESSOR_CONFIG: "{not json"}, "preprocessor_config.json is not valid JSON"),
    ({SOURCE_CONFIG: [1, 2]}, "hf_config.json does not hold a JSON object"),
], ids=["not a number", "zero", "min above max", "not json", "not an object"])
def test_bad_bounds_are_one_line_errors(ckpt_dir, files, error):
  path, _, _ = ckpt_dir
  for name, content in files.items():
    (path / name).write_text(content if isinstance(content, str) else json.dumps(content))
  with pytest.raises(ValueError, match=error):
    Processor.from_pretrained(str(path))


def test_a_converted_checkpoint_keeps_its_bounds(tmp_path):
  """`dvl convert` keeps DiffusionVL's config as hf_config.json (and copies preprocessor_config.json)."""
  from checkpoints_convert import to_orbax
  from dvl_jax.testing.tiny import save_hf_checkpoint

  assert SOURCE_CONFIG == to_orbax.HF_CONFIG_COPY
  cfg = tiny_config()
  hf_dir = tmp_path / "hf"
  save_hf_checkpoint(str(hf_dir), cfg)
  word_tokenizer(synthetic.corpus(), cfg).save_pretrained(hf_dir)
  hf_config = json.loads((hf_dir / "config.json").read_text())
  _write(hf_dir, "config.json", {**hf_config, "min_pixels": SMALL, "max_pixels": SMALL})  # as training writes
  _write(hf_dir, PREPROCESSOR_CONFIG, {"min_pixels": 3136, "max_pixels": 12845056})  # the stock Qwen file
  ckpt = to_orbax.convert(str(hf_dir), str(tmp_path / "dvl"), progress=False)
  proc = Processor.from_pretrained(ckpt)
  assert _grid_and_tokens(proc, cfg) == ([[1, 4, 4]], 4)
  (tmp_path / "dvl" / SOURCE_CONFIG).unlink()  # left: the stock preprocessor file, whose bounds DiffusionVL replaces
  assert _grid_and_tokens(Processor.from_pretrained(ckpt), cfg) == ([[1, 28, 28]], 196)
