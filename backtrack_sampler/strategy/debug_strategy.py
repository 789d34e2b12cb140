"""DebugStrategy: prints the top candidates at every step. The skeleton for a new strategy."""

from __future__ import annotations

import sys
from typing import List, TextIO

import numpy as np

from ..provider.base_provider import BaseProvider
from .base_strategy import BaseStrategy


class DebugStrategy(BaseStrategy):
    """Changes nothing; writes the ``top_n`` most likely next tokens and their probabilities.

    Copy this file to start a strategy of your own: every hook is here, doing nothing.
    """

    def __init__(self, provider: BaseProvider, top_n: int = 2, file: TextIO = sys.stderr):
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
        top = np.argpartition(probs, -self.top_n)[-self.top_n :]
        top = top[np.argsort(-probs[top])]
        shown = ", ".join(f"{self.provider.decode([int(t)])!r} {probs[t]:.2%}" for t in top)
        print(f"\n[step {len(continuation_tokens)}] top {self.top_n}: {shown}", file=self.file)
        return probs

    def on_next_token(self, continuation_tokens: List[int], probs: np.ndarray) -> None:
        self._keep_index = len(continuation_tokens)

    def backtrack(self, continuation_tokens: List[int]) -> List[int]:
        return continuation_tokens
