"""The engine serves the other families as it serves Qwen2.5-VL: DiffusionVL-Qwen's image requests (SigLIP crops
in an anyres layout, whose pixel rows differ in number from image to image) decode as `dvl.generate` alone."""

import jax
import numpy as np

from dvl_jax.data.anyres import image_token_counts
from dvl_jax.data.llava_pixels import pixel_rows
from dvl_jax.diffusion import sampler
from dvl_jax.diffusion.sampling_config import Prompts, SamplingConfig
from dvl_jax.serving.engine import Engine
from dvl_jax.serving.request import Request
from dvl_jax.testing.tiny import tiny_model, tiny_siglip_config
from tests.data.helpers import noise_image

CFG = tiny_siglip_config()


def image_request(width: int, height: int, seed: int, **settings) -> Request:
  """A question about a random image, its pixel rows and (height, width) as the family's processor makes them."""
  rows, sizes, _ = pixel_rows([noise_image(width, height, seed)], CFG.vision)
  tokens = int(image_token_counts(sizes.tolist(), CFG.vision)[0])
  return Request([5, 9] + [CFG.image_token_id] * tokens + [7, 8], pixel_values=rows, image_grid_thw=sizes,
                 max_tokens=8, **settings)


def test_siglip_image_requests_decode_as_generate_alone():
  model = tiny_model(CFG, spread=True)
  requests = [image_request(50, 120, 1, steps=4), Request([5, 6, 7], max_tokens=8),  # 2x3 crops, then 1x1
              image_request(44, 44, 2, remasking_strategy="low_confidence_dynamic", confidence_threshold=0.6),
              image_request(120, 50, 3, algorithm="autoregressive")]
  engine = Engine(model, SamplingConfig(length_bucket=8), slots=2, max_prompt=64, max_tokens=8, chunk=3)
  outputs = engine.run(requests)
  assert len(outputs) == len(requests)
  for rid, request in zip(sorted(outputs), requests):
    prompts = Prompts.from_lists([list(request.prompt)], pixel_values=request.pixel_values,
                                 image_grid_thw=request.image_grid_thw)
    want = sampler.generate(model, prompts, request.config(engine.config), rng=jax.random.key(request.seed))
    np.testing.assert_array_equal(outputs[rid].tokens, want.tokens, err_msg=str(rid))
  assert len({tuple(o.tokens[0]) for o in outputs.values()}) == len(requests)  # real answers, not one repeated
