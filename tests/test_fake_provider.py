"""The prefix-matching cache of BaseProvider (through FakeProvider), check_device and the
FakeProvider itself."""

from __future__ import annotations

import numpy as np
import pytest

from backtrack_sampler.provider.base_provider import BaseProvider, check_device
from backtrack_sampler.provider.fake_provider import DEFAULT_VOCAB, FakeProvider


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Checked:
    """Calls provider.generate and checks logits, cache contents and the evaluation count."""

    def __init__(self, provider):
        self.p = provider

    def __call__(self, tokens):
        p = self.p
        cached, evaluated, calls = p.cached_tokens, p.evaluated, p.forward_calls
        # the logits after recent forward passes are kept: rewinding to one of those evaluates nothing
        remembered = common_prefix(cached, tokens) == len(tokens) and len(tokens) in p._recent
        assert all(len(cached) - k < p.KEEP_LOGITS for k in p._recent), "kept logits must stay few"
        logits = p.next_logits(tokens)
        expected_new = 0 if remembered else len(tokens) - min(common_prefix(cached, tokens), len(tokens) - 1)
        assert logits.dtype == np.float32 and logits.shape == (p.vocab_size,)
        assert np.array_equal(logits, p.logits_for(tokens)), "logits differ from a fresh forward pass"
        assert p.cached_tokens == list(tokens)
        assert p.evaluated - evaluated == expected_new, "evaluated more (or fewer) tokens than the cache lacked"
        assert p.forward_calls - calls == (0 if remembered else 1)
        return logits


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------
def test_extension_by_one_evaluates_one(fake):
    gen = Checked(fake)
    tokens = [2, 5, 6]
    gen(tokens)
    assert fake.evaluated == 3
    for t in [7, 8, 9, 10, 11]:
        tokens = tokens + [t]
        before = fake.evaluated
        gen(tokens)
        assert fake.evaluated - before == 1


def test_extension_by_many(fake):
    gen = Checked(fake)
    gen([2, 5])
    before = fake.evaluated
    gen([2, 5, 6, 7, 8, 9])
    assert fake.evaluated - before == 4


def test_same_sequence_twice_evaluates_nothing(fake):
    gen = Checked(fake)
    gen([2, 5, 6, 7])
    before = fake.evaluated
    gen([2, 5, 6, 7])
    assert fake.evaluated - before == 0


def test_short_rewind_evaluates_nothing_long_rewind_reevaluates_one(fake):
    tokens = list(range(3, 30))
    gen = Checked(fake)
    for n in range(1, len(tokens) + 1):
        gen(tokens[:n])
    before = fake.evaluated
    gen(tokens[: len(tokens) - fake.KEEP_LOGITS + 1])  # within the kept logits
    assert fake.evaluated == before
    gen(tokens[:5])  # further back: the last token is evaluated again
    assert fake.evaluated == before + 1


def test_rewind_to_prefix(fake):
    gen = Checked(fake)
    gen([2, 5, 6, 7, 8, 9])
    before = fake.evaluated
    gen([2, 5, 6])  # a rewind: only the last token of the prefix is re-evaluated
    assert fake.evaluated - before == 1
    before = fake.evaluated
    gen([2, 5, 6, 20, 21])
    assert fake.evaluated - before == 2


def test_diverging_sequence(fake):
    gen = Checked(fake)
    gen([2, 5, 6, 7, 8, 9])
    before = fake.evaluated
    gen([2, 5, 30, 31])
    assert fake.evaluated - before == 2
    before = fake.evaluated
    gen([40])  # nothing shared
    assert fake.evaluated - before == 1


