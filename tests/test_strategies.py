"""CreativeWriting, AdaptiveTemperature, Chain and Debug strategies: exact behaviour on the
FakeProvider with scripted logits, then real properties on both real backends (``-m model``)."""

import io
import math

import numpy as np
import pytest

from backtrack_sampler import (
    AdaptiveTemperatureStrategy,
    BacktrackSampler,
    BaseStrategy,
    ChainStrategy,
    CreativeWritingStrategy,
    DebugStrategy,
)
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.strategy.adaptive_temperature_strategy import entropy

BOS = [2]  # FakeProvider's BOS: prompts given as token ids, so the continuation starts at index 1


def scripted(table, default=None):
    """A FakeProvider whose logits after continuation ``c`` (a tuple of words) put the listed
    words at the given logits and everything else at -20; ``default`` scores unlisted steps."""
    fake = FakeProvider()

    def logits_fn(tokens):
        words = tuple(fake.vocab[t] for t in tokens[1:])
        scores = table.get(words, default)
        if scores is None:
            raise AssertionError(f"unscripted step after {words}")
        logits = np.full(fake.vocab_size, -20.0, dtype=np.float32)
        for word, score in scores.items():
            logits[fake.ids[word]] = score
        return logits

    fake.logits_fn = logits_fn
    return fake


def words(fake, tokens):
    return [fake.vocab[t] for t in tokens]


# 20 equally likely words: the 8 best hold 40% < top_p_flat=0.65, so this is flat for the defaults
FLAT = {
    w: 0.0
    for w in [
        " a",
        " dog",
        " sat",
        " mat",
        " and",
        " ran",
        " away",
        " quickly",
        " tapestry",
        " of",
        " light",
        " it",
        " was",
        " not",
        " but",
        " bright",
        " dark",
        " night",
        ".",
        ",",
    ]
}


# --- CreativeWritingStrategy -------------------------------------------------------------------


class KeepSpy(CreativeWritingStrategy):
    """Records (tokens left after backtrack, keep index) at every step."""

    def backtrack(self, continuation_tokens):
        result = super().backtrack(continuation_tokens)
        self.lengths.append(len(result))
        return result

    def get_keep_index(self):
        keep = super().get_keep_index()
        self.log.append((self.lengths[-1], keep))
        return keep


def test_creative_writing_bans_the_most_likely_token():
    peaked = {(): {" the": 5, " cat": 4}, (" cat",): {" sat": 5, " on": 4}, (" cat", " on"): {" the": 5, " mat": 4}}
    fake = scripted(peaked, default={"<eos>": 5})
    plain = list(BacktrackSampler(fake, BaseStrategy()).generate(BOS, max_new_tokens=3, temperature=0))
    sampler = BacktrackSampler(fake, CreativeWritingStrategy(fake))
    out = list(sampler.generate(BOS, max_new_tokens=10, temperature=0))
    assert words(fake, plain) == [" the"]  # greedy takes the argmax (then EOS ends)
    assert words(fake, out) == [" cat", " on", " mat"]  # the second choice every time
    assert sampler.stats.rewinds == 0 and sampler.stats.finish_reason == "stop"  # EOS is never banned


def test_creative_writing_rewinds_a_pick_followed_by_a_flat_distribution():
    table = {
        (): {" the": 5, " cat": 4},
        (" cat",): FLAT,  # after the creative pick the model is lost: rewind, take " the"
        (" the",): {" sat": 5, " on": 4},
        (" the", " on"): {" mat": 5, " rug": 4},
        (" the", " on", " rug"): {"<eos>": 5, " and": 4},
    }
    fake = scripted(table)
    strategy = KeepSpy.__new__(KeepSpy)
    strategy.lengths, strategy.log = [], []
    strategy.__init__(fake)
    sampler = BacktrackSampler(fake, strategy)
    events = []
    out = list(sampler.generate(BOS, max_new_tokens=10, temperature=0, on_rewind=events.append))
    assert words(fake, out) == [" the", " on", " rug"]
    assert sampler.stats.rewinds == 1 and sampler.stats.finish_reason == "stop"
    (event,) = events
    assert event.position == 0 and words(fake, event.tokens)[0] == " cat" and len(event.tokens) == 2
    assert "flat" in event.reason
    # (tokens, keep): the pick " cat" waits for its verdict; the forced " the" is final at once;
    # " on" becomes final when the step after it is not flat.
    assert strategy.log == [(1, 0), (0, 0), (1, 1), (2, 1), (3, 2)]


