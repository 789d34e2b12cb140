"""The exactness check every engine backend passes (tests/test_engine_vllm.py over HTTP,
tests/test_vllm_inprocess.py in process): the drafted tokens, accepted by the strategy, follow the
strategy's distribution (chi-square), not "the engine's draft unless banned"."""

from __future__ import annotations

import numpy as np

from backtrack_sampler import BacktrackSampler, BaseStrategy
from backtrack_sampler.core.batch import BatchScheduler


class Reweight(BaseStrategy):
    """Multiplies the probability of ``ids[i]`` by ``weights[i]`` (0: banned) at every position."""

    reads_probs = False

    def __init__(self, ids, weights):
        self.ids = np.asarray(ids)
        with np.errstate(divide="ignore"):
            self.shift = np.log(np.asarray(weights, dtype=np.float64)).astype(np.float32)

    def on_logits(self, logits, continuation_tokens):
        logits[self.ids] += self.shift
        return logits


class Record(BaseStrategy):
    """Changes nothing; keeps the logits it was given at the first position."""

    def on_logits(self, logits, continuation_tokens):
        if not continuation_tokens:
            self.logits = logits.copy()
        return logits


CHI2_999 = {2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}  # P(chi2 > x) = 0.001 by degrees of freedom


def check_acceptance_chi_square(engine, parallel: int = 8) -> None:
    """One token after a prompt with a flat first choice, top_k 5, drawn 400 times through vLLM
    with a strategy that reweights the candidates (one banned): the tokens follow the strategy's
    distribution p' = q * W (q: what vLLM reports it samples from), not "vLLM's draft unless banned".

    vLLM's top-k keeps every token tied with the k-th (bf16 logits tie often): here it samples
    from 6 tokens, and q is what it reports, so the acceptance is exact against what it samples."""
    prompt = engine.encode("My favourite colour is")
    probe = Record()
    list(BacktrackSampler(engine, probe).generate(prompt, max_new_tokens=1, seed=0, top_k=5))
    ids = np.flatnonzero(np.isfinite(probe.logits))
    assert 5 <= len(ids) <= 8, ids
    q = np.exp(probe.logits[ids] - probe.logits[ids].max())
    q /= q.sum()
    order = np.argsort(-q, kind="stable")
    ids, q = ids[order], q[order]
    weights = np.array([0.25, 3.0, 0.0, 2.0, 4.0] + [1.0] * (len(ids) - 5))
    scheduler = BatchScheduler(engine, parallel=parallel)
    jobs = [
        scheduler.submit(prompt, Reweight(ids, weights), max_new_tokens=1, seed=seed, top_k=5) for seed in range(400)
    ]
    for _ in scheduler.run():
        pass
    counts = np.array([sum(job.tokens == [int(t)] for job in jobs) for t in ids], dtype=float)
    assert all(job.error is None for job in jobs) and counts.sum() == 400 and counts[2] == 0, (q, counts)

    def chi_square(target):
        expected = 400 * target / target.sum()
        keep = expected > 0
        return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())

    df = int((weights > 0).sum()) - 1
    assert chi_square(q * weights) < CHI2_999[df], (q, counts)
    assert chi_square(q * (weights > 0)) > 3 * CHI2_999[df], (q, counts)  # keeping every unbanned draft
