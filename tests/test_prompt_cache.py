"""The prompt cache across requests: a finished sequence's cache stays in its slot, the next
sequence takes the slot that shares the longest prefix with it and evaluates only its new tokens;
the logits stay those of a fresh pass (FakeProvider: exactly; the real models: the oracle of
test_providers, reusing a cached prefix and then rewinding into it and past it)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from serving import ServerThread
from test_batch import CheckLogits

from backtrack_sampler import BacktrackSampler
from backtrack_sampler.core.batch import BatchScheduler
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.server.app import Engine, create_app

HISTORY = [2] + [5 + i % 40 for i in range(60)]  # a chat so far (BOS, then 60 tokens)


def turn(prompt, answer, extra):
    """The next request of a chat: the history, the answer it got, a new message."""
    return list(prompt) + list(answer) + list(extra)


@pytest.mark.parametrize("batched", [False, True])
def test_a_follow_up_evaluates_only_its_new_tokens_and_stays_exact(batched):
    fake = FakeProvider(slots=2)

    def run(prompt, seed):
        strategy = CheckLogits(fake, prompt, seed)  # rewinds often; asserts every logits row is a fresh pass's
        before = fake.evaluated
        if batched:
            scheduler = BatchScheduler(fake, step_tokens=16)  # the prompt read in chunks
            job = scheduler.submit(prompt, strategy, max_new_tokens=12, seed=seed)
            list(scheduler.run())
            tokens, stats = job.tokens, job.stats
        else:
            sampler = BacktrackSampler(fake, strategy)
            tokens = list(sampler.generate(prompt, max_new_tokens=12, seed=seed))
            stats = sampler.stats
        return tokens, stats, fake.evaluated - before

    first, stats, evaluated = run(HISTORY, 0)
    assert stats.cached_tokens == 0 and evaluated >= len(HISTORY)
    follow_up = turn(HISTORY, first, [7, 8, 9])
    second, stats, evaluated = run(follow_up, 1)
    held = len(HISTORY) + len(first)  # the first request's sequence (its last token unevaluated at "length")
    assert held - 1 <= stats.cached_tokens <= held
    # after its first call, each call evaluates at most one token: the first read this many at most
    read = evaluated - (stats.steps - 1)
    assert read <= len(follow_up) - stats.cached_tokens <= 4, (read, stats)
    # a swipe (the same history again): only its last token is evaluated again
    _, stats, _ = run(HISTORY, 2)
    assert stats.cached_tokens == len(HISTORY) - 1


def test_without_the_prompt_cache_every_prompt_is_read_whole():
    fake = FakeProvider(slots=2)
    fake.prompt_cache = False
    sampler = BacktrackSampler(fake, CheckLogits(fake, HISTORY))
    list(sampler.generate(HISTORY, max_new_tokens=4, seed=0))
    before = fake.evaluated
    list(sampler.generate(HISTORY, max_new_tokens=4, seed=0))
    assert sampler.stats.cached_tokens == 0 and fake.evaluated - before >= len(HISTORY)


def test_a_new_key_takes_the_slot_with_the_longest_common_prefix():
    fake = FakeProvider(slots=3)
    a, b = HISTORY, [2] + [50 + i % 9 for i in range(40)]
    for key, prompt in (("a", a), ("b", b)):
        fake.next_logits_batch({key: prompt})
        fake.release(key)
    assert fake.claim(a + [9], key="a2") == len(a)  # a's slot
    assert fake.claim(b[:30] + [7], key="b2") == 30  # b's slot: its prefix, not a's (which shares the BOS only)
    fake.release("a2")
    fake.release("b2")
    # a new chat that shares only the BOS with both takes the empty slot: neither chat is evicted
    assert fake.claim([2, 40, 41], key="new") == 0
    assert fake.claim(a, key="a3") == len(a) and fake.claim(b[:30], key="b3") == 30
    for key in ("new", "a3", "b3"):
        fake.release(key)
    # no empty slot left: the least recently used one goes ("new" released first)
    fake.next_logits_batch({"other": [2, 60, 61, 62]})
    assert fake.claim(a, key="a4") == len(a) and fake.claim(b[:30], key="b4") == 30
    assert np.array_equal(fake.next_logits_batch({"a4": a + [3]})["a4"], fake.logits_for(a + [3]))
    fake.reset()  # empties the caches no key holds ...
    fake.release("other")
    assert fake.claim([2, 60, 61], key="again") == 3  # ... and keeps the ones a key holds
    with pytest.raises(RuntimeError, match="3 sequences at most"):
        fake.claim([2], key="one too many")


def test_usage_reports_the_cached_prompt_tokens():
    """OpenAI's ``usage.prompt_tokens_details.cached_tokens``: 0 the first time, then the prompt
    tokens the slot still held."""
    fake = FakeProvider(slots=1)
    with ServerThread(create_app(Engine(fake, "fake"))) as server:

        def usage(prompt):
            body = {"model": "fake", "prompt": prompt, "max_tokens": 3, "temperature": 0}
            response = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
            assert response.status_code == 200, response.text
            return response.json()["usage"]

        first = usage(HISTORY)
        assert first["prompt_tokens"] == len(HISTORY) and first["prompt_tokens_details"] == {"cached_tokens": 0}
        again = usage(HISTORY + [7, 8])
        assert again["prompt_tokens_details"] == {"cached_tokens": len(HISTORY)}


# --- the real models: the oracle with a reused prefix --------------------------------------------
TEXT = " ".join(f"On day {i} the fox walked {i * 7 % 13} miles to the owl's den." for i in range(40))
CHECKPOINTS = [150, 230, 300, 360]


def _feed(call, tokens, start, stop, rewinds, seen):
    """``call(tokens[:n])`` for n from ``start`` to ``stop``, one token at a time (so every position
    is computed the same way), rewinding as scheduled; the logits at each checkpoint, last seen."""
    length, done = start, set()
    while length <= stop:
        logits = call(tokens[:length])
        if length in CHECKPOINTS:
            seen[length] = logits
        if length in rewinds and length not in done:
            done.add(length)
            length = rewinds[length]
        else:
            length += 1
    return seen


@pytest.mark.model
@pytest.mark.parametrize("slots", [1, 2])
def test_oracle_holds_after_reusing_a_cached_prefix(provider, slots):
    """A first request reads 240 tokens of the text and then 40 of a detour; the second request
    (the text to 360 tokens) reuses the 240 shared tokens from the cache, and rewinds from 330 to
    180 (into the reused prefix) and from 300 to 120 (past where it reused it), then goes on. Its
    logits equal those of one pass fed the same way without the cache."""
    if slots == 2:
        cls = type(provider)
        provider = (
            cls(provider.llm, None, "cpu", slots=2)
            if cls.__name__ == "LlamacppProvider"
            else cls(provider.model, provider.tokenizer, "cpu", slots=2)
        )
    tokens = provider.encode(TEXT)[: CHECKPOINTS[-1]]
    detour = provider.encode(" A heron flew over the lake at dawn, and nobody saw it land." * 4, False)[:40]
    assert len(tokens) == CHECKPOINTS[-1] and len(detour) == 40

    def call(seq):
        return provider.next_logits_batch({"job": seq})["job"]

    provider.reset()
    reference = _feed(call, tokens, 1, CHECKPOINTS[-1], {}, {})
    provider.release("job")
    provider.reset()
    first = tokens[:240] + detour
    _feed(call, first, 1, len(first), {}, {})
    provider.release("job")
    assert provider.claim(tokens, key="job") == 240
    seen = _feed(call, tokens, 241, CHECKPOINTS[-1], {330: 180, 300: 120}, {})
    provider.release("job")
    for length in CHECKPOINTS:
        diff = np.abs(reference[length] - seen[length]).max()
        assert diff < 1e-3 and reference[length].argmax() == seen[length].argmax(), (length, diff)
    provider.reset()