def test_creative_writing_streams_tokens_once_they_cannot_be_rewound():
    fake = scripted({(): {" the": 5, " cat": 4}}, default={" the": 5, " cat": 4})
    sampler = BacktrackSampler(fake, CreativeWritingStrategy(fake))
    stream = sampler.generate(BOS, max_new_tokens=5, temperature=0)
    next(stream)
    assert sampler.stats.steps == 2  # the first token came out as soon as the second step judged it
    assert len(list(stream)) == 4


def test_creative_writing_eos_penalty(fake):
    strategy = CreativeWritingStrategy(fake)
    probs = np.zeros(fake.vocab_size, dtype=np.float32)
    probs[[1, 3, 5]] = [0.5, 0.3, 0.2]  # 1 is EOS
    out = strategy.on_probs(probs.copy(), [])
    np.testing.assert_allclose(out[[1, 3, 5]], [0.4, 0.3, 0.2])

    # after banning " the", EOS is the most likely: it ends the text unless eos_penalty=0 bans it
    fake = scripted({}, default={" the": 5, "<eos>": 4, " cat": 3.9})
    ended = BacktrackSampler(fake, CreativeWritingStrategy(fake, eos_penalty=1.0))
    assert list(ended.generate(BOS, max_new_tokens=4, temperature=0)) == []
    assert ended.stats.finish_reason == "stop"
    banned = BacktrackSampler(fake, CreativeWritingStrategy(fake, eos_penalty=0.0))
    assert words(fake, banned.generate(BOS, max_new_tokens=4, temperature=0)) == [" cat"] * 4
    assert banned.stats.finish_reason == "length"


def brute_force_flat(logits, top_p_flat, top_k_threshold_flat):
    probs = np.sort(np.exp(logits - logits.max()))[::-1]
    probs /= probs.sum()
    needed = int(np.searchsorted(np.cumsum(probs), top_p_flat)) + 1
    return top_k_threshold_flat <= needed


def test_creative_writing_flatness_matches_the_sorted_definition(fake):
    rng = np.random.default_rng(0)
    agree = set()
    for trial in range(300):
        logits = (rng.standard_normal(500) * rng.uniform(0.1, 4)).astype(np.float32)
        top_p, k = float(rng.uniform(0.3, 0.95)), int(rng.integers(1, 20))
        strategy = CreativeWritingStrategy(fake, top_p_flat=top_p, top_k_threshold_flat=k)
        expected = brute_force_flat(logits.astype(np.float64), top_p, k)
        assert strategy._is_flat(logits) == expected, (trial, top_p, k)
        agree.add(expected)
    assert agree == {True, False}  # both outcomes were exercised


