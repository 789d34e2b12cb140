"""ChainStrategy: several strategies as one."""

from __future__ import annotations

from typing import List, Sequence

import numpy as np

from .base_strategy import BaseStrategy


class ChainStrategy(BaseStrategy):
    """Runs ``strategies`` together, in order.

    ``on_logits`` and ``on_probs`` pass the array through each strategy in turn; every strategy
    sees every ``on_next_token``; ``backtrack`` also passes the tokens through each in turn, so
    the shortest prefix wins; a token is final only when every strategy says so (the smallest
    keep index). ``rewind_reason`` names the strategies that rewound and why.
    """

    def __init__(self, strategies: Sequence[BaseStrategy]):
        self.strategies = list(strategies)
        if not self.strategies:
            raise ValueError("ChainStrategy needs at least one strategy")
        for strategy in self.strategies:
            if not isinstance(strategy, BaseStrategy):
                raise TypeError(f"ChainStrategy takes BaseStrategy instances, got {type(strategy).__name__}")

    @property
    def needs_probs(self) -> bool:
        return any(strategy.needs_probs for strategy in self.strategies)

    def get_keep_index(self) -> int:
        return min(strategy.get_keep_index() for strategy in self.strategies)

    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        for strategy in self.strategies:
            logits = strategy.on_logits(logits, continuation_tokens)
        return logits

    def on_probs(self, probs: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        for strategy in self.strategies:
            probs = strategy.on_probs(probs, continuation_tokens)
        return probs

    def on_next_token(self, continuation_tokens: List[int], probs: np.ndarray) -> None:
        for strategy in self.strategies:
            strategy.on_next_token(continuation_tokens, probs)

    def backtrack(self, continuation_tokens: List[int]) -> List[int]:
        reasons = []
        for strategy in self.strategies:
            before = len(continuation_tokens)
            continuation_tokens = strategy.backtrack(continuation_tokens)
            if len(continuation_tokens) < before:
                reasons.append(f"{type(strategy).__name__}: {strategy.rewind_reason or 'rewound'}")
        if reasons:
            self.rewind_reason = "; ".join(reasons)
        return continuation_tokens

    def reset(self) -> None:
        self.rewind_reason = None
        for strategy in self.strategies:
            strategy.reset()
