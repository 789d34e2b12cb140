"""The MLX backend (mlx-lm; ``mlx[cpu]`` on these Linux machines) on the embedded chat model, converted
once from its GGUF file (``load_mlx``; nothing downloads). These tests fail, not skip, without MLX:
scripts/install.sh installs it.

The rewind oracle: after rewinds of random depth, the logits at every position are those of a run
without rewinds, bit for bit (tolerance 0: a trimmed KV cache is overwritten by the same computation).
Where a cache cannot trim, the provider prefills again: equal up to bfloat16 rounding (``PREFILL_TOLERANCE``).
"""

import json
import random
import re

import httpx
import numpy as np
import pytest
from serving import serve_subprocess

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, BaseStrategy, cli
from backtrack_sampler.provider.chat import chat_prompt_tokens
from backtrack_sampler.provider.mlx_provider import MlxProvider

pytestmark = pytest.mark.model

TEXT = " ".join(f"On day {i} the fox walked {i * 7 % 13} miles to the owl's den." for i in range(12))
LENGTH = 96  # tokens of TEXT walked
PREFILL_TOLERANCE = 0.5  # logits of magnitude ~25 in bfloat16: one chunk vs token by token


@pytest.fixture(scope="module")
def tokens(mlx_provider):
    ids = mlx_provider.encode(TEXT)
    assert len(ids) >= LENGTH
    return ids[:LENGTH]


@pytest.fixture(scope="module")
def reference(mlx_provider, tokens):
    """The logits after each prefix of ``tokens``, fed one token at a time with no rewind."""
    mlx_provider.reset()
    return {n: mlx_provider.next_logits(tokens[:n]) for n in range(1, len(tokens) + 1)}


def walk(next_logits, tokens, seed: int, rewinds: int = 8):
    """Feed ``tokens`` one at a time, rewinding ``rewinds`` times by 1 to 40 tokens (past the kept
    logits too) at random points: ``[(length, logits)]`` for every step."""
    rng, seen, length = random.Random(seed), [], 1
    while length <= len(tokens):
        seen.append((length, next_logits(tokens[:length])))
        if rewinds and length > 10 and rng.random() < 0.12:
            rewinds -= 1
            length = max(1, length - rng.randint(1, 40))
        else:
            length += 1
    assert rewinds == 0
    return seen


def test_rewinds_of_random_depth_give_the_logits_of_a_run_without_them(mlx_provider, tokens, reference):
    mlx_provider.reset()
    for length, logits in walk(mlx_provider.next_logits, tokens, seed=1):
        assert logits.dtype == np.float32 and logits.shape == (mlx_provider.vocab_size,)
        assert np.array_equal(logits, reference[length]), (length, np.abs(logits - reference[length]).max())
    assert mlx_provider.cached_tokens == tokens


def test_a_cache_that_cannot_trim_is_prefilled_again(mlx_provider, tokens, reference, monkeypatch):
    """A layer that cannot trim (a sliding window that wrapped, a recurrent state): the provider
    starts a new cache and prefills the sequence again instead of giving wrong logits."""
    mlx_provider.reset()
    mlx_provider.next_logits(tokens[:60])
    before = mlx_provider._caches[0]
    for layer in before:
        monkeypatch.setattr(layer, "is_trimmable", lambda: False)
    logits = mlx_provider.next_logits(tokens[:30])
    assert mlx_provider._caches[0] is not before and mlx_provider.cached_tokens == tokens[:30]
    assert logits.argmax() == reference[30].argmax() and np.abs(logits - reference[30]).max() < PREFILL_TOLERANCE
    for n in range(31, 40):  # and it goes on from there, step by step
        logits = mlx_provider.next_logits(tokens[:n])
        assert np.abs(logits - reference[n]).max() < PREFILL_TOLERANCE and logits.argmax() == reference[n].argmax()
    mlx_provider.reset()


