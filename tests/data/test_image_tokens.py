import numpy as np
import pytest

from dvl_jax.data.image_tokens import expand_image_placeholders


def test_each_placeholder_becomes_its_image_tokens():
  ids = [5, -200, 6, 7, -200, 8]
  out = expand_image_placeholders(ids, np.array([[1, 4, 6], [1, 2, 2]]), image_token_id=99)
  np.testing.assert_array_equal(out, [5] + [99] * 6 + [6, 7] + [99] + [8])


def test_text_only_passes_through_and_mismatch_is_an_error():
  np.testing.assert_array_equal(expand_image_placeholders([1, 2], None, image_token_id=99), [1, 2])
  with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
    expand_image_placeholders([-200, -200], np.array([[1, 2, 2]]), image_token_id=99)
