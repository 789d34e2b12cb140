"""DebugStrategy: prints the top candidates at every step. The skeleton for a new strategy."""

from __future__ import annotations

import sys
from typing import List, Optional, TextIO

import numpy as np

from ..provider.base_provider import BaseProvider
from .base_strategy import BaseStrategy


class DebugStrategy(BaseStrategy):
    """Changes nothing; writes the ``top_n`` most likely next tokens and their probabilities.

    Copy this file to start a strategy of your own: every hook is here, doing nothing.
    ``file``: where to write (default: ``sys.stderr`` at the time of writing).
    """

    reads_probs = True

    def __init__(self, provider: BaseProvider, top_n: int = 2, file: Optional[TextIO] = None):
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n!r}")
        self.provider = provider
        self.top_n = top_n
        self.file = file
        self.reset()

    def reset(self) -> None:
        self._keep_index = 0

    def get_keep_index(self) -> int:
        return self._keep_index

    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        return logits

    def on_probs(self, probs: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        ids = np.flatnonzero(probs > 0)  # the candidates the filters kept (no full-vocabulary sort)
        top = ids[np.argpartition(probs[ids], -self.top_n)[-self.top_n :]] if len(ids) > self.top_n else ids
        top = top[np.argsort(-probs[top], kind="stable")]
        shares = probs[top] / probs[ids].sum()
        shown = ", ".join(f"{self.provider.decode([int(t)])!r} {p:.2%}" for t, p in zip(top, shares))
        print(f"\n[step {len(continuation_tokens)}] top {len(top)}: {shown}", file=self.file or sys.stderr)
        return probs

    def on_next_token(self, continuation_tokens: List[int], probs: Optional[np.ndarray]) -> None:
        self._keep_index = len(continuation_tokens)

    def backtrack(self, continuation_tokens: List[int]) -> List[int]:
        return continuation_tokens