def test_crop_cache_and_reset(fake):
    gen = Checked(fake)
    gen([2, 5, 6, 7, 8])
    fake.crop_cache(2)
    assert fake.cached_tokens == [2, 5, 6]
    before = fake.evaluated
    gen([2, 5, 6, 7, 8])
    assert fake.evaluated - before == 2
    fake.crop_cache(0)
    assert fake.cached_tokens == [2, 5, 6, 7, 8]
    fake.crop_cache(100)  # more than cached: empties it
    assert fake.cached_tokens == []
    gen([2, 5, 6])
    fake.reset()
    assert fake.cached_tokens == []
    before = fake.evaluated
    gen([2, 5, 6])
    assert fake.evaluated - before == 3
    fake.reset()
    fake.reset()  # idempotent on an empty cache
    assert fake.cached_tokens == []


def test_crop_cache_negative_raises(fake):
    fake.next_logits([2, 5])
    with pytest.raises(ValueError):
        fake.crop_cache(-1)
    assert fake.cached_tokens == [2, 5]


def test_cached_tokens_is_a_copy(fake):
    fake.next_logits([2, 5, 6])
    fake.cached_tokens.append(99)
    assert fake.cached_tokens == [2, 5, 6]


def test_generate_does_not_keep_caller_list(fake):
    tokens = [2, 5, 6]
    fake.next_logits(tokens)
    tokens.append(7)  # mutating the caller's list must not change the cache
    assert fake.cached_tokens == [2, 5, 6]
    assert np.array_equal(fake.next_logits(tokens), fake.logits_for(tokens))


def test_generate_accepts_any_sequence(fake):
    a = fake.next_logits((2, 5, 6))
    b = fake.next_logits(np.array([2, 5, 6, 7]))
    assert np.array_equal(a, fake.logits_for([2, 5, 6]))
    assert np.array_equal(b, fake.logits_for([2, 5, 6, 7]))


def test_generate_bad_input():
    p = FakeProvider(context_length=4)
    with pytest.raises(ValueError):
        p.next_logits([])
    with pytest.raises(ValueError):
        p.next_logits([2, 5, 6, 7, 8])
    p.next_logits([2, 5, 6, 7])  # exactly the context: fine


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_cache_exact(seed):
    """Random extensions, rewinds, divergences, crop_cache and reset: every logits row equals a
    fresh forward pass and only tokens missing from the cache are evaluated."""
    rng = np.random.default_rng(seed)
    provider = FakeProvider(seed=seed, context_length=64)
    gen = Checked(provider)
    tokens = [2]
    for _ in range(300):
        op = rng.choice(
            ["extend1", "extendN", "rewind", "diverge", "same", "crop", "reset"],
            p=[0.35, 0.15, 0.2, 0.1, 0.05, 0.1, 0.05],
        )
        if op == "extend1":
            tokens = tokens + [int(rng.integers(provider.vocab_size))]
        elif op == "extendN":
            tokens = tokens + rng.integers(provider.vocab_size, size=int(rng.integers(2, 6))).tolist()
        elif op == "rewind":
            tokens = tokens[: int(rng.integers(1, len(tokens) + 1))]
        elif op == "diverge":
            keep = int(rng.integers(0, len(tokens) + 1))
            tokens = tokens[:keep] + rng.integers(provider.vocab_size, size=int(rng.integers(1, 4))).tolist()
        elif op == "crop":
            provider.crop_cache(int(rng.integers(0, len(provider.cached_tokens) + 2)))
        elif op == "reset":
            provider.reset()
        tokens = tokens[: provider.context_length]
        if op not in ("crop", "reset"):
            gen(tokens)
    assert provider.forward_calls > 100


def test_logits_depend_on_whole_sequence():
    p = FakeProvider()
    a = p.logits_for([2, 5, 6])
    assert np.array_equal(a, p.logits_for([2, 5, 6]))  # deterministic
    assert not np.array_equal(a, p.logits_for([2, 6, 6]))  # an early token matters
    assert not np.array_equal(a, p.logits_for([5, 6]))
    assert not np.array_equal(a, FakeProvider(seed=1).logits_for([2, 5, 6]))
    assert np.array_equal(a, FakeProvider().logits_for([2, 5, 6]))  # across instances


