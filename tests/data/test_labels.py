"""qwen_2_5 template and labels: the worked example of spec §4.2 reproduced token by token."""

import numpy as np
import pytest

from dvl_jax.data.bad_rows import BadRow
from dvl_jax.data.chat_template import (SYSTEM_PROMPT, conversation_messages, conversation_prompt, generation_prompt,
                                        move_image_to_front, render_message)
from dvl_jax.data.labels import IGNORE, StructuralTokens
from dvl_jax.data.llava_json import to_record
from dvl_jax.data.samples import SampleEncoder
from tests.data.helpers import make_processor, noise_image

SYSTEM_WORDS = "You are Qwen , created by Alibaba Cloud . You are a helpful assistant .".split()


def test_worked_example_of_spec_4_2():
  """ids    S system NL …sys… E NL | S user NL <image> NL …q… E NL | S assistant NL …ans… E NL | EOS ×k
     labels S -100   NL -100  E NL | S -100 NL -100    NL -100 E NL | S assistant NL …ans… E NL | EOS ×k
  with a stand-alone NL inside the question also labelled, and the image 9 tokens (84x84 -> 6x6 patches)."""
  proc = make_processor()
  tok, cfg = proc.tokenizer, proc.config
  ids = lambda words: tok.convert_tokens_to_ids(words)  # noqa: E731
  S, E, NL = ids(["<|im_start|>", "<|im_end|>", "\n"])
  assert (E, cfg.eos_token_id) == (2, 2) and StructuralTokens.from_tokenizer(tok).ids == (NL, S, E)
  row = {"id": "x", "image": noise_image(84, 60), "conversations": [
      {"from": "human", "value": "What is\nthis ?\n<image>"}, {"from": "gpt", "value": "A big red ball ."}]}
  sample = SampleEncoder(proc, max_length=256).encode(to_record(row, 0))

  sys_ids = [S, *ids(["system"]), NL, *ids(SYSTEM_WORDS), E, NL]
  sys_lab = [S, IGNORE, NL, *[IGNORE] * len(SYSTEM_WORDS), E, NL]
  q = ids(["What", "is"]) + [NL] + ids(["this", "?"])
  img = [cfg.image_token_id] * 9
  user_ids = [S, *ids(["user"]), NL, *img, NL, *q, E, NL]
  user_lab = [S, IGNORE, NL, *[IGNORE] * 9, NL, IGNORE, IGNORE, NL, IGNORE, IGNORE, E, NL]
  ans_ids = [S, *ids(["assistant"]), NL, *ids("A big red ball .".split()), E, NL]
  n = len(sys_ids) + len(user_ids) + len(ans_ids)
  k = (8 - n % 8) % 8
  assert k > 0
  np.testing.assert_array_equal(sample.input_ids, sys_ids + user_ids + ans_ids + [cfg.eos_token_id] * k)
  np.testing.assert_array_equal(sample.labels, sys_lab + user_lab + ans_ids + [cfg.eos_token_id] * k)
  np.testing.assert_array_equal(sample.shape.grids, [[1, 6, 6]])  # square-padded to 84x84


def test_leading_gpt_message_dropped_and_multi_turn_labels():
  proc = make_processor()
  tok = proc.tokenizer
  row = {"id": "t", "conversations": [
      {"from": "gpt", "value": "It rolls ."}, {"from": "human", "value": "Tell me more"},
      {"from": "gpt", "value": "A ball"}, {"from": "human", "value": "more"}, {"from": "gpt", "value": "It rolls"}]}
  sample = SampleEncoder(proc, max_length=256, block_aligned_eos=False).encode(to_record(row, 0))
  text = tok.decode(sample.input_ids)
  assert text.count("<|im_start|>") == 5 and "rolls ." not in text  # system + 4 turns, first gpt dropped
  supervised = tok.decode([i for i, l in zip(sample.input_ids, sample.labels) if l != IGNORE])
  assert supervised.split() == ("<|im_start|> <|im_end|> <|im_start|> <|im_end|> "
                                "<|im_start|> assistant A ball <|im_end|> <|im_start|> <|im_end|> "
                                "<|im_start|> assistant It rolls <|im_end|>").split()
  labelled = sample.labels != IGNORE
  np.testing.assert_array_equal(sample.labels[labelled], sample.input_ids[labelled])  # not shifted


@pytest.mark.parametrize("text, expected", [
    ("What is this?\n<image>", "<image>\nWhat is this?"),
    ("  a <image> b  ", "<image>\na  b"),
    ("<image>What", "<image>What"),  # already leading: left alone, as the repo
    ("<image> a <image>", "<image> a <image>"),  # several markers stay in place
    ("<image>", "<image>"),
])
def test_single_image_marker_moves_to_the_front(text, expected):
  assert move_image_to_front(text) == expected


def test_text_only_rows_are_not_rewritten_and_marker_counts_must_match():
  conv = [{"from": "human", "value": " q "}, {"from": "gpt", "value": "a"}]
  assert conversation_messages(conv, 0) == [("user", " q "), ("assistant", "a")]
  with pytest.raises(BadRow, match="1 <image> markers but 2 images"):
    conversation_messages([{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}], 2)


def test_generation_prompt():
  assert generation_prompt("Why?") == (
      "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
      "<|im_start|>user\n<image>\nWhy?<|im_end|>\n<|im_start|>assistant\n")
  assert "user\n<image> <image>\nWhy?" in generation_prompt("Why?", num_images=2)
  with pytest.raises(ValueError, match="a turn's image count must be >= 0, got -1"):
    generation_prompt("Why?", num_images=-1)  # would have been a text-only prompt


def test_a_conversation_prompt_is_the_training_text_up_to_the_last_answer():
  """Asked the last question of a multi-turn LLaVA conversation, the model sees the text it was trained on up to
  that answer: the system message, the earlier turns (the image leading the first question) and an open turn."""
  conversation = [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A cat."},
                  {"from": "human", "value": "Which colour?"}, {"from": "gpt", "value": "Grey."}]
  trained = render_message("system", SYSTEM_PROMPT) + "".join(
      render_message(role, content) for role, content in conversation_messages(conversation, 1))
  prompt = conversation_prompt([("user", "What is it?", 1), ("assistant", "A cat.", 0), ("user", "Which colour?", 0)])
  assert trained.startswith(prompt) and trained[len(prompt):] == "Grey.<|im_end|>\n"
  assert conversation_prompt([("user", "Why?", 2)]) == generation_prompt("Why?", 2)
  assert conversation_prompt([("user", "Why?", 0)], system="Be brief.").startswith(
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>")