def creative_invariant(provider, prompt_tokens, out, events, tol=0.0):
    """Every delivered token is either a creative pick (not the model's clear argmax) or, at a
    position a rewind went back to, the argmax itself. Returns the number of creative picks."""
    forced = {event.position for event in events}
    provider.reset()
    picks = 0
    for i, token in enumerate(out):
        logits = provider.next_logits(prompt_tokens + out[:i]).astype(np.float64)
        others = logits.copy()
        others[token] = -np.inf
        if i in forced:
            assert logits[token] >= others.max() - tol, f"position {i}: a rewind must place the argmax"
        else:
            assert logits[token] <= others.max() + tol, f"position {i}: the argmax was not banned"
            picks += 1
    return picks


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_creative_writing_invariant_on_pseudo_random_logits(fake, temperature):
    strategy = CreativeWritingStrategy(fake, top_p_flat=0.9, top_k_threshold_flat=5)
    sampler = BacktrackSampler(fake, strategy)
    out = list(sampler.generate(BOS, max_new_tokens=40, temperature=temperature, seed=3))
    assert sampler.stats.rewinds > 0  # the scenario exercises both kinds of tokens
    picks = creative_invariant(fake, BOS, out, sampler.stats.events)
    assert 0 < picks < len(out)
    again = list(sampler.generate(BOS, max_new_tokens=40, temperature=temperature, seed=3))
    assert again == out


class NoEos(FakeProvider):
    """A provider with no end-of-sequence token (generation ends at the token limit)."""

    @property
    def eos_token_ids(self):
        return frozenset()


@pytest.mark.parametrize("eos_penalty", [0.0, 0.8])
def test_creative_writing_with_a_provider_without_eos(eos_penalty):
    provider = NoEos(seed=2)
    sampler = BacktrackSampler(provider, CreativeWritingStrategy(provider, eos_penalty=eos_penalty))
    out = list(sampler.generate(BOS, max_new_tokens=12, temperature=0.8, seed=1))
    assert len(out) == 12 and sampler.stats.finish_reason == "length"


def test_creative_writing_rejects_bad_arguments(fake):
    for kwargs in [{"top_p_flat": 0}, {"top_p_flat": 1.5}, {"top_k_threshold_flat": 0}, {"eos_penalty": 2}]:
        with pytest.raises(ValueError):
            CreativeWritingStrategy(fake, **kwargs)


# --- AdaptiveTemperatureStrategy ---------------------------------------------------------------


def brute_force_entropy(logits):
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_entropy_matches_the_full_sum():
    rng = np.random.default_rng(1)
    for scale in [0.01, 1, 5, 50]:
        logits = (rng.standard_normal(262_144) * scale).astype(np.float32)
        assert entropy(logits) == pytest.approx(brute_force_entropy(logits), rel=1e-6, abs=1e-9)
    assert entropy(np.array([0, -np.inf, -np.inf], dtype=np.float32)) == 0.0
    assert entropy(np.zeros(20, dtype=np.float32)) == pytest.approx(math.log(20))


def test_adaptive_temperature_beta():
    strategy = AdaptiveTemperatureStrategy()
    assert strategy.beta(0.0) == strategy.beta(0.5) == 1.0
    assert strategy.beta(2.0) == pytest.approx(-0.037 * 16 + 0.481 * 8 - 2.3 * 4 + 4.917 * 2 - 1.791)
    assert strategy.beta(7.0) == 1.0  # the polynomial dips below 1 there: never heats up
    assert AdaptiveTemperatureStrategy(poly_coeffs=[3.0]).beta(1.0) == 3.0


def test_adaptive_temperature_sharpens_high_entropy_and_leaves_confident_steps():
    strategy = AdaptiveTemperatureStrategy()
    spread = np.linspace(0, 3, 50).astype(np.float32)
    before = entropy(spread)
    out = strategy.on_logits(spread.copy(), [])
    np.testing.assert_allclose(out, spread * strategy.beta(before), rtol=1e-6)
    assert strategy.beta(before) > 1.5 and entropy(out) < before - 0.3

    confident = np.array([10, 0, 0, 0], dtype=np.float32)
    assert entropy(confident) < 0.5
    np.testing.assert_array_equal(strategy.on_logits(confident.copy(), []), confident)


