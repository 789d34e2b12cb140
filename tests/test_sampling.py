"""Unit tests of backtrack_sampler.strategy.sampling against a plain reference (full softmax + full sort)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from backtrack_sampler.strategy.sampling import NEGLIGIBLE, check_sampling_args, filter_logits, sample

TEMPERATURES = [0, 0.3, 1, 2]
TOP_KS = [None, 0, 1, 5, 50]
TOP_PS = [None, 0.1, 0.5, 0.9, 1.0]
MIN_PS = [None, 0.0, 0.05, 0.5]


# --------------------------------------------------------------------------------------------
# reference implementation
# --------------------------------------------------------------------------------------------
def reference(logits, temperature, top_k=None, top_p=None, min_p=None):
    """Temperature -> min-p -> top-k -> top-p by the book: full softmax over the whole vocabulary
    and a full stable sort. Returns (ids most likely first, probs)."""
    logits = np.asarray(logits, dtype=np.float64)
    finite = np.isfinite(logits)
    if not finite.any():
        raise ValueError("all -inf")
    top = logits[finite].max()
    if temperature == 0:
        return np.array([int(np.argmax(logits))]), np.ones(1)
    z = np.where(finite, (logits - top) / temperature, -np.inf)
    p = np.exp(z)
    p /= p.sum()
    order = np.argsort(-logits, kind="stable")
    order = order[p[order] > 0]
    if min_p:
        order = order[p[order] >= min_p * p[order[0]]]
    if top_k:
        order = order[:top_k]
    q = p[order] / p[order].sum()
    if top_p is not None and top_p < 1:
        keep = int(np.searchsorted(np.cumsum(q), top_p)) + 1
        order, q = order[:keep], q[:keep] / q[:keep].sum()
    return order, q


def assert_matches_reference(logits, temperature, top_k, top_p, min_p, atol=1e-6):
    ids, probs = filter_logits(logits, temperature, top_k, top_p, min_p)
    ref_ids, ref_probs = reference(logits, temperature, top_k, top_p, min_p)

    assert ids.ndim == 1 and probs.ndim == 1 and len(ids) == len(probs) >= 1
    assert probs.dtype == np.float64
    assert len(set(ids.tolist())) == len(ids), "duplicate ids"
    assert math.isclose(probs.sum(), 1.0, abs_tol=1e-9)
    assert np.all(probs > 0)
    assert np.all(np.isfinite(logits[ids])), "a -inf logit became a candidate"
    # most likely first
    assert np.all(np.diff(logits[ids].astype(np.float64)) <= 0), "not sorted most-likely-first"
    assert np.all(np.diff(probs) <= 1e-15)

    got = dict(zip(ids.tolist(), probs.tolist()))
    want = dict(zip(ref_ids.tolist(), ref_probs.tolist()))
    # Only exact ties at the cut-off (arbitrary choice among equal logits) and tokens the fast
    # path drops as negligible (< e^-NEGLIGIBLE of the best) may differ.
    boundary = float(logits[ref_ids[-1]])
    for t in set(got) - set(want):
        assert float(logits[t]) == boundary, f"token {t} survived but the reference dropped it"
    for t in set(want) - set(got):
        assert float(logits[t]) == boundary or want[t] < 1e-12, f"token {t} (reference p={want[t]:.3g}) was dropped"
    for t in set(got) | set(want):
        assert abs(got.get(t, 0.0) - want.get(t, 0.0)) <= atol, (t, got.get(t), want.get(t))


def random_logits(rng, n, scale=3.0, n_inf=0):
    logits = (rng.standard_normal(n) * scale).astype(np.float32)
    if n_inf:
        logits[rng.choice(n, n_inf, replace=False)] = -np.inf
    return logits


def _grid():
    for t in TEMPERATURES:
        for k in TOP_KS:
            for p in TOP_PS:
                for m in MIN_PS:
                    yield pytest.param(t, k, p, m, id=f"T{t}-k{k}-p{p}-m{m}")


# --------------------------------------------------------------------------------------------
# filter_logits vs reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,top_k,top_p,min_p", list(_grid()))
def test_filter_logits_matches_reference(temperature, top_k, top_p, min_p):
    rng = np.random.default_rng(zlib.crc32(repr((temperature, top_k, top_p, min_p)).encode()))
    for n, scale, n_inf in [(1000, 3.0, 0), (1000, 1.0, 100), (40, 2.0, 5), (3, 1.0, 1)]:
        for _ in range(2):
            assert_matches_reference(random_logits(rng, n, scale, n_inf), temperature, top_k, top_p, min_p)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", list(_grid()))
def test_filter_logits_small_vocab_matches_reference(temperature, top_k, top_p, min_p):
    """<= 64 candidates: the exact path, never the top-p superset."""
    rng = np.random.default_rng(1 + zlib.crc32(repr((temperature, top_k, top_p, min_p)).encode()))
    for _ in range(3):
        assert_matches_reference(random_logits(rng, 60, 2.5, 4), temperature, top_k, top_p, min_p)


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [
        (1, None, None, None),
        (0.3, None, None, None),
        (2, None, None, 0.05),
        (1, 50, None, None),
        (1, 50, 0.9, 0.05),
        (0.3, 5, 0.5, None),
        (0, 50, 0.9, 0.05),
        (1, None, None, 0.5),
        (2, None, 1.0, None),
    ],
)
def test_filter_logits_gemma_sized_vocab(temperature, top_k, top_p, min_p):
    rng = np.random.default_rng(262144)
    logits = random_logits(rng, 262144, 3.0, 1000)
    assert_matches_reference(logits, temperature, top_k, top_p, min_p)


@pytest.mark.parametrize("temperature,top_p", [(1, 0.5), (1, 0.9), (2, 0.5)])
def test_top_p_gemma_sized_vocab(temperature, top_p):
    """Top-p on a 262,144-entry vocabulary takes the partial-sort path and still matches."""
    rng = np.random.default_rng(262144)
    logits = random_logits(rng, 262144, 3.0, 1000)
    assert_matches_reference(logits, temperature, None, top_p, None)


def test_top_p_superset_keeps_too_few_tokens():
    """With more than 64 candidates the top-p cut must use the total mass, not the mass of the
    partially sorted subset: 64 heavy tokens (logit 5) hold 91% of the mass, so top_p=0.9 keeps
    all 64 (renormalising over the subset would keep 58)."""
    logits = np.zeros(1000, dtype=np.float32)
    logits[:64] = 5.0
    ids, probs = filter_logits(logits, 1.0, None, 0.9, None)
    ref_ids, ref_probs = reference(logits, 1.0, None, 0.9, None)
    assert len(ref_ids) == 64
    assert len(ids) == len(ref_ids), f"kept {len(ids)} tokens, the top-p definition keeps {len(ref_ids)}"


# --------------------------------------------------------------------------------------------
# filter_logits: specific properties
# --------------------------------------------------------------------------------------------
def test_greedy_returns_argmax_only():
    logits = np.array([0.1, 3.0, -np.inf, 2.9], dtype=np.float32)
    ids, probs = filter_logits(logits, 0, 5, 0.5, 0.1)
    assert ids.tolist() == [1] and probs.tolist() == [1.0]


def test_top_k_1_is_argmax():
    rng = np.random.default_rng(3)
    for _ in range(20):
        logits = random_logits(rng, 500, 3.0, 50)
        ids, probs = filter_logits(logits, 1.0, 1, None, None)
        assert ids.tolist() == [int(np.argmax(logits))] and probs.tolist() == [1.0]


def test_off_values_change_nothing():
    rng = np.random.default_rng(4)
    logits = random_logits(rng, 200, 2.0, 10)
    base_ids, base_probs = filter_logits(logits, 1.0)
    for k, p, m in [(0, None, None), (None, 1.0, None), (None, None, 0.0), (0, 1.0, 0.0)]:
        ids, probs = filter_logits(logits, 1.0, k, p, m)
        assert ids.tolist() == base_ids.tolist()
        np.testing.assert_allclose(probs, base_probs, rtol=0, atol=1e-15)


@pytest.mark.parametrize("temperature", [0, 0.3, 1, 2])
def test_minus_inf_never_candidate(temperature):
    logits = np.full(100, -np.inf, dtype=np.float32)
    logits[[7, 42, 99]] = [-50.0, -50.0, -51.0]  # very negative but finite
    ids, probs = filter_logits(logits, temperature, None, None, None)
    assert set(ids.tolist()) <= {7, 42, 99}
    assert np.all(np.isfinite(logits[ids]))
    assert math.isclose(probs.sum(), 1.0)


def test_single_finite_logit():
    logits = np.full(1000, -np.inf, dtype=np.float32)
    logits[123] = -1e30
    for t in TEMPERATURES:
        ids, probs = filter_logits(logits, t, 50, 0.9, 0.05)
        assert ids.tolist() == [123] and probs.tolist() == [1.0]


@pytest.mark.parametrize("temperature", [0, 0.3, 1, 2])
def test_all_minus_inf_raises(temperature):
    with pytest.raises(ValueError):
        filter_logits(np.full(10, -np.inf, dtype=np.float32), temperature, 50, 0.9, 0.05)


def test_negligible_tokens_are_really_negligible():
    """The fast path drops tokens more than NEGLIGIBLE*T below the best; what it drops must carry
    less than 1e-12 of the mass in total (even for a 262,144 vocabulary)."""
    logits = np.zeros(262144, dtype=np.float32)
    logits[0] = NEGLIGIBLE + 0.01
    ids, probs = filter_logits(logits, 1.0)
    _, ref_probs = reference(logits, 1.0)
    assert ids.tolist() == [0]
    assert 1 - ref_probs[0] < 1e-7  # 262143 * e^-30 ~ 2.5e-8: below 1e-6 as promised


def test_ties_keep_order_and_equal_probability():
    logits = np.array([1.0, 2.0, 2.0, 2.0, 0.5], dtype=np.float32)
    ids, probs = filter_logits(logits, 1.0, 2, None, None)
    assert len(ids) == 2 and set(ids.tolist()) <= {1, 2, 3}
    assert probs[0] == probs[1] == 0.5


def test_min_p_one_keeps_only_the_best():
    logits = np.array([1.0, 2.0, 1.999, 0.0], dtype=np.float32)
    ids, _ = filter_logits(logits, 1.0, None, None, 1.0)
    assert ids.tolist() == [1]


def test_top_p_small_keeps_exactly_the_top_token():
    logits = np.array([0.0, 1.0, 0.5], dtype=np.float32)
    ids, probs = filter_logits(logits, 1.0, None, 0.1, None)
    assert ids.tolist() == [1] and probs.tolist() == [1.0]


def test_input_is_not_modified():
    rng = np.random.default_rng(5)
    logits = random_logits(rng, 300, 3.0, 20)
    copy = logits.copy()
    filter_logits(logits, 0.7, 10, 0.8, 0.05)
    assert np.array_equal(logits, copy)


# --------------------------------------------------------------------------------------------
# check_sampling_args
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        (1.0, 50, None, None),
        (0, None, None, None),
        (0.0, 0, 1.0, 0.0),
        (2, 1, 0.5, 1.0),
        (1e-3, 262144, 1e-9, 0.5),
    ],
)
def test_check_sampling_args_accepts(args):
    check_sampling_args(*args)


@pytest.mark.parametrize(
    "args",
    [
        (-0.1, None, None, None),
        (-1, None, None, None),
        (float("nan"), None, None, None),
        ("1.0", None, None, None),
        (None, None, None, None),
        (1.0, None, 0, None),
        (1.0, None, 0.0, None),
        (1.0, None, -0.5, None),
        (1.0, None, 1.0001, None),
        (1.0, None, float("nan"), None),
        (1.0, None, "0.5", None),
        (1.0, None, None, -0.01),
        (1.0, None, None, 1.01),
        (1.0, None, None, float("nan")),
        (1.0, -1, None, None),
        (1.0, 5.0, None, None),
        (1.0, 2.5, None, None),
        (1.0, True, None, None),
        (1.0, False, None, None),
        (1.0, "5", None, None),
    ],
)
def test_check_sampling_args_rejects(args):
    with pytest.raises(ValueError):
        check_sampling_args(*args)


def test_infinite_temperature_rejected():
    """temperature=inf would divide -inf by inf (NaN probabilities, banned tokens as candidates):
    it is rejected by the argument check and so by the sampler, before any model call."""
    with pytest.raises(ValueError, match="temperature"):
        check_sampling_args(float("inf"), None, None, None)
    from backtrack_sampler import BacktrackSampler, BaseStrategy
    from backtrack_sampler.provider.fake_provider import FakeProvider

    fake = FakeProvider()
    with pytest.raises(ValueError, match="temperature"):
        BacktrackSampler(fake, BaseStrategy()).generate([2], max_new_tokens=3, temperature=float("inf"))
    assert fake.forward_calls == 0


# --------------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------------
def chi_square(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_sample_frequencies_match_probabilities(seed):
    rng = np.random.default_rng(seed)
    ids = np.array([17, 3, 99, 5, 42, 8])
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    draws = 20000
    samples = [sample(ids, probs, rng) for _ in range(draws)]
    assert set(samples) <= set(ids.tolist())
    counts = np.array([samples.count(int(i)) for i in ids], dtype=float)
    # 5 degrees of freedom: P(chi2 > 25) ~ 1.4e-4
    assert chi_square(counts, probs) < 25, counts / draws


def test_sample_unnormalised_weights_and_zeros():
    rng = np.random.default_rng(7)
    ids = np.array([0, 1, 2, 3])
    weights = np.array([0.0, 3.0, 0.0, 1.0])  # need not sum to 1
    samples = np.array([sample(ids, weights, rng) for _ in range(20000)])
    assert set(np.unique(samples).tolist()) == {1, 3}, "a zero-weight token was drawn"
    freq = (samples == 1).mean()
    assert abs(freq - 0.75) < 0.015


def test_sample_single_and_reproducible():
    assert sample(np.array([5]), np.array([1.0]), np.random.default_rng(0)) == 5
    ids, probs = np.arange(10), np.full(10, 0.1)
    a = [sample(ids, probs, np.random.default_rng(11)) for _ in range(5)]
    b = [sample(ids, probs, np.random.default_rng(11)) for _ in range(5)]
    assert a == b
    r1, r2 = np.random.default_rng(1), np.random.default_rng(1)
    assert [sample(ids, probs, r1) for _ in range(50)] == [sample(ids, probs, r2) for _ in range(50)]
    assert isinstance(sample(ids, probs, r1), int)


def test_filter_then_sample_end_to_end():
    rng = np.random.default_rng(8)
    logits = random_logits(rng, 50, 1.0)
    ids, probs = filter_logits(logits, 1.0, 5, None, None)
    draws = np.array([sample(ids, probs, rng) for _ in range(20000)])
    counts = np.array([(draws == i).sum() for i in ids], dtype=float)
    assert counts.sum() == 20000  # only surviving ids are drawn
    assert chi_square(counts, probs) < 25
