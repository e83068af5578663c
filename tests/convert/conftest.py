"""Fixtures of the conversion tests: tiny random models, tied and untied."""

import pytest

from tests.convert.tiny_layouts import Tiny, tiny


@pytest.fixture(scope="session", params=["untied", "tied"])
def tiny_model(request) -> Tiny:
  return tiny(request.param == "tied")