def test_adaptive_temperature_makes_the_likely_token_more_frequent():
    scores = {" the": 2.0, " cat": 1.0, **{w: 0.0 for w in list(FLAT)[:10]}}
    fake = scripted({}, default=scores)
    logits = fake.logits_for(BOS)
    beta = AdaptiveTemperatureStrategy().beta(entropy(logits))
    the = fake.ids[" the"]
    for strategy, scale in [(BaseStrategy(), 1.0), (AdaptiveTemperatureStrategy(), beta)]:
        expected = float(np.exp(scale * logits[the] - np.logaddexp.reduce(scale * logits.astype(np.float64))))
        out = list(BacktrackSampler(fake, strategy).generate(BOS, max_new_tokens=400, seed=0, top_k=None))
        assert out.count(the) / len(out) == pytest.approx(expected, abs=0.06)
    assert beta > 2  # entropy ~2.1 nats: p(" the") goes from ~0.37 to ~0.80


# --- ChainStrategy -----------------------------------------------------------------------------


class Ban(BaseStrategy):
    def __init__(self, token):
        self.token, self.seen, self.resets = token, [], 0

    def on_logits(self, logits, continuation_tokens):
        logits[self.token] = -np.inf
        return logits

    def on_next_token(self, continuation_tokens, probs):
        self.seen.append(continuation_tokens[-1])

    def reset(self):
        self.resets += 1


class Rewinder(BaseStrategy):
    """Rewinds to ``to`` tokens the first time there are ``at`` tokens; ``keep`` is its keep index."""

    def __init__(self, at, to, keep, reason):
        self.at, self.to, self.keep, self.reason, self.done = at, to, keep, reason, False

    def get_keep_index(self):
        return self.keep

    def backtrack(self, continuation_tokens):
        if not self.done and len(continuation_tokens) == self.at:
            self.done, self.rewind_reason = True, self.reason
            return continuation_tokens[: self.to]
        return continuation_tokens


def test_chain_folds_on_logits_and_informs_every_strategy():
    fake = scripted({}, default={" the": 5, " cat": 4, " dog": 3})
    first, second = Ban(fake.ids[" the"]), Ban(fake.ids[" cat"])
    chain = ChainStrategy([first, second])
    out = list(BacktrackSampler(fake, chain).generate(BOS, max_new_tokens=3, temperature=0))
    assert words(fake, out) == [" dog"] * 3  # both bans applied
    assert first.seen == second.seen == out
    assert first.resets == second.resets == 2  # before and after generate
    chain.reset()
    assert first.resets == second.resets == 3


def test_chain_backtrack_keep_index_and_reason():
    a, b = Rewinder(at=4, to=3, keep=7, reason="a"), Rewinder(at=3, to=1, keep=2, reason="b")
    chain = ChainStrategy([a, b, AdaptiveTemperatureStrategy()])
    assert chain.get_keep_index() == 2  # the smallest; AdaptiveTemperature makes everything final
    assert chain.backtrack([10, 11, 12, 13]) == [10]  # a cuts to 3, then b (seeing 3) cuts to 1
    assert chain.rewind_reason == "Rewinder: a; Rewinder: b"
    assert chain.backtrack([10, 11, 12, 13]) == [10, 11, 12, 13]
    with pytest.raises(ValueError):
        ChainStrategy([])
    with pytest.raises(TypeError):
        ChainStrategy([object()])


def test_chain_of_creative_writing_and_adaptive_temperature():
    table = {
        (): {" the": 5, " cat": 4},
        (" cat",): FLAT,
        (" the",): {" sat": 5, " on": 4},
        (" the", " on"): {"<eos>": 5},
    }
    fake = scripted(table)
    alone = BacktrackSampler(fake, CreativeWritingStrategy(fake))
    expected = list(alone.generate(BOS, max_new_tokens=10, temperature=0))
    chain = ChainStrategy([CreativeWritingStrategy(fake), AdaptiveTemperatureStrategy()])
    sampler = BacktrackSampler(fake, chain)
    out = list(sampler.generate(BOS, max_new_tokens=10, temperature=0))
    assert words(fake, out) == words(fake, expected) == [" the", " on"]
    assert sampler.stats.rewinds == 1 and "CreativeWritingStrategy: flat" in sampler.stats.events[0].reason

    # both effects at once: the argmax is banned and the rest sharpened
    logits = np.linspace(0, 3, 50).astype(np.float32)
    creative, adaptive = CreativeWritingStrategy(fake), AdaptiveTemperatureStrategy()
    combined = ChainStrategy([creative, adaptive]).on_logits(logits.copy(), [])
    banned = logits.copy()
    banned[-1] = -np.inf
    np.testing.assert_allclose(combined, banned * adaptive.beta(entropy(banned)), rtol=1e-6)


