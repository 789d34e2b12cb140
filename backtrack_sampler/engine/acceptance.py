"""Speculative acceptance: how an engine's drafted token becomes the strategy's choice, exactly.

The engine drew its draft from q (its own sampling distribution on the top-K candidates it
reports, see ``apis.Step.kind``); the strategy wants p'. ``accept`` keeps the draft with
probability min(1, p'(x)/q(x)), else draws from the residual max(0, p' - q): the result is
distributed as p' (speculative sampling). ``engine_q`` rebuilds q from a ``Step``.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from ..strategy.sampling import Sampling, sample
from .apis import Step


def local_sampling(kind: str, sampling: Sampling) -> Sampling:
    """The sampling filters still to apply locally to a Step's logits (see ``step_logits``).

    "post" values are the engine's sampling distribution already: only the temperature (undone by
    ``step_logits``) is re-applied. Other kinds get the user's filters, as the engine did."""
    temperature = sampling.temperature
    if kind in ("post", "opaque") and temperature > 0:
        return Sampling(temperature)
    return sampling


def step_logits(step: Step, temperature: float) -> np.ndarray:
    """The candidates' values on the logit scale the strategy expects (the model's logits up to a
    constant): "post" and "tempered" log-probabilities are multiplied back by the temperature."""
    if step.kind in ("post", "tempered") and temperature > 0:
        return step.logp * temperature
    return step.logp


def engine_q(step: Step, sampling: Sampling) -> Tuple[np.ndarray, np.ndarray]:
    """``(ids, probs)``: the distribution the engine drew ``step.token`` from, on the candidates."""
    logits = step_logits(step, sampling.temperature)
    idx, probs = local_sampling(step.kind, sampling).filter(logits.astype(np.float32))
    return step.ids[idx], probs


def accept(
    draft: int, q: Tuple[np.ndarray, np.ndarray], p: Tuple[np.ndarray, np.ndarray], rng: np.random.Generator
) -> int:
    """Speculative sampling: keep ``draft`` (drawn from q) with probability min(1, p(draft)/q(draft)),
    else draw from the residual max(0, p - q), normalised. The result is distributed as p.
    q, p: ``(ids, weights)``; weights need not be normalised. No random number is used when the
    ratio is 0 or >= 1 (greedy decoding stays deterministic)."""
    q_ids, q_w = q
    p_ids, p_w = p
    q_w = q_w / q_w.sum()
    p_w = p_w / p_w.sum()
    qx = float(q_w[q_ids == draft].sum())
    px = float(p_w[p_ids == draft].sum())
    if qx > 0 and (px >= qx or (px > 0 and rng.random() < px / qx)):
        return draft
    if qx == 0 and px > 0:  # the engine drew a token outside the candidates it reported as kept
        return draft if len(p_ids) == 1 else sample(p_ids, p_w, rng)
    ids = np.union1d(p_ids, q_ids)
    residual = np.zeros(len(ids))
    residual[np.searchsorted(ids, p_ids)] += p_w
    residual[np.searchsorted(ids, q_ids)] -= q_w
    keep = residual > 1e-12
    if not keep.any():  # p == q up to rounding, yet the draft was refused: draw from p
        return sample(p_ids, p_w, rng)
    return sample(ids[keep], residual[keep], rng)  # one candidate left: no random number drawn
