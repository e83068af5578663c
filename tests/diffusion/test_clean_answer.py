"""`clean_answer` / `GenerateOutput.clean_text`: the original evaluation's answer clean-up (spec §9.2)."""

import numpy as np
import pytest

import dvl_jax as dvl


@pytest.mark.parametrize("raw, clean", [
    ("B\nThe answer is B.", "B"),        # cut at the first newline
    ("Paris.\n\nIt is the capital.", "Paris"),
    ("  a red circle \t", "a red circle"),  # surrounding white space
    ("Paris.", "Paris"),                 # one trailing dot dropped
    ("etc..", "etc."),                   # only one
    ("3.5", "3.5"),                      # a dot inside stays
    (" A . ", "A "),                     # strip comes before the dot, as in the original
    ("\nB", ""),                         # an answer that starts with a newline is empty there too
    (".", ""),
    ("", ""),
])
def test_clean_answer_applies_each_rule(raw, clean):
  assert dvl.clean_answer(raw) == clean


def test_clean_text_follows_text():
  arrays = dict(tokens=np.zeros((2, 4), np.int32), lengths=np.full(2, 4), nfe=np.ones(2), forwards=1,
                tokens_per_forward=np.ones(2), steps_per_token=np.zeros((2, 4), np.int32))
  out = dvl.GenerateOutput(**arrays, text=[" Two.\nmore", "blue squares"])
  assert out.clean_text == ["Two", "blue squares"]
  assert out.text == [" Two.\nmore", "blue squares"]  # the decoded text itself is unchanged
  assert dvl.GenerateOutput(**arrays).clean_text is None  # no tokenizer, no text
