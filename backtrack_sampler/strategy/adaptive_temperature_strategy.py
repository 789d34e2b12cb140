"""AdaptiveTemperatureStrategy: the less sure the model is, the colder the sampling."""

from __future__ import annotations

from typing import List, Sequence

import numpy as np

from .base_strategy import BaseStrategy
from .sampling import log_partition


class AdaptiveTemperatureStrategy(BaseStrategy):
    """Sharpens uncertain distributions, from "Softmax is not enough" (Velickovic et al., 2024).

    At each step it measures the entropy H (in nats) of softmax(logits) and multiplies the
    logits by ``beta = max(1, polynomial(H))`` (``beta = 1`` when H <= 0.5), i.e. divides the
    temperature by beta. Confident steps are left alone; spread-out ones are made more
    decisive. It never rewinds, so every token is final at once.

    poly_coeffs: the polynomial in H, highest power first (as ``numpy.polyval``); the default is
        the fit published with the paper.
    """

    reads_probs = False

    def __init__(self, poly_coeffs: Sequence[float] = (-0.037, 0.481, -2.3, 4.917, -1.791)):
        self.poly_coeffs = tuple(float(c) for c in poly_coeffs)
        if not self.poly_coeffs:
            raise ValueError("poly_coeffs must have at least one coefficient")

    def beta(self, entropy: float) -> float:
        """The factor the logits are multiplied by at this entropy (always >= 1)."""
        if entropy <= 0.5:
            return 1.0
        return max(float(np.polyval(self.poly_coeffs, entropy)), 1.0)

    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        beta = self.beta(entropy(logits))
        if beta != 1.0:
            logits *= np.float32(beta)
        return logits


def entropy(logits: np.ndarray) -> float:
    """Shannon entropy (nats) of softmax(logits) (see ``sampling.log_partition``)."""
    return log_partition(logits)[1]
