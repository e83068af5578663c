"""`benchmarks/original.py`'s bridge to PyTorch (the original's checkout is not here: it runs where one is): the
weights it hands transformers make the same model, so its AR baseline decodes this project's AR tokens."""

import sys

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from benchmarks import original
from benchmarks.sampling import bench_model
from dvl_jax.diffusion import sampler
from dvl_jax.diffusion.sampling_config import Prompts, SamplingConfig


def test_transformers_with_the_bridged_weights_decodes_the_same_ar_tokens():
  model = bench_model(True, 40.0, layers="per-layer", family="qwen2", vision=None)
  hf = original.torch_model(Qwen2ForCausalLM, Qwen2Config(**model.config.to_hf()), original.torch_weights(model))
  count = original.Counted(hf.model)
  ids = np.random.default_rng(0).integers(3, 1000, 11)
  with torch.no_grad():
    theirs = hf.generate(torch.from_numpy(ids[None]).long(), attention_mask=torch.ones((1, 11), dtype=torch.long),
                         max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
  ours = sampler.generate(model, Prompts.from_lists([ids.tolist()]),
                          SamplingConfig(gen_length=12, algorithm="autoregressive"))
  np.testing.assert_array_equal(theirs[0, 11:].numpy(), np.asarray(ours.tokens[0]))
  assert count.calls == 12 == int(ours.nfe[0])
  assert len(set(np.asarray(ours.tokens[0]).tolist())) > 3  # not one token repeated: a real check of the weights


def test_a_folder_that_is_no_diffusionvl_checkout_is_a_one_line_error(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["original.py", "--original", str(tmp_path)])
  with pytest.raises(SystemExit):
    original.main()
  assert "is not a DiffusionVL checkout" in capsys.readouterr().err
