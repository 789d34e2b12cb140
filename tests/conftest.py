"""Shared fixtures. The real-model fixtures load the embedded Gemma 3 270M once per test session."""

import json
import random
from pathlib import Path

import pytest

from backtrack_sampler.provider.fake_provider import FakeProvider

ROOT = Path(__file__).resolve().parents[1]

# Test data is built here, from the repository alone (the third-party lists in ../shared are for bench/).
WORDS = (
    "the a of and it was not but on sat cat dog mat rug ran away quickly tapestry light bright dark night "
    "sun moon star sky sea wind rain fire stone tree river city road house door window heart mind soul voice "
    "eyes hand time world life story dream shadow silence whisper journey moment sense testament symphony "
    "delve weave echo glimmer shiver spark breath gaze smile tears warmth chill hope fear love loss wonder "
    "ancient vast quiet gentle fierce soft cold warm deep old new small great little strange golden silver "
    "could would should might must will can did had has have is are were be been being to in at by for with "
    "from into over under through between across beyond within without about around upon after before"
).split()
SLOPS = [  # phrases of the kind AntiSlop lists hold (written for these tests)
    "a tapestry of",
    "a testament to",
    "delve into",
    "a symphony of",
    "shivers down",
    "barely above a whisper",
    "a sense of",
    "it's important to note",
    "in the realm of",
    "a dance of",
    "the weight of",
    "palpable",
    "unwavering",
    "a beacon of",
    "the air was thick",
    "her heart pounded",
    "eyes sparkling",
    "little did",
]


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config, items):
    """Tests marked ``vllm_inprocess`` run vLLM in the test process, so only in the vLLM venv
    (scripts/test.sh runs them there after the main suite): elsewhere they are deselected, and said so."""
    if _has_vllm():
        return
    held = [item for item in items if item.get_closest_marker("vllm_inprocess")]
    if held:
        items[:] = [item for item in items if not item.get_closest_marker("vllm_inprocess")]
        config.hook.pytest_deselected(items=held)
        config._vllm_inprocess_held = len(held)


def pytest_terminal_summary(terminalreporter, config):
    held = getattr(config, "_vllm_inprocess_held", 0)
    if held:
        terminalreporter.write_line(
            f"{held} in-process vLLM tests deselected here (no vllm in this Python): scripts/test.sh runs "
            "them in the vLLM venv (scripts/build_vllm.sh) with -m vllm_inprocess"
        )


@pytest.fixture(scope="session")
def vllm_provider():
    """vLLM in process on the embedded chat model (tests marked ``vllm_inprocess``, in the vLLM
    venv): made once per session, shut down at its end."""
    from test_vllm_inprocess import make_vllm_provider

    provider = make_vllm_provider()
    yield provider
    provider.close()


def make_phrases(count: int, seed: int = 0) -> list:
    """``count`` distinct phrases of 1 to 4 words, as [phrase, multiplier] pairs (like a slop list)."""
    rng, seen, pairs = random.Random(seed), set(), []
    for phrase in SLOPS:
        seen.add(phrase)
        pairs.append([phrase, round(rng.uniform(0.05, 0.9), 3)])
    while len(pairs) < count:
        phrase = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        if phrase not in seen:
            seen.add(phrase)
            pairs.append([phrase, round(rng.uniform(0.05, 0.9), 3)])
    return pairs


@pytest.fixture(scope="session")
def many_phrases():
    """50,000 generated [phrase, multiplier] pairs, the size of the big public slop list."""
    return make_phrases(50_000)


@pytest.fixture
def slop_files(tmp_path):
    """A slop list (JSON pairs), a plain phrase file and a regex file (quoted lines), written to tmp_path."""
    pairs = tmp_path / "slops.json"
    pairs.write_text(json.dumps(make_phrases(500)))
    plain = tmp_path / "slops.txt"
    plain.write_text("# one phrase per line\n" + "\n".join(SLOPS) + "\n")
    regexes = tmp_path / "regexes.txt"
    regexes.write_text(
        '"(?i)not [^.!?]{3,60} but",\n"(?i)each(?:\\s*\\w+\\s*|\\s*)a",\n"(?i)every(?:\\s*\\w+\\s*|\\s*)a"\n'
    )
    return {"pairs": pairs, "plain": plain, "regexes": regexes}


@pytest.fixture
def fake():
    """A fresh deterministic FakeProvider (numpy only)."""
    return FakeProvider()


@pytest.fixture(scope="session")
def llm():
    from backtrack_sampler.provider.models import load_llamacpp

    return load_llamacpp(n_ctx=4096)


@pytest.fixture(scope="session")
def llama_provider(llm):
    from backtrack_sampler.provider.llamacpp_provider import LlamacppProvider

    return LlamacppProvider(llm, None, "cpu")


@pytest.fixture(scope="session")
def chat_llama_provider():
    """The embedded chat model (SmolLM2 135M Instruct) on llama.cpp, once per session."""
    from backtrack_sampler.provider.models import load_provider

    return load_provider("llamacpp", "smollm2-135m-instruct", n_ctx=2048)


@pytest.fixture(scope="session")
def hf_model():
    from backtrack_sampler.provider.models import load_transformers

    return load_transformers()


@pytest.fixture(scope="session")
def transformers_provider(hf_model):
    from backtrack_sampler.provider.transformers_provider import TransformersProvider

    model, tokenizer = hf_model
    return TransformersProvider(model, tokenizer, "cpu")


@pytest.fixture(scope="session")
def mlx_model():
    """``(model, tokenizer)`` of the embedded chat model through mlx-lm (converted once, cached)."""
    from backtrack_sampler.provider.models import load_mlx

    return load_mlx("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def mlx_provider(mlx_model):
    from backtrack_sampler.provider.mlx_provider import MlxProvider

    return MlxProvider(*mlx_model)


@pytest.fixture(params=["llama", "transformers"])
def provider(request):
    """Each real-model provider in turn (the same session-wide instances)."""
    return request.getfixturevalue(f"{request.param}_provider")