def test_logits_fn_override():
    p = FakeProvider(logits_fn=lambda t: np.arange(len(DEFAULT_VOCAB), dtype=np.float64) * len(t))
    out = p.next_logits([2, 5])
    assert out.dtype == np.float32 and out[3] == 6.0


# --------------------------------------------------------------------------------------------
# FakeProvider tokenizer
# --------------------------------------------------------------------------------------------
def test_encode_decode_roundtrip(fake):
    text = "the cat sat on the mat, and it was not dark."
    tokens = fake.encode(text)
    assert tokens[0] == fake.ids["<bos>"]
    assert fake.encode(text, add_special_tokens=False) == tokens[1:]
    assert fake.decode(tokens) == text
    assert fake.decode([fake.get_eos_token_id(), fake.ids["<pad>"]]) == ""
    with pytest.raises(ValueError):
        fake.encode("caf\u00e9")


def test_provider_properties(fake):
    assert isinstance(fake, BaseProvider)
    assert fake.vocab_size == len(DEFAULT_VOCAB)
    assert fake.get_eos_token_id() == 1 and fake.eos_token_ids == frozenset({1})
    assert fake.context_length == 4096
    assert FakeProvider(context_length=10).context_length == 10
    assert FakeProvider(vocab=["<pad>", "<eos>", "<bos>", "x"]).vocab_size == 4


# --------------------------------------------------------------------------------------------
# check_device
# --------------------------------------------------------------------------------------------
class TorchLikeDevice:
    def __init__(self, type_, index=None):
        self.type, self.index = type_, index

    def __str__(self):
        return self.type if self.index is None else f"{self.type}:{self.index}"


@pytest.mark.parametrize(
    "device,expected",
    [
        (None, "cpu"),
        ("cpu", "cpu"),
        ("cuda", "cuda"),
        ("cuda:0", "cuda:0"),
        ("cuda:1", "cuda:1"),
        ("mps", "mps"),
        (TorchLikeDevice("cuda", 1), "cuda:1"),
        (TorchLikeDevice("cpu"), "cpu"),
    ],
)
def test_check_device_accepts(device, expected):
    assert check_device(device) == expected


@pytest.mark.parametrize("device", ["foo", "", "cuda:", "cuda:x", "cpu ", " cuda", "gpu", TorchLikeDevice("foo")])
def test_check_device_rejects(device):
    with pytest.raises(ValueError):
        check_device(device)


def test_text_starting_with_bos_gets_one_bos():
    fake = FakeProvider()
    assert fake.encode("<bos> the cat") == fake.encode(" the cat") == [2, fake.ids[" the"], fake.ids[" cat"]]
    assert fake.encode("<bos> the cat", add_special_tokens=False) == [2, fake.ids[" the"], fake.ids[" cat"]]


def test_two_threads_sharing_a_provider_each_get_their_own_logits():
    """The cache is shared state: concurrent calls take turns (a lock) instead of mixing sequences."""
    import threading
    import time

    class Slow(FakeProvider):
        def _forward(self, tokens):
            self._sequence_tokens.extend(tokens[:1])
            time.sleep(0.002)  # another thread would get in here without the lock
            return super()._forward(tokens[1:]) if len(tokens) > 1 else self.logits_for(self._sequence_tokens)

    provider = Slow()
    sequences = [[2, 3 + i, 4, 5, 6 + i] for i in range(4)]
    wrong = []

    def run(tokens):
        for n in range(2, len(tokens) + 1):
            for _ in range(5):
                if not np.array_equal(provider.next_logits(tokens[:n]), provider.logits_for(tokens[:n])):
                    wrong.append(tokens[:n])

    threads = [threading.Thread(target=run, args=(s,)) for s in sequences]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not wrong and all(not t.is_alive() for t in threads)
