"""TypicalStrategy: locally typical sampling (Meister et al., 2022; ``typical_p``)."""

from __future__ import annotations

from typing import List

import numpy as np

from .base_strategy import BaseStrategy
from .xtc_strategy import softmax_support


class TypicalStrategy(BaseStrategy):
    """Keeps the tokens whose surprisal -log p is closest to the distribution's entropy, the
    fewest whose probabilities sum to more than ``p`` (``p >= 1``: off); the others are removed.
    As llama.cpp's ``llama_sampler_typical`` (and transformers' TypicalLogitsWarper), at
    temperature 1 over the whole vocabulary (tokens below e^-30 of the best are left out).
    """

    name = "typical"
    reads_probs = False
    edits_logits = True

    def __init__(self, provider=None, *, p: float = 0.95):
        if not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"p must be in (0, 1], got {p!r}")
        self.p = float(p)

    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        if self.p >= 1:
            return logits
        ids, probs = softmax_support(logits)
        surprisal = -np.log(probs)
        entropy = float((probs * surprisal).sum())
        score = np.abs(surprisal - entropy)
        k = 64  # sort only the k most typical, for the smallest k in 64, 256, ... whose mass passes p
        while k < len(score):
            part = np.argpartition(score, k)[:k]
            if probs[part].sum() > self.p:
                break
            k *= 4
        part = part if k < len(score) else np.arange(len(score))
        order = part[np.argsort(score[part], kind="stable")]
        over = np.flatnonzero(np.cumsum(probs[order]) > self.p)
        kept = ids[order[: over[0] + 1 if len(over) else len(order)]]
        values = logits[kept].copy()
        logits.fill(-np.inf)
        logits[kept] = values
        return logits
