"""Unit tests of BacktrackSampler with the numpy-only FakeProvider and small inline strategies."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

from backtrack_sampler import BacktrackSampler, BaseStrategy, GenerationStats, RewindEvent
from backtrack_sampler.provider.fake_provider import FakeProvider

PROMPT = [2, 5, 6, 7]  # <bos> " cat" " dog" " sat"


# --------------------------------------------------------------------------------------------
# inline strategies
# --------------------------------------------------------------------------------------------
class Plain(BaseStrategy):
    """Changes nothing but bans EOS (so runs end by length) and counts hook calls."""

    def __init__(self, ban_eos=True):
        self.ban_eos = ban_eos
        self.resets = 0
        self.next_calls = 0

    def on_logits(self, logits, continuation_tokens):
        if self.ban_eos:
            logits[1] = -np.inf
        return logits

    def on_next_token(self, continuation_tokens, probs):
        self.next_calls += 1

    def reset(self):
        self.resets += 1


class Lag(Plain):
    """Holds back the last ``lag`` tokens (never rewinds)."""

    def __init__(self, lag, **kw):
        super().__init__(**kw)
        self.lag, self.n = lag, 0

    def on_next_token(self, continuation_tokens, probs):
        super().on_next_token(continuation_tokens, probs)
        self.n = len(continuation_tokens)

    def get_keep_index(self):
        return max(0, self.n - self.lag)

    def reset(self):
        super().reset()
        self.n = 0


class RandomRewinder(Plain):
    """With probability ``p`` rewinds 1..depth tokens, never below its keep index, which trails
    the continuation by ``depth`` and never decreases. Records what it removed."""

    def __init__(self, p=0.4, depth=3, seed=0, in_place=False, **kw):
        super().__init__(**kw)
        self.p, self.depth, self.seed, self.in_place = p, depth, seed, in_place
        self.reset()
        self.resets = 0
        self.log = []  # (position, removed, reason) of every rewind, across generate calls

    def reset(self):
        super().reset()
        self.rng = np.random.default_rng(self.seed)
        self.keep = 0

    def backtrack(self, tokens):
        room = min(self.depth, len(tokens) - self.keep)
        if room > 0 and self.rng.random() < self.p:
            cut = int(self.rng.integers(1, room + 1))
            self.rewind_reason = f"cut {cut}"
            self.log.append((len(tokens) - cut, list(tokens[-cut:]), self.rewind_reason))
            if self.in_place:
                del tokens[-cut:]
            else:
                tokens = tokens[:-cut]
        self.keep = max(self.keep, len(tokens) - self.depth)
        return tokens

    def get_keep_index(self):
        return self.keep


class AlwaysRewind(Plain):
    """Rewinds the token it just got, every step, forever."""

    def backtrack(self, tokens):
        self.rewind_reason = "always"
        return tokens[:-1]

    def get_keep_index(self):
        return 0


class CheckLogits(RandomRewinder):
    """Also asserts that every logits row is what a fresh forward pass would give."""

    def __init__(self, provider, prompt, **kw):
        self.provider, self.prompt = provider, list(prompt)
        super().__init__(**kw)

    def on_logits(self, logits, continuation_tokens):
        expected = self.provider.logits_for(self.prompt + list(continuation_tokens))
        assert np.array_equal(logits, expected)
        return super().on_logits(logits, continuation_tokens)


def forced_provider(sequence, eos_after=None, **kw):
    """A FakeProvider whose continuation is forced: ``sequence`` repeated, then EOS after
    ``eos_after`` continuation tokens (relative to the prompt length of the first call)."""
    state = {}

    def logits_fn(tokens):
        n = len(tokens) - state.setdefault("prompt", len(tokens))
        logits = np.zeros(provider.vocab_size, dtype=np.float32)
        target = 1 if eos_after is not None and n >= eos_after else sequence[n % len(sequence)]
        logits[target] = 100.0
        return logits

    provider = FakeProvider(logits_fn=logits_fn, **kw)
    provider.state = state
    return provider


def greedy_reference(provider, prompt, n):
    """argmax path computed from scratch with logits_for; stops before EOS."""
    tokens = []
    while len(tokens) < n:
        t = int(np.argmax(provider.logits_for(list(prompt) + tokens)))
        if t in provider.eos_token_ids:
            return tokens, "stop"
        tokens.append(t)
    return tokens, "length"


# --------------------------------------------------------------------------------------------
# basics: streaming, seeds, greedy
# --------------------------------------------------------------------------------------------
def test_streams_token_ids(fake):
    sampler = BacktrackSampler(fake, Plain())
    gen = sampler.generate(PROMPT, max_new_tokens=10, seed=0)
    assert iter(gen) is gen  # a lazy iterator
    first = next(gen)
    assert isinstance(first, int) and 0 <= first < fake.vocab_size
    rest = list(gen)
    assert len(rest) == 9
    assert all(isinstance(t, int) and 0 <= t < fake.vocab_size for t in rest)


def test_seed_reproducible(fake):
    sampler = BacktrackSampler(fake, Plain())
    a = list(sampler.generate(PROMPT, max_new_tokens=40, seed=123))
    b = list(sampler.generate(PROMPT, max_new_tokens=40, seed=123))
    c = list(BacktrackSampler(FakeProvider(), Plain()).generate(PROMPT, max_new_tokens=40, seed=123))
    d = list(sampler.generate(PROMPT, max_new_tokens=40, seed=124))
    assert a == b == c
    assert a != d


def test_seed_reproducible_with_rewinds(fake):
    sampler = BacktrackSampler(fake, RandomRewinder(seed=1))
    a = list(sampler.generate(PROMPT, max_new_tokens=30, seed=7))
    stats_a = sampler.stats
    b = list(sampler.generate(PROMPT, max_new_tokens=30, seed=7))
    assert a == b and stats_a.rewound == sampler.stats.rewound > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_is_argmax_path(seed):
    provider = FakeProvider(seed=seed)
    sampler = BacktrackSampler(provider, Plain(ban_eos=False))
    out = list(sampler.generate(PROMPT, max_new_tokens=30, temperature=0, seed=seed))
    expected, reason = greedy_reference(provider, PROMPT, 30)
    assert out == expected
    assert sampler.stats.finish_reason == reason
    # greedy ignores the seed and the other filters
    again = list(sampler.generate(PROMPT, max_new_tokens=30, temperature=0, seed=999, top_k=3, top_p=0.2))
    assert again == expected


def test_greedy_with_rewinds_is_still_argmax_path(fake):
    """Rewinding re-samples the same greedy tokens: the delivered output is the argmax path."""
    sampler = BacktrackSampler(fake, RandomRewinder(p=0.5, ban_eos=False))
    out = list(sampler.generate(PROMPT, max_new_tokens=25, temperature=0))
    assert sampler.stats.rewinds > 0
    assert out == greedy_reference(fake, PROMPT, 25)[0]


def test_banned_tokens_never_sampled(fake):
    banned = set(range(1, fake.vocab_size, 2))  # EOS (1) too

    class Ban(Plain):
        def on_logits(self, logits, continuation_tokens):
            logits[list(banned)] = -np.inf
            return logits

    out = list(BacktrackSampler(fake, Ban()).generate(PROMPT, max_new_tokens=200, temperature=2, top_k=None, seed=0))
    assert len(out) == 200 and not banned & set(out)


def test_on_probs_removing_everything_raises(fake):
    class Empty(Plain):
        def on_probs(self, probs, continuation_tokens):
            return np.zeros_like(probs)

    with pytest.raises(ValueError):
        list(BacktrackSampler(fake, Empty()).generate(PROMPT, max_new_tokens=5, seed=0))


def test_logits_seen_by_strategy_match_fresh_forward_pass(fake):
    strategy = CheckLogits(fake, PROMPT, p=0.3, depth=4, seed=3)
    out = list(BacktrackSampler(fake, strategy).generate(PROMPT, max_new_tokens=40, seed=3))
    assert len(out) == 40 and len(strategy.log) > 5


def test_provider_evaluates_one_token_per_step_without_rewinds():
    provider = FakeProvider()
    sampler = BacktrackSampler(provider, Plain())
    list(sampler.generate(PROMPT, max_new_tokens=20, seed=0))
    # the prompt once, then one token per later step (the last sampled token is never evaluated)
    assert provider.evaluated == len(PROMPT) + sampler.stats.steps - 1
    assert provider.forward_calls == sampler.stats.steps


# --------------------------------------------------------------------------------------------
# limits
# --------------------------------------------------------------------------------------------
def test_max_new_tokens_counts_delivered_tokens_despite_rewinds(fake):
    strategy = RandomRewinder(p=0.45, depth=3, seed=5)
    sampler = BacktrackSampler(fake, strategy)
    out = list(sampler.generate(PROMPT, max_new_tokens=30, seed=5))
    assert len(out) == 30
    assert sampler.stats.delivered == 30
    assert sampler.stats.rewound > 15 and sampler.stats.finish_reason == "length"


def test_max_new_tokens_zero(fake):
    sampler = BacktrackSampler(fake, Plain())
    assert list(sampler.generate(PROMPT, max_new_tokens=0)) == []
    assert sampler.stats.delivered == 0 and sampler.stats.steps == 0
    assert sampler.stats.finish_reason == "length"


def test_max_length_respected(fake):
    sampler = BacktrackSampler(fake, RandomRewinder(seed=2))
    assert len(list(sampler.generate(PROMPT, max_length=len(PROMPT) + 7, seed=0))) == 7
    assert len(list(sampler.generate(PROMPT, max_length=len(PROMPT) + 1, seed=0))) == 1
    # both limits: the smaller wins
    assert len(list(sampler.generate(PROMPT, max_length=len(PROMPT) + 9, max_new_tokens=4, seed=0))) == 4
    assert len(list(sampler.generate(PROMPT, max_length=len(PROMPT) + 3, max_new_tokens=8, seed=0))) == 3


def test_context_length_limits_generation():
    provider = FakeProvider(context_length=12)
    sampler = BacktrackSampler(provider, RandomRewinder(seed=4))
    assert len(list(sampler.generate(PROMPT, seed=0))) == 12 - len(PROMPT)
    assert len(list(sampler.generate(PROMPT, max_length=100, max_new_tokens=100, seed=0))) == 12 - len(PROMPT)
    assert sampler.stats.finish_reason == "length"


# --------------------------------------------------------------------------------------------
# EOS
# --------------------------------------------------------------------------------------------
def test_eos_ends_generation_and_is_not_yielded():
    provider = forced_provider([5, 6, 7], eos_after=4)
    sampler = BacktrackSampler(provider, Lag(2, ban_eos=False))
    out = list(sampler.generate(PROMPT, max_new_tokens=50, seed=0))
    assert out == [5, 6, 7, 5]  # held-back tokens are flushed, EOS is not yielded
    assert sampler.stats.finish_reason == "stop"
    assert sampler.stats.delivered == 4 and sampler.stats.steps == 5


def test_length_finish_reason_when_limit_comes_first():
    provider = forced_provider([5, 6, 7], eos_after=4)
    sampler = BacktrackSampler(provider, Plain(ban_eos=False))
    assert list(sampler.generate(PROMPT, max_new_tokens=4)) == [5, 6, 7, 5]
    assert sampler.stats.finish_reason == "length"
    assert list(sampler.generate(PROMPT, max_new_tokens=3)) == [5, 6, 7]
    assert sampler.stats.finish_reason == "length"
    assert list(sampler.generate(PROMPT, max_new_tokens=5)) == [5, 6, 7, 5]
    assert sampler.stats.finish_reason == "stop"


def test_eos_as_first_token():
    provider = forced_provider([5], eos_after=0)
    sampler = BacktrackSampler(provider, Plain(ban_eos=False))
    assert list(sampler.generate(PROMPT, max_new_tokens=5)) == []
    assert sampler.stats.finish_reason == "stop" and sampler.stats.delivered == 0


def test_rewound_eos_does_not_stop():
    """A strategy that rewinds the EOS it just got (then bans it) keeps generation going."""
    provider = forced_provider([5, 6], eos_after=3)

    class RewindEos(Plain):
        def __init__(self):
            super().__init__(ban_eos=False)
            self.seen = False

        def on_logits(self, logits, continuation_tokens):
            if self.seen:
                logits[1] = -np.inf
            return logits

        def backtrack(self, tokens):
            if tokens[-1] == 1:
                self.seen = True
                self.rewind_reason = "eos"
                return tokens[:-1]
            return tokens

    events = []
    sampler = BacktrackSampler(provider, RewindEos())
    out = list(sampler.generate(PROMPT, max_new_tokens=6, seed=0, on_rewind=events.append))
    assert len(out) == 6 and 1 not in out
    assert sampler.stats.finish_reason == "length"
    assert events == [RewindEvent(3, [1], "", "eos")]


def test_every_eos_id_stops():
    class TwoEos(FakeProvider):
        @property
        def eos_token_ids(self):
            return frozenset({1, 0})

    base = forced_provider([5, 6, 7])
    provider = TwoEos(
        logits_fn=lambda t: base.logits_for(t) if len(t) < 7 else np.eye(base.vocab_size, dtype=np.float32)[0] * 100
    )
    sampler = BacktrackSampler(provider, Plain(ban_eos=False))
    assert list(sampler.generate(PROMPT, max_new_tokens=10)) == [5, 6, 7]
    assert sampler.stats.finish_reason == "stop"


# --------------------------------------------------------------------------------------------
# keep index, rewinds, max_rewound_tokens
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lag", [0, 1, 3, 100])
def test_tokens_held_back_until_keep_index_allows(fake, lag):
    strategy = Lag(lag)
    sampler = BacktrackSampler(fake, strategy)
    n = 20
    out = []
    for i, token in enumerate(sampler.generate(PROMPT, max_new_tokens=n, seed=0)):
        if i + 1 + lag <= n:
            # yielded as soon as the keep index passed it, not earlier, not later
            assert strategy.n == i + 1 + lag
        else:
            assert strategy.n == n  # the final flush
        out.append(token)
    assert len(out) == n and sampler.stats.delivered == n


def test_default_keep_index_streams_immediately(fake):
    strategy = Plain()
    gen = BacktrackSampler(fake, strategy).generate(PROMPT, max_new_tokens=10, seed=0)
    delivered = 0
    for i, _ in enumerate(gen):
        assert strategy.next_calls == i + 1
        delivered += 1
    assert delivered == 10


def test_keep_index_beyond_tokens_is_clamped(fake):
    class Huge(Plain):
        def get_keep_index(self):
            return sys.maxsize

    assert len(list(BacktrackSampler(fake, Huge()).generate(PROMPT, max_new_tokens=7, seed=0))) == 7


def test_forever_rewinding_terminates_with_warning(fake):
    sampler = BacktrackSampler(fake, AlwaysRewind())
    with pytest.warns(RuntimeWarning, match="max_rewound_tokens"):
        out = list(sampler.generate(PROMPT, max_new_tokens=10, seed=0, max_rewound_tokens=25))
    assert len(out) == 10
    s = sampler.stats
    assert s.delivered == 10 and s.finish_reason == "length"
    assert s.rewound == s.rewinds == 25  # rewinding stops once the budget is reached
    assert s.steps == 35


def test_forever_rewinding_default_budget(fake):
    sampler = BacktrackSampler(fake, AlwaysRewind())
    with pytest.warns(RuntimeWarning):
        out = list(sampler.generate(PROMPT, max_new_tokens=3, seed=0))
    assert len(out) == 3
    assert sampler.stats.rewound == 10 * 3 + 1000


def test_forever_rewinding_with_eos(fake):
    """After the budget, EOS is honoured again."""
    provider = forced_provider([5], eos_after=0)
    sampler = BacktrackSampler(provider, AlwaysRewind(ban_eos=False))
    with pytest.warns(RuntimeWarning):
        out = list(sampler.generate(PROMPT, max_new_tokens=10, max_rewound_tokens=5))
    assert out == [] and sampler.stats.finish_reason == "stop"


def test_no_warning_within_budget(fake):
    sampler = BacktrackSampler(fake, RandomRewinder(seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(sampler.generate(PROMPT, max_new_tokens=20, seed=0))
    assert sampler.stats.rewound > 0


def test_rewinding_below_delivered_tokens_raises(fake):
    class Bad(Plain):
        def backtrack(self, tokens):
            return tokens[:2] if len(tokens) == 5 else tokens

    strategy = Bad()
    out = []
    with pytest.raises(RuntimeError, match="already delivered"):
        for t in BacktrackSampler(fake, strategy).generate(PROMPT, max_new_tokens=20, seed=0):
            out.append(t)
    assert len(out) == 4
    assert strategy.resets == 2  # before and after, even on error


@pytest.mark.parametrize("in_place", [False, True])
def test_on_rewind_events(fake, in_place):
    strategy = RandomRewinder(p=0.3, depth=4, seed=11, in_place=in_place)
    sampler = BacktrackSampler(fake, strategy)
    events = []
    out = list(sampler.generate(PROMPT, max_new_tokens=30, seed=2, on_rewind=events.append))
    assert len(out) == 30
    assert len(events) == len(strategy.log) > 5
    for event, (position, removed, reason) in zip(events, strategy.log):
        assert isinstance(event, RewindEvent)
        assert event.position == position
        assert event.tokens == removed
        assert event.text == fake.decode(removed)
        assert event.reason == reason
    s = sampler.stats
    assert s.events == events
    assert s.rewinds == len(events)
    assert s.rewound == sum(len(e.tokens) for e in events)


def test_rewind_event_reason_none_by_default(fake):
    class Once(Plain):
        def backtrack(self, tokens):
            return (
                tokens[:1]
                if len(tokens) == 3 and not hasattr(self, "done") and not setattr(self, "done", 1)
                else tokens
            )

        def get_keep_index(self):
            return 0

    events = []
    sampler = BacktrackSampler(fake, Once())
    out = list(sampler.generate(PROMPT, max_new_tokens=5, seed=0, on_rewind=events.append))
    assert len(out) == 5 and len(events) == 1
    assert events[0].position == 1 and len(events[0].tokens) == 2 and events[0].reason is None


def test_stats(fake):
    sampler = BacktrackSampler(fake, RandomRewinder(seed=9))
    assert isinstance(sampler.stats, GenerationStats) and sampler.stats.delivered == 0
    out = list(sampler.generate(PROMPT, max_new_tokens=25, seed=1))
    s = sampler.stats
    assert s.delivered == len(out) == 25
    assert s.steps == sampler.strategy.next_calls
    assert s.steps == s.delivered + s.rewound  # every step adds one token, rewinds remove
    assert s.seconds > 0 and s.tokens_per_second == pytest.approx(25 / s.seconds)
    assert s.finish_reason == "length"
    # a new call starts new stats
    with pytest.warns(RuntimeWarning):
        list(sampler.generate(PROMPT, max_new_tokens=3, seed=1, max_rewound_tokens=0))
    assert sampler.stats is not s and sampler.stats.delivered == 3
    assert GenerationStats().tokens_per_second == 0.0


def test_stats_with_eos():
    provider = forced_provider([5, 6, 7], eos_after=6)
    sampler = BacktrackSampler(provider, Plain(ban_eos=False))
    list(sampler.generate(PROMPT, max_new_tokens=50))
    s = sampler.stats
    assert (s.delivered, s.steps, s.rewound, s.rewinds, s.finish_reason) == (6, 7, 0, 0, "stop")


# --------------------------------------------------------------------------------------------
# reuse
# --------------------------------------------------------------------------------------------
def test_reusable_and_reset_called(fake):
    strategy = RandomRewinder(seed=3)
    sampler = BacktrackSampler(fake, strategy)
    a = list(sampler.generate(PROMPT, max_new_tokens=20, seed=4))
    assert strategy.resets == 2
    b = list(sampler.generate(PROMPT, max_new_tokens=20, seed=4))
    assert strategy.resets == 4
    assert a == b


@pytest.mark.parametrize("how", ["close", "del"])
def test_abandoned_generator_then_new_call(fake, how):
    strategy = RandomRewinder(seed=3)
    sampler = BacktrackSampler(fake, strategy)
    reference = list(
        BacktrackSampler(FakeProvider(), RandomRewinder(seed=3)).generate(PROMPT, max_new_tokens=20, seed=4)
    )

    gen = sampler.generate(PROMPT + [9, 10], max_new_tokens=30, seed=8)
    next(gen), next(gen)
    assert strategy.resets == 1
    if how == "close":
        gen.close()
    else:
        del gen  # CPython finalises it at once
    assert strategy.resets == 2
    assert list(sampler.generate(PROMPT, max_new_tokens=20, seed=4)) == reference
    assert sampler.stats.delivered == 20 and sampler.stats.finish_reason == "length"


def test_stats_delivered_counts_tokens_of_abandoned_generator(fake):
    """A token counts as delivered when it is handed out, even if the consumer then stops."""
    sampler = BacktrackSampler(fake, Plain())
    gen = sampler.generate(PROMPT, max_new_tokens=10, seed=0)
    received = [next(gen) for _ in range(3)]
    gen.close()
    assert sampler.stats.delivered == len(received)


# --------------------------------------------------------------------------------------------
# generate_text
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_generate_text_equals_decode(fake, seed):
    sampler = BacktrackSampler(fake, RandomRewinder(seed=seed, ban_eos=False))
    pieces = list(sampler.generate_text("the cat", max_new_tokens=40, seed=seed))
    tokens = list(sampler.generate("the cat", max_new_tokens=40, seed=seed))
    assert "".join(pieces) == fake.decode(tokens)
    assert all(pieces)


def test_generate_text_passes_kwargs(fake):
    sampler = BacktrackSampler(fake, Plain(ban_eos=False))
    text = "".join(sampler.generate_text(PROMPT, max_new_tokens=15, temperature=0))
    assert text == fake.decode(greedy_reference(fake, PROMPT, 15)[0])


def test_generate_text_holds_incomplete_characters():
    vocab = ["<pad>", "<eos>", "<bos>", "a", "b\ufffd", "c", "d"]
    seq = [3, 4, 4, 5, 6, 0, 3]
    provider = forced_provider(seq, vocab=vocab)
    sampler = BacktrackSampler(provider, Plain(ban_eos=False))
    pieces = list(sampler.generate_text([2, 3], max_new_tokens=12))
    tokens = [seq[i % len(seq)] for i in range(12)]
    assert "".join(pieces) == provider.decode(tokens)
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompt,kwargs",
    [
        ("", {}),
        ([], {}),
        ([-1, 5], {}),
        ([5, 10_000], {}),
        (PROMPT, {"max_length": len(PROMPT)}),
        (PROMPT, {"max_length": 1}),
        (PROMPT, {"max_length": 10.0}),
        (PROMPT, {"max_new_tokens": -1}),
        (PROMPT, {"max_new_tokens": 2.5}),
        (PROMPT, {"temperature": -1}),
        (PROMPT, {"temperature": float("nan")}),
        (PROMPT, {"top_k": -3}),
        (PROMPT, {"top_k": 1.5}),
        (PROMPT, {"top_p": 0}),
        (PROMPT, {"top_p": 1.5}),
        (PROMPT, {"min_p": -0.1}),
        (PROMPT, {"min_p": 2}),
    ],
)
def test_bad_input_raises_value_error(fake, prompt, kwargs):
    sampler = BacktrackSampler(fake, Plain())
    with pytest.raises(ValueError):
        list(sampler.generate(prompt, **kwargs))
    with pytest.raises(ValueError):
        list(sampler.generate_text(prompt, **kwargs))


def test_prompt_longer_than_context():
    provider = FakeProvider(context_length=5)
    sampler = BacktrackSampler(provider, Plain())
    with pytest.raises(ValueError, match="context"):
        list(sampler.generate([2, 3, 4, 5, 6]))
    with pytest.raises(ValueError, match="context"):
        list(sampler.generate([2, 3, 4, 5, 6, 7]))
    with pytest.raises(ValueError, match="context"):
        list(sampler.generate("the cat sat"))  # <bos> + 5 tokens
    assert len(list(sampler.generate([2, 3, 4, 5], seed=0))) == 1


def test_unencodable_text_prompt(fake):
    with pytest.raises(ValueError):
        list(BacktrackSampler(fake, Plain()).generate("\u00e9"))


def test_swapped_constructor_arguments(fake):
    with pytest.raises(TypeError):
        BacktrackSampler(Plain(), fake)
    with pytest.raises(TypeError):
        BacktrackSampler(fake, None)
    with pytest.raises(TypeError):
        BacktrackSampler(None, Plain())


def test_errors_leave_sampler_usable(fake):
    sampler = BacktrackSampler(fake, Plain())
    with pytest.raises(ValueError):
        list(sampler.generate(PROMPT, top_p=0))
    assert len(list(sampler.generate(PROMPT, max_new_tokens=5, seed=0))) == 5


def test_second_live_generator_from_one_sampler_raises(fake):
    sampler = BacktrackSampler(fake, BaseStrategy())
    first = sampler.generate(PROMPT, max_new_tokens=5, seed=0)
    next(first)
    second = sampler.generate(PROMPT, max_new_tokens=5, seed=0)
    with pytest.raises(RuntimeError, match="already running a generation"):
        next(second)
    first.close()  # once the first is closed, a new one runs
    assert len(list(sampler.generate(PROMPT, max_new_tokens=5, seed=0))) == 5


def test_sparse_and_dense_paths_sample_the_same_tokens(fake):
    class Dense(BaseStrategy):  # reads probs: the sampler builds the dense array for it
        def on_probs(self, probs, continuation_tokens):
            return probs

    assert not BaseStrategy().needs_probs and Dense().needs_probs
    sparse = list(BacktrackSampler(fake, BaseStrategy()).generate(PROMPT, max_new_tokens=40, seed=3, top_k=0))
    dense = list(BacktrackSampler(fake, Dense()).generate(PROMPT, max_new_tokens=40, seed=3, top_k=0))
    assert sparse == dense and len(sparse) == 40


def test_generation_can_be_stepped_by_hand(fake):
    sampler = BacktrackSampler(fake, BaseStrategy())
    expected = list(sampler.generate(PROMPT, max_new_tokens=12, seed=7))
    generation = sampler.start(PROMPT, max_new_tokens=12, seed=7)
    fake.reset()
    out = []
    while not generation.done:
        out += generation.advance(fake.next_logits(generation.sequence))
    generation.close()
    assert out == expected and generation.stats.finish_reason == "length"


def test_negative_keep_index_releases_nothing_early(fake):
    class Behind(BaseStrategy):  # a keep index that starts below zero
        def get_keep_index(self):
            return -2

    out = list(BacktrackSampler(fake, Behind()).generate(PROMPT, max_new_tokens=6, seed=1))
    assert out == list(BacktrackSampler(fake, BaseStrategy()).generate(PROMPT, max_new_tokens=6, seed=1))
