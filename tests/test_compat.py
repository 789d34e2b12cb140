"""4.0 names keep working: module paths that moved in 4.1 and renamed methods, each with a DeprecationWarning."""

import importlib
import sys

import numpy as np
import pytest

from backtrack_sampler._moved import MOVED
from backtrack_sampler.provider.fake_provider import FakeProvider


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_moved_module_imports_by_its_old_name_as_the_same_module(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="moved to"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert module.__spec__.name == MOVED[old]  # the real module's spec, not the alias's


def test_old_from_imports_of_the_readme_work():
    for old in ("backtrack_sampler.models", "backtrack_sampler.slop_phrases"):
        sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning):
        from backtrack_sampler.models import load_provider  # noqa: F401
        from backtrack_sampler.slop_phrases import SLOP_PHRASES
    assert "tapestry" in SLOP_PHRASES


def test_provider_generate_is_next_logits():
    provider = FakeProvider()
    expected = provider.next_logits([2, 5, 6])
    with pytest.warns(DeprecationWarning, match="next_logits"):
        assert np.array_equal(provider.generate([2, 5, 6]), expected)
