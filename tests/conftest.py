"""Shared fixtures. The real-model fixtures load the embedded Gemma 3 270M once per test session."""

from pathlib import Path

import pytest

from backtrack_sampler.provider.fake_provider import FakeProvider

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "antislop"  # third-party slop lists: read, never copy


@pytest.fixture
def fake():
    """A fresh deterministic FakeProvider (numpy only)."""
    return FakeProvider()


@pytest.fixture(scope="session")
def llm():
    from backtrack_sampler.models import load_llamacpp

    return load_llamacpp(n_ctx=4096)


@pytest.fixture(scope="session")
def llama_provider(llm):
    from backtrack_sampler.provider.llamacpp_provider import LlamacppProvider

    return LlamacppProvider(llm, None, "cpu")


@pytest.fixture(scope="session")
def hf_model():
    from backtrack_sampler.models import load_transformers

    return load_transformers()


@pytest.fixture(scope="session")
def transformers_provider(hf_model):
    from backtrack_sampler.provider.transformers_provider import TransformersProvider

    model, tokenizer = hf_model
    return TransformersProvider(model, tokenizer, "cpu")


@pytest.fixture(params=["llama", "transformers"])
def provider(request):
    """Each real-model provider in turn (the same session-wide instances)."""
    return request.getfixturevalue(f"{request.param}_provider")


@pytest.fixture
def shared_data():
    if not SHARED.is_dir():
        pytest.fail(f"test data missing: {SHARED} (the shared/ folder beside the repository)")
    return SHARED
