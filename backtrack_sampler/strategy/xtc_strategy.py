"""XtcStrategy: "Exclude Top Choices" (text-generation-webui #6335, llama.cpp ``llama_sampler_xtc``)."""

from __future__ import annotations

from typing import List, Optional

import numpy as np

from .base_strategy import BaseStrategy
from .sampling import NEGLIGIBLE


def softmax_support(logits: np.ndarray):
    """``(ids, probs)`` of softmax(logits) over the tokens that can matter (within NEGLIGIBLE of the best)."""
    top = float(np.max(logits))
    ids = np.flatnonzero(logits >= top - NEGLIGIBLE)
    weights = np.exp(logits[ids].astype(np.float64) - top)
    return ids, weights / weights.sum()


class XtcStrategy(BaseStrategy):
    """With chance ``probability`` at each step, removes every token whose probability is at least
    ``threshold`` except the least likely of them (nothing when fewer than two reach it, or when
    ``threshold > 0.5``), so the most predictable choices give way to other viable ones.

    The probabilities are softmax(logits) at temperature 1, before top-k/top-p/min-p (llama.cpp
    applies XTC after those filters, over what they kept: the same threshold can remove a little
    more there). ``seed``: its own random draws (None: random; the server passes the request's seed).
    """

    name = "xtc"
    reads_probs = False
    edits_logits = True

    def __init__(self, provider=None, *, probability: float = 0.5, threshold: float = 0.1, seed: Optional[int] = None):
        for key, value in (("probability", probability), ("threshold", threshold)):
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{key} must be in [0, 1], got {value!r}")
        self.probability, self.threshold, self.seed = float(probability), float(threshold), seed
        self.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        if self.probability <= 0 or self.threshold > 0.5 or self.rng.random() >= self.probability:
            return logits
        top = float(np.max(logits))  # p >= threshold needs logit >= top + ln(threshold): usually one token or none
        if self.threshold > 0 and np.count_nonzero(logits >= top + np.log(self.threshold)) < 2:
            return logits
        ids, probs = softmax_support(logits)
        above = ids[probs >= self.threshold]
        if len(above) >= 2:
            keep = above[np.argmin(logits[above])]
            logits[above[above != keep]] = -np.inf
        return logits
