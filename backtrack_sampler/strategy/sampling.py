"""Temperature, top-k, top-p and min-p filtering without sorting the whole vocabulary.

Vocabularies have 100k+ entries (Gemma 3: 262,144), and a full sort costs more than a small
model's forward pass. Every filter here first keeps only the tokens that can matter: a token whose
logit is more than ``NEGLIGIBLE * temperature`` below the best one has a probability under
e^-30 (~1e-13) of the best token's, which is below float32 resolution once normalised, so
dropping it does not change the distribution. With top-k, the k best tokens are looked for among
those within 8 (then 16) temperatures of the best first: usually a few dozen, where the
negligible-margin set can hold most of the vocabulary. Only the small set is partitioned or sorted.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np

NEGLIGIBLE = 30.0  # logit gap, in units of temperature, below which a token's probability vanishes


def log_partition(logits: np.ndarray) -> tuple[float, float]:
    """``(logsumexp, entropy in nats)`` of softmax(logits) (``(-inf, 0.0)`` when no logit is
    finite). Tokens more than NEGLIGIBLE below the best logit have probabilities under e^-30 and
    add nothing, so only the others are summed."""
    top = float(np.max(logits))
    if not math.isfinite(top):
        return -math.inf, 0.0
    shifted = logits[logits >= top - NEGLIGIBLE].astype(np.float64) - top
    weights = np.exp(shifted)
    total = float(weights.sum())
    # H = -sum p log p with p = w / total and log p = shifted - log(total)
    return top + math.log(total), math.log(total) - float((weights * shifted).sum()) / total


@dataclass(frozen=True)
class Sampling:
    """How a token is drawn once the strategy has edited the logits (the fields users know from
    OpenAI's and llama.cpp's APIs). Checked when made: out-of-range values raise ValueError.

    temperature: 0 is greedy. top_k: keep the k most likely (None or 0: off). top_p: keep the
    smallest set holding this much probability, in (0, 1] (None: off). min_p: drop tokens less
    likely than min_p x the best one's probability, in [0, 1] (None: off).
    """

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None

    def __post_init__(self) -> None:
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.min_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def filter(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``filter_logits`` with these settings: ``(ids, probs)``, most likely first."""
        return filter_logits(logits, self.temperature, self.top_k, self.top_p, self.min_p)


def check_sampling_args(
    temperature: float, top_k: Optional[int], top_p: Optional[float], min_p: Optional[float]
) -> None:
    """Raise ValueError with a clear message for out-of-range sampling parameters."""
    if not _real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 0):
        raise ValueError(f"top_k must be an int >= 0 or None (0 or None: off), got {top_k!r}")
    if top_p is not None and not (_real(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if min_p is not None and not (_real(min_p) and 0 <= min_p <= 1):
        raise ValueError(f"min_p must be in [0, 1] or None, got {min_p!r}")


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def filter_logits(
    logits: np.ndarray,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply temperature, min-p, top-k and top-p (in that order) to one row of logits.

    Returns ``(ids, probs)``: the surviving token ids, most likely first, and their probabilities
    (float64, summing to 1). ``temperature == 0`` is greedy: the single most likely token.
    Raises ValueError when no token has a finite logit (everything was banned).
    """
    best = int(np.argmax(logits))
    top = float(logits[best])
    if not math.isfinite(top):
        raise ValueError(f"no token left to sample: the best logit is {top} (all banned, or NaN/inf logits)")
    if temperature == 0:
        return np.array([best]), np.ones(1)

    floor = top - NEGLIGIBLE * temperature
    if min_p:  # p_i >= min_p * p_max  <=>  logit_i >= top + T * ln(min_p)
        floor = max(floor, top + temperature * math.log(min_p))
    for margin in (8, 16, NEGLIGIBLE) if top_k else (NEGLIGIBLE,):  # a small set that holds the top k
        cut = max(floor, top - margin * temperature)
        ids = np.flatnonzero(logits >= cut)
        if not top_k or len(ids) >= top_k or cut == floor:
            break
    if top_k and len(ids) > top_k:
        ids = ids[np.argpartition(logits[ids], -top_k)[-top_k:]]
    weights = np.exp((logits[ids].astype(np.float64) - top) / temperature)
    total = weights.sum()
    nucleus = top_p if top_p is not None and top_p < 1 else None  # the mass top-p keeps, when it filters
    k = 64  # for top-p, sort only the k most likely, for the smallest k in 64, 256, ... holding top_p
    while nucleus is not None and k < len(ids):
        part = np.argpartition(weights, -k)[-k:]
        if weights[part].sum() >= nucleus * total:
            ids, weights = ids[part], weights[part]
            break
        k *= 4
    order = np.argsort(-weights, kind="stable")
    ids, probs = ids[order], weights[order] / total
    if nucleus is not None:
        keep = int(np.searchsorted(np.cumsum(probs), nucleus)) + 1  # smallest prefix with mass >= top_p
        ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
    return ids, probs


def sample(ids: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token id from ``probs`` (any non-negative weights) over ``ids``."""
    if len(ids) == 1:
        return int(ids[0])
    cumulative = np.cumsum(probs, dtype=np.float64)
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return int(ids[min(index, len(ids) - 1)])
