"""Invalid sampling options and prompts fail early with one clear line (no compile, no traceback soup)."""

import numpy as np
import pytest

from dvl_jax.testing.tiny import tiny_config
from dvl_jax.diffusion import sampler
from dvl_jax.diffusion.sampling_config import GenerateOutput, Prompts, SamplingConfig
from dvl_jax.testing.tiny import tiny_model


@pytest.mark.parametrize("options, message", [
    (dict(steps=0), "steps must be >= 1, got 0"),
    (dict(gen_length=0), "gen_length must be >= 1"),
    (dict(block_size=8, max_len=100), "block_size 8 does not divide the cache length max_len=100"),
    (dict(confidence_threshold=1.0), r"confidence_threshold must be in \(0, 1\)"),
    (dict(confidence_threshold=0.0), r"confidence_threshold must be in \(0, 1\)"),
    (dict(remasking_strategy="low_confidence"), "unknown remasking_strategy 'low_confidence'"),
    (dict(mode="cached"), "unknown mode 'cached'"),
    (dict(algorithm="beam"), "unknown algorithm 'beam'"),
    (dict(positions="3d"), "unknown positions '3d'"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_p=1.5), r"top_p must be in \[0, 1\]"),
])
def test_invalid_options(options, message):
  with pytest.raises(ValueError, match=message):
    SamplingConfig(**options)


CFG = tiny_config()
IMAGE = {"input_ids": [[5] + [CFG.image_token_id] * 4 + [6]], "lengths": [6],  # a 4x4-patch image: 4 tokens
         "pixel_values": np.zeros((16, CFG.vision.patch_dim), np.float32), "image_grid_thw": [[1, 4, 4]]}


@pytest.fixture(scope="module")
def model():
  return tiny_model()


@pytest.mark.parametrize("inputs, options, message", [
    ([[5] * 30], dict(gen_length=8, max_len=32), "prompt of 30 tokens \\+ gen_length 8 exceeds the context of 32"),
    ([[5] * 30], dict(max_len=36), "block_size 8 does not divide the cache length max_len=36"),  # model's block size
    ([[5] * 10], dict(gen_length=5000), "exceeds the model's max_position_embeddings"),
    ([[5] * 4], dict(positions="mrope"), "block diffusion uses flat positions"),
    ({"input_ids": [[5, 5, 0]], "attention_mask": [[1, 0, 1]]}, {}, "attention_mask must be right-padded"),
    ({"input_ids": [[5, 5, 0]], "lengths": [0]}, {}, r"every prompt needs at least one token, got lengths \[0\]"),
    ({"input_ids": [[5, 5, 0]], "lengths": [4]}, {}, r"prompt lengths must be in \[1, 3\]"),
    ({"input_ids": [[5, 5, 0]]}, {}, "need `lengths` or `attention_mask`"),
    ({"attention_mask": [[1, 1]]}, {}, r"inputs have no `input_ids` \(keys: \['attention_mask'\]\)"),
    ({"input_ids": [5, 5], "lengths": [2]}, {}, r"input_ids must be \[batch, length\], got shape \(2,\)"),
    ([[5, 256, 7]], {}, r"token ids must be in \[0, 256\) \(the model's vocabulary\), got 5 .. 256"),
    ([[5, -1, 7]], {}, r"token ids must be in \[0, 256\)"),
    ([[5, 2 ** 32 + 5]], {}, "ids past int32"),  # would wrap around to 5
    ({"input_ids": [[5, 900, 0]], "lengths": [1]}, {}, None),  # past the length: padding, not checked
    ([], {}, "no prompts"),
    ([[5, CFG.image_token_id, 6]], {}, "the prompts hold 1 image tokens but no pixel_values"),
    (dict(IMAGE, input_ids=[[5] + [CFG.image_token_id] * 3 + [6]], lengths=[5]), {},
     r"the prompts hold 3 image tokens, their 1 images take 4: build them with dvl.Processor"),
    (dict(IMAGE, pixel_values=np.zeros((12, CFG.vision.patch_dim), np.float32)), {},
     "pixel_values has 12 rows, image_grid_thw's 1 images take 16"),
    (dict(IMAGE, image_grid_thw=None), {}, "pixel_values given without image_grid_thw"),
    (IMAGE, {}, None),  # what adds up runs
])
def test_invalid_prompts(model, inputs, options, message):
  if message is None:
    assert sampler.generate(model, inputs, SamplingConfig(gen_length=4, **options)).tokens.shape == (1, 4)
    return
  with pytest.raises(ValueError, match=message):
    sampler.generate(model, inputs, SamplingConfig(**options))


@pytest.mark.parametrize("inputs, config, message", [
    ("a question", SamplingConfig(), "takes token ids, not text: pass dvl.Processor's output"),
    (["a question"], SamplingConfig(), "takes token ids, not text"),
    ({"input_ids": [[5.0, 6.0]], "lengths": [2]}, SamplingConfig(), "input_ids must hold integer token ids, got float"),
    ([[True, False]], SamplingConfig(), "a prompt must hold integer token ids, got bool"),
    ([[5, 6]], {"gen_length": 8}, "config must be a dvl.SamplingConfig, e.g. .*; got dict"),
])
def test_inputs_of_the_wrong_kind_are_refused_not_cast(model, inputs, config, message):
  with pytest.raises(TypeError, match=message):
    sampler.generate(model, inputs, config)


def test_an_rng_that_is_not_a_key_is_refused(model):
  with pytest.raises(TypeError, match=r"rng must be jax.random.key\(seed\) or one key per row, got int32 of shape"):
    sampler.generate(model, [[5, 6]], SamplingConfig(temperature=0.5), rng=3)


def test_prompt_forms_agree():
  listed = Prompts.coerce([[7, 8, 9], [4]])
  masked = Prompts.coerce({"input_ids": [[7, 8, 9], [4, 0, 0]], "attention_mask": [[1, 1, 1], [1, 0, 0]]})
  np.testing.assert_array_equal(listed.ids, masked.ids)
  np.testing.assert_array_equal(listed.lengths, masked.lengths)
  bucketed = listed.bucketed(SamplingConfig(length_bucket=16).resolve(tiny_config()), tiny_config())
  assert bucketed.ids.shape == (2, 16) and (bucketed.ids[1, 1:] == tiny_config().pad_token_id).all()


def test_output_lengths_and_text():
  class Tokenizer:
    def batch_decode(self, rows, skip_special_tokens):
      return [" ".join(map(str, r)) for r in rows]

  eos, mask = tiny_config().eos_token_id, tiny_config().mask_token_id
  tokens = np.array([[7, eos, 9, mask], [5, 6, 7, 8]])
  out = GenerateOutput.build(tokens, np.array([3, 4]), np.array([3, 2]), 3, -np.ones((2, 4)), eos, Tokenizer())
  np.testing.assert_array_equal(out.lengths, [2, 4])
  np.testing.assert_allclose(out.tokens_per_forward, [1.0, 2.0])
  assert out.text == [f"7 {eos}", "5 6 7 8"]
