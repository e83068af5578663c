"""The work one step of the decoding loop does, read from the compiled HLO of a tiny model's sampler: greedy
denoising runs the lm_head at the narrow widths it needs, not always over the whole block."""

import functools
import re

from dvl_jax.diffusion import sampler
from dvl_jax.diffusion.sampling_config import Prompts, SamplingConfig
from dvl_jax.testing.tiny import tiny_config, tiny_model

CFG = tiny_config()
VOCAB = CFG.text.vocab_size
PROMPTS = Prompts.from_lists([list(range(3, 16))])
GREEDY = SamplingConfig(gen_length=16)


@functools.cache
def compiled_hlo(config: SamplingConfig) -> str:
  return sampler.lower(tiny_model(CFG), PROMPTS, config).compile().as_text()


def test_greedy_denoising_runs_the_lm_head_only_at_masked_widths():
  """Logits `[w, vocab]` at widths 1, 2, 4 and the whole block 8 (batch 1): the lm_head is not always 8 wide."""
  assert {1, 2, 4, CFG.block_size} <= logits_widths(GREEDY)
  assert not logits_widths(SamplingConfig(gen_length=16, temperature=0.7)) & {1, 2, 4}  # its noise is per block
  assert sampler.widths(8) == (1, 2, 4, 8) and sampler.widths(6) == (1, 2, 4, 6)


def logits_widths(config: SamplingConfig) -> set[int]:
  return {int(w) for w in re.findall(rf"= f32\[(?:1,)?(\d+),{VOCAB}\]", compiled_hlo(config))}
