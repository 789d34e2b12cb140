"""Hard bans at scale on the real models (issue 19): a 2,000-pair ban list of the tokenizer's most
frequent words (``bench/antislop_bench.py:frequent_word_pairs``, seed ``PAIRS_SEED``), over several
seeds, on both embedded models, in-process (llama.cpp; transformers too) and through a real
llama-server (the engine backend). Every final text must hold no banned pair, and the bans must
really have been hit (every generation rewound).

Even seeds match substrings (AntiSlop's default), odd seeds whole words; the oracle is the plain
search of tests/test_guarantees.py (case-insensitive; whole words: not glued to letters or digits).
A failure prints the model, path, seed, mode and text: ``frequent_word_pairs(provider)`` with the
same tokenizer rebuilds the list.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Dict, List

import pytest
from test_engine_llama_server import LlamaServer, llama_server_binary
from test_guarantees import banned_hits

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("antislop_bench", ROOT / "bench" / "antislop_bench.py")
antislop_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(antislop_bench)
frequent_word_pairs, PAIRS_SEED = antislop_bench.frequent_word_pairs, antislop_bench.PAIRS_SEED

MODELS = ["gemma-3-270m", "smollm2-135m-instruct"]
SEEDS = range(6)
TOKENS = 150
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
BASE_PROMPT = "Once upon a time, in a small village by the sea, there lived an old lighthouse keeper."


def load(backend: str, model: str):
    from backtrack_sampler.errors import UsageError
    from backtrack_sampler.provider.models import load_provider

    try:
        return load_provider(backend, model, 4096 if backend == "llamacpp" else None, None)
    except (UsageError, ImportError) as error:
        pytest.fail(f"the embedded model {model} cannot be loaded with {backend} (this test needs it): {error}")


def prompt_tokens(provider, model: str) -> List[int]:
    """The chat model gets its chat template, the base model a story opening."""
    if model.startswith("smollm2"):
        from backtrack_sampler.provider.chat import chat_prompt_tokens

        return chat_prompt_tokens(provider, [{"role": "user", "content": PROMPT}])
    return provider.encode(BASE_PROMPT)


def run_seeds(provider, tokenizer, model: str, path: str, seeds=SEEDS, tokens: int = TOKENS) -> Dict[str, int]:
    """Generate with the 2,000-pair list for every seed; assert 0 hits and that each generation rewound."""
    pairs = frequent_word_pairs(tokenizer, seed=PAIRS_SEED)
    assert len(pairs) >= 2000
    prompt = prompt_tokens(tokenizer, model)
    totals = {"delivered": 0, "rewinds": 0, "rewound": 0, "constraint": 0}
    for seed in seeds:
        whole = seed % 2 == 1
        strategy = AntiSlopStrategy(provider, pairs, whole_words=whole)
        sampler = BacktrackSampler(provider, strategy)
        out = list(sampler.generate(prompt, max_new_tokens=tokens, seed=seed, temperature=1.0, top_k=50))
        text = tokenizer.decode(out)
        stats = sampler.stats
        where = f"{model} {path} seed={seed} whole_words={whole} finish_reason={stats.finish_reason!r}"
        hits = banned_hits(text, pairs, whole_words=whole)
        assert not hits, f"{where}: banned pairs {sorted({p for p, _ in hits})} in the final text {text!r}"
        assert stats.rewinds > 0, f"{where}: no rewind in {len(out)} tokens: the list was not hit ({text!r})"
        assert stats.finish_reason in ("stop", "length", "constraint"), where
        totals["delivered"] += stats.delivered
        totals["rewinds"] += stats.rewinds
        totals["rewound"] += stats.rewound
        totals["constraint"] += stats.finish_reason == "constraint"
    print(f"{model} {path}: {totals}")  # with -s
    return totals


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return request.param


@pytest.fixture(scope="module")
def llamacpp(model):
    return load("llamacpp", model)


def test_in_process_llamacpp(model, llamacpp):
    run_seeds(llamacpp, llamacpp, model, "llama.cpp in-process")


def test_in_process_transformers(model):
    # Gemma 3 (262k vocabulary) runs at a few tokens/s on transformers here: fewer, shorter runs
    seeds, tokens = (SEEDS, TOKENS) if model.startswith("smollm2") else (range(2), 60)
    provider = load("transformers", model)
    run_seeds(provider, provider, model, "transformers in-process", seeds, tokens)


@pytest.fixture(scope="module")
def llama_server(model):
    """One llama-server per model (4 slots), stopped at the end of the model's tests."""
    from backtrack_sampler.provider.models import resolve_model

    try:
        gguf = str(resolve_model(model))
    except ImportError as error:
        pytest.fail(f"the embedded model {model} is not installed (this test needs it): {error}")
    process = LlamaServer(llama_server_binary(), gguf)
    yield process, gguf
    process.stop()


def test_through_llama_server(model, llama_server):
    from backtrack_sampler.engine import EngineProvider

    process, gguf = llama_server
    engine = EngineProvider(process.url, "llama-server", tokenizer=gguf, timeout=60)
    try:
        run_seeds(engine, engine, model, "llama-server engine")
    finally:
        engine.close()
