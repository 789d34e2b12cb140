"""``Generation``: one generation's state and the one copy of the sampling and rewind logic.

A generation holds its prompt, continuation tokens, strategy, rng, keep index and stats; drivers
step it (``BacktrackSampler.generate`` for one, the batch scheduler for many, the engine loop for
tokens drafted by a serving engine), each asking its backend for the logits of
``generation.sequence`` and passing them to ``generation.advance``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np

from .provider.base_provider import BaseProvider
from .sampling import filter_logits, sample
from .strategy.base_strategy import BaseStrategy


@dataclass
class RewindEvent:
    """One rewind: the continuation was cut back to ``position`` tokens, removing ``tokens``."""

    position: int
    tokens: List[int]
    text: str
    reason: Optional[str]


@dataclass
class GenerationStats:
    """What the last ``generate`` call did. ``finish_reason``: "stop" (EOS) or "length"."""

    delivered: int = 0
    rewound: int = 0
    rewinds: int = 0
    steps: int = 0
    seconds: float = 0.0
    finish_reason: Optional[str] = None
    events: List[RewindEvent] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0


class Generation:
    """One generation in progress, advanced one token at a time by a driver::

        while not generation.done:
            logits = provider.generate(generation.sequence)   # or one batched call for many
            for token in generation.advance(logits):         # the tokens that became final
                ...

    ``advance`` = ``distribution`` (strategy hooks and sampling filters) + the draw +
    ``push`` (strategy sees the token, may rewind; EOS and the token limit end the generation).
    A driver that gets its tokens elsewhere (e.g. drafted by a serving engine) calls
    ``distribution`` and ``push`` itself. ``tokens`` holds the continuation, ``released`` how many
    of its tokens are final; ``stats`` describes the work done.

    limit: the most tokens to deliver; sampling: ``(temperature, top_k, top_p, min_p)``;
    budget: rewound tokens after which rewinding is switched off (with a warning).
    """

    def __init__(self, provider: BaseProvider, strategy: BaseStrategy, prompt: List[int], limit: int,
                 sampling: tuple, seed: Optional[int] = None,
                 on_rewind: Optional[Callable[[RewindEvent], None]] = None, budget: int = 1000):
        self.provider, self.strategy, self.prompt = provider, strategy, list(prompt)
        self.limit, self.sampling, self.on_rewind, self.budget = limit, sampling, on_rewind, budget
        self.rng = np.random.default_rng(seed)
        self.tokens: List[int] = []
        self.released = 0
        self.backtracking = True
        self.stats = GenerationStats()
        self.started = time.perf_counter()
        self._dense = strategy.needs_probs  # build the vocabulary-sized probs array only for strategies that read it
        self._eos = provider.eos_token_ids
        strategy.reset()
        self._closed = False
        self.done = limit <= 0
        if self.done:
            self._finish("length")

    @property
    def sequence(self) -> List[int]:
        """Prompt + continuation: the tokens whose next-token logits ``advance`` needs."""
        return self.prompt + self.tokens

    def distribution(self, logits: np.ndarray) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """``(ids, probs, dense)``: the tokens the strategy and the filters allow after ``sequence``
        and their probabilities (weights, not always normalised); ``dense`` is the vocabulary-sized
        array the strategy's ``on_probs`` returned, or None when the strategy reads no probabilities."""
        strategy, tokens = self.strategy, self.tokens
        logits = strategy.on_logits(logits, tokens)
        self.stats.steps += 1
        ids, weights = filter_logits(logits, *self.sampling)
        if not self._dense:
            order = np.argsort(ids)  # token-id order, as the dense path has: a seed draws the same token
            return ids[order], weights[order], None
        probs = np.zeros(len(logits), dtype=np.float32)
        probs[ids] = weights
        probs = strategy.on_probs(probs, tokens)
        ids = np.flatnonzero(probs > 0)
        if len(ids) == 0:
            raise ValueError(f"{type(strategy).__name__}.on_probs left no token with probability > 0")
        return ids, probs[ids], probs

    def advance(self, logits: np.ndarray) -> List[int]:
        """Sample the next token from ``logits`` (the next-token logits after ``sequence``, yours to
        edit) and return the tokens that became final."""
        ids, probs, dense = self.distribution(logits)
        if self.sampling[0] == 0:
            token = int(ids[np.argmax(probs)])
        else:
            token = sample(ids, probs, self.rng)
        return self.push(token, dense)

    def push(self, token: int, probs: Optional[np.ndarray] = None) -> List[int]:
        """Append ``token`` (drawn from ``probs``, the ``dense`` array of ``distribution``), let the
        strategy rewind, and return the tokens that became final."""
        strategy, tokens = self.strategy, self.tokens
        tokens.append(token)
        strategy.on_next_token(tokens, probs)
        before, released = len(tokens), self.released
        if self.backtracking:
            tail = tokens[released:]
            kept = strategy.backtrack(tokens)
            if len(kept) < released:
                raise RuntimeError(
                    f"{type(strategy).__name__} rewound to {len(kept)} tokens, but {released} were "
                    "already delivered as final (its keep index)"
                )
            if len(kept) < before:
                self.tokens = tokens = list(kept)
                self._record_rewind(tail[len(tokens) - released :])
        if len(tokens) == before and token in self._eos:
            tokens.pop()
            return self._finish("stop")
        keep = min(strategy.get_keep_index(), len(tokens)) if self.backtracking else len(tokens)
        if len(tokens) >= self.limit:
            return self._finish("length")
        return self._release(keep)

    def close(self, finish_reason: Optional[str] = None) -> None:
        """Release the strategy (its state is reset): call once the driver has delivered the last
        tokens. Ends the generation early when it is not done (e.g. its client went away)."""
        if not self.done:
            self.done = True
            self.stats.finish_reason = finish_reason
            self._stop_clock()
        if not self._closed:
            self._closed = True
            self.strategy.reset()

    def _release(self, keep: int) -> List[int]:
        if keep <= self.released:  # a keep index may lag behind (or be negative)
            return []
        final = self.tokens[self.released : keep]
        self.released = self.stats.delivered = keep
        return final

    def _finish(self, reason: str) -> List[int]:
        final = self._release(len(self.tokens))
        self.done = True
        self.stats.finish_reason = reason
        self._stop_clock()
        return final

    def _stop_clock(self) -> None:
        self.stats.seconds = time.perf_counter() - self.started

    def _record_rewind(self, removed: List[int]) -> None:
        stats = self.stats
        stats.rewinds += 1
        stats.rewound += len(removed)
        event = RewindEvent(len(self.tokens), removed, self.provider.decode(removed), self.strategy.rewind_reason)
        stats.events.append(event)
        if self.on_rewind is not None:
            self.on_rewind(event)
        if stats.rewound >= self.budget:
            self.backtracking = False
            warnings.warn(
                f"{type(self.strategy).__name__} rewound {stats.rewound} tokens (max_rewound_tokens="
                f"{self.budget}); rewinding is off for the rest of this generation",
                RuntimeWarning,
                stacklevel=4,
            )
