"""A word-level ChatML tokenizer over a small corpus: tests and the CPU demo need one and cannot download Qwen's.

Qwen's special tokens keep their roles and take their ids from the model config: `<|endoftext|>` is
the pad id, `<|im_end|>` the EOS id, and the ids the model reserves (bos, image, video, vision
start/end, mask) get named special tokens; `<|im_start|>`, "\\n" and the words take the free ids.
Words are runs of letters or digits and single punctuation marks; "\\n" is its own token and other
whitespace only separates.
"""

from __future__ import annotations

import re
from typing import Iterable

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dvl_jax.core.config import ModelConfig
from dvl_jax.data.chat_template import IM_END, IM_START

ENDOFTEXT, UNKNOWN = "<|endoftext|>", "[UNK]"
_WORD = r"\n|\w+|[^\w\s]"


def word_tokenizer(corpus: Iterable[str], config: ModelConfig) -> PreTrainedTokenizerFast:
  """A tokenizer whose vocabulary is every word of `corpus`, with exactly `config`'s vocabulary size."""
  named = {config.bos_token_id: "<|bos|>", config.image_token_id: "<|image_pad|>",
           config.video_token_id: "<|video_pad|>", config.vision_start_token_id: "<|vision_start|>",
           config.vision_end_token_id: "<|vision_end|>", config.mask_token_id: "<|mask|>",
           config.pad_token_id: ENDOFTEXT, config.eos_token_id: IM_END}  # later entries win a shared id
  free = [i for i in range(config.text.vocab_size) if i not in named]
  words = sorted({w for text in corpus for w in re.findall(_WORD, text)} - {"\n"})
  tokens = [IM_START, "\n", UNKNOWN, *words]
  if len(tokens) > len(free):
    raise ValueError(f"{len(words)} words do not fit the {config.text.vocab_size}-token vocabulary "
                     f"next to its {len(named)} reserved ids")
  tokens += [f"<|unused_{i}|>" for i in range(len(free) - len(tokens))]  # no holes: every id decodes
  vocab = {**{token: i for i, token in named.items()}, **dict(zip(tokens, free))}
  tok = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
      pre_tokenizers.Split(Regex(_WORD), behavior="isolated"),
  ])
  tok.add_special_tokens([*named.values(), IM_START])
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=UNKNOWN)