# --- DebugStrategy -----------------------------------------------------------------------------


def test_debug_strategy_prints_the_top_candidates_and_changes_nothing():
    fake = scripted({}, default={" the": 2, " cat": 1})
    log = io.StringIO()
    sampler = BacktrackSampler(fake, DebugStrategy(fake, top_n=2, file=log))
    plain = list(BacktrackSampler(fake, BaseStrategy()).generate(BOS, max_new_tokens=2, seed=5))
    assert list(sampler.generate(BOS, max_new_tokens=2, seed=5)) == plain
    first = log.getvalue().strip().splitlines()[0]
    assert first == "[step 0] top 2: ' the' 73.11%, ' cat' 26.89%"


# --- the real model (both backends) ------------------------------------------------------------

PROMPT = "Once upon a time, in a small village,"


@pytest.mark.model
def test_real_creative_writing(provider):
    prompt_tokens = provider.encode(PROMPT, add_special_tokens=True)
    sampler = BacktrackSampler(provider, CreativeWritingStrategy(provider))
    provider.reset()  # as the replay below: llama.cpp's numbers depend on the chunks that built a cache
    out = list(sampler.generate(PROMPT, max_new_tokens=20, temperature=0))
    events = sampler.stats.events
    assert out and provider.decode(out).strip()
    picks = creative_invariant(provider, prompt_tokens, out, events, tol=1e-2)
    assert picks > 0 or sampler.stats.rewinds > 0
    assert list(sampler.generate(PROMPT, max_new_tokens=20, temperature=0)) == out  # greedy: deterministic


@pytest.mark.model
def test_real_chain_of_creative_writing_and_adaptive_temperature(provider):
    def run():
        chain = ChainStrategy([CreativeWritingStrategy(provider), AdaptiveTemperatureStrategy()])
        sampler = BacktrackSampler(provider, chain)
        return list(sampler.generate(PROMPT, max_new_tokens=20, seed=7, temperature=0.8)), sampler.stats

    out, stats = run()
    assert stats.delivered == len(out) <= 20 and stats.finish_reason == ("length" if len(out) == 20 else "stop")
    assert stats.steps == len(out) + stats.rewound + (stats.finish_reason == "stop")
    assert provider.decode(out).strip()
    assert run()[0] == out  # same seed, same text


@pytest.mark.model
def test_real_adaptive_temperature(provider):
    logits = provider.next_logits(provider.encode(PROMPT, add_special_tokens=True))
    strategy = AdaptiveTemperatureStrategy()
    before = entropy(logits)
    after = entropy(strategy.on_logits(logits.copy(), []))
    # the story prompt leaves the model unsure (~2.9 nats): AdaptiveTemperature sharpens it (beta ~2.2)
    assert strategy.beta(before) > 1.5 and after < before - 1, (before, after)
    # scaling logits never changes their order, so greedy decoding is unaffected
    plain = list(BacktrackSampler(provider, BaseStrategy()).generate(PROMPT, max_new_tokens=10, temperature=0))
    adaptive = BacktrackSampler(provider, strategy)
    assert list(adaptive.generate(PROMPT, max_new_tokens=10, temperature=0)) == plain
    sampled = list(adaptive.generate(PROMPT, max_new_tokens=10, seed=1))
    assert sampled and adaptive.stats.rewinds == 0