def test_each_slot_rewinds_on_its_own(mlx_model, tokens, reference):
    """``slots=2``: two sequences stepped together, each with its own random rewinds, each exact."""
    provider = MlxProvider(*mlx_model, slots=2)
    assert provider.max_sequences == 2
    steps = [iter(walk(lambda ids: ids, tokens, seed)) for seed in (2, 3)]  # the lengths each one asks for
    pending = {key: next(step) for key, step in zip("ab", steps)}
    while pending:
        got = provider.next_logits_batch({key: ids for key, (_, ids) in pending.items()})
        for key, logits in got.items():
            assert np.array_equal(logits, reference[len(pending[key][1])]), key
            pending[key] = next(steps["ab".index(key)], None)  # type: ignore[arg-type]
        pending = {key: value for key, value in pending.items() if value is not None}
    for key in "ab":
        provider.release(key)
    assert provider.batch_keys == []


def test_greedy_text_is_mlx_lm_own(mlx_provider, mlx_model):
    """No strategy, temperature 0: the tokens mlx-lm's own stream_generate picks."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = mlx_model
    prompt = chat_prompt_tokens(mlx_provider, [{"role": "user", "content": "Write a haiku about the sea."}])
    ours = list(BacktrackSampler(mlx_provider, BaseStrategy()).generate(prompt, max_new_tokens=20, temperature=0))
    theirs = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=20, sampler=make_sampler(0.0))]
    assert ours == theirs[: len(ours)] and ours


def test_tokenizer_end_markers_and_bans(mlx_provider):
    assert mlx_provider.encode("Hello world") == mlx_provider.encode("Hello world", add_special_tokens=False)  # no BOS
    assert mlx_provider.decode(mlx_provider.encode("Hello world")) == "Hello world"
    im_end = mlx_provider.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in mlx_provider.eos_token_ids and mlx_provider.device == "cpu"
    prompt = chat_prompt_tokens(mlx_provider, [{"role": "user", "content": "Tell me about the sea."}])
    sampler = BacktrackSampler(mlx_provider, AntiSlopStrategy(mlx_provider, ["the", "sea"]))
    text = mlx_provider.decode(list(sampler.generate(prompt, max_new_tokens=30, temperature=0)))
    assert "the" not in text.lower() and "sea" not in text.lower() and text.strip()


def test_cli_generate_on_mlx(capsys):
    code = cli.main(
        ["generate", "--backend", "mlx", "--model", "smollm2", "--chat", "Name three colours.", "--ban", "the",
         "--whole-words", "--max-new-tokens", "20", "--temperature", "0"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and out.strip() and not re.search(r"(?i)\bthe\b", out), out


def test_cli_batch_on_mlx(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"s{i}", "messages": [{"role": "user", "content": f"Write about {topic}."}]}) + "\n"
                for i, topic in enumerate(["a fox", "a boat"]))
    )  # fmt: skip
    out = tmp_path / "out.jsonl"
    code = cli.main(
        ["batch", str(prompts), "-o", str(out), "--backend", "mlx", "--model", "smollm2", "--parallel", "2",
         "--ban", "the", "--whole-words", "--max-new-tokens", "12", "--seed", "1"]
    )  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and sorted(r["id"] for r in records) == ["s0", "s1"]
    assert all(r["text"].strip() and not re.search(r"(?i)\bthe\b", r["text"]) for r in records), records


def test_serve_on_mlx():
    """`serve --backend mlx` (a real process): /health, then a chat completion with a banned string."""
    with serve_subprocess(["--backend", "mlx", "--model", "smollm2"]) as url:
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        answer = httpx.post(
            url + "/v1/chat/completions",
            timeout=120,
            json={
                "messages": [{"role": "user", "content": "Tell me about the sea."}],
                "max_tokens": 24,
                "temperature": 0,
                "banned_strings": ["sea"],
            },
        ).json()
        text = answer["choices"][0]["message"]["content"]
        assert text.strip() and "sea" not in text.lower(), answer
