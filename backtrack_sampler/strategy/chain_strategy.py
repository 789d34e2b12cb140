"""ChainStrategy: several strategies as one."""

from __future__ import annotations

from typing import List, Literal, Optional, Sequence

import numpy as np

from .base_strategy import BaseStrategy, Capabilities, ConstraintError


class ChainStrategy(BaseStrategy):
    """Runs ``strategies`` together, in order.

    ``on_logits`` and ``on_probs`` pass the array through each strategy in turn; every strategy
    sees every ``on_next_token``; ``backtrack`` also passes the tokens through each in turn, so
    the shortest prefix wins, and when one strategy cuts the tokens every other one is told at once
    (``on_rewind``) before the next sees them; a token is final only when every strategy says so
    (the smallest keep index). ``rewind_reason`` names the strategies that rewound and why. The
    chain reads probabilities, edits logits or is a hard constraint when any member does; a
    ``ConstraintError`` names the member that raised it.
    """

    def __init__(self, strategies: Sequence[BaseStrategy]):
        self.strategies = list(strategies)
        if not self.strategies:
            raise ValueError("ChainStrategy needs at least one strategy")
        for strategy in self.strategies:
            if not isinstance(strategy, BaseStrategy):
                raise TypeError(f"ChainStrategy takes BaseStrategy instances, got {type(strategy).__name__}")

    @property
    def capabilities(self) -> Capabilities:
        caps = [strategy.capabilities for strategy in self.strategies]
        return Capabilities(*(any(values) for values in zip(*caps)))

    @property
    def hard_constraint(self) -> bool:  # type: ignore[override]
        return any(strategy.capabilities.hard for strategy in self.strategies)

    def hard_members(self) -> str:
        """The names of the members that are hard constraints (for a message)."""
        return ", ".join(type(s).__name__ for s in self.strategies if s.capabilities.hard)

    def get_keep_index(self) -> int:
        return min(strategy.get_keep_index() for strategy in self.strategies)

    def on_start(self, limit: int) -> None:
        for strategy in self.strategies:
            strategy.on_start(limit)

    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        for strategy in self.strategies:
            with _named(strategy):
                logits = strategy.on_logits(logits, continuation_tokens)
        return logits

    def on_probs(self, probs: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        for strategy in self.strategies:
            with _named(strategy):
                probs = strategy.on_probs(probs, continuation_tokens)
        return probs

    def on_next_token(self, continuation_tokens: List[int], probs: Optional[np.ndarray]) -> None:
        for strategy in self.strategies:
            with _named(strategy):
                strategy.on_next_token(continuation_tokens, probs)

    def backtrack(self, continuation_tokens: List[int]) -> List[int]:
        return self._through("backtrack", continuation_tokens)

    def on_end(self, continuation_tokens: List[int]) -> List[int]:
        return self._through("on_end", continuation_tokens)

    def _through(self, hook: str, continuation_tokens: List[int]) -> List[int]:
        reasons = []
        for strategy in self.strategies:
            before = len(continuation_tokens)
            with _named(strategy):
                continuation_tokens = getattr(strategy, hook)(continuation_tokens)
            if len(continuation_tokens) < before:
                reasons.append(f"{type(strategy).__name__}: {strategy.rewind_reason or 'rewound'}")
                for other in self.strategies:
                    if other is not strategy:
                        other.on_rewind(len(continuation_tokens))
        if reasons:
            self.rewind_reason = "; ".join(reasons)
        return continuation_tokens

    def on_rewind(self, position: int) -> None:
        for strategy in self.strategies:
            strategy.on_rewind(position)

    def reset(self) -> None:
        self.rewind_reason = None
        for strategy in self.strategies:
            strategy.reset()


class _named:
    """Prefixes a ConstraintError raised by ``strategy`` with its class name (once)."""

    def __init__(self, strategy: BaseStrategy):
        self.strategy = strategy

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> Literal[False]:
        if isinstance(error, ConstraintError) and not getattr(error, "named", False):
            error.args = (f"{type(self.strategy).__name__}: {error}",)
            error.named = True
        return False
