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
from typing import Callable, List, NamedTuple, Optional, Tuple

import numpy as np

from ..provider.base_provider import BaseProvider
from ..strategy.base_strategy import BaseStrategy, ConstraintError
from ..strategy.sampling import Sampling, log_partition, sample


@dataclass
class RewindEvent:
    """One rewind: the continuation was cut back to ``position`` tokens, removing ``tokens``."""

    position: int
    tokens: List[int]
    text: str
    reason: Optional[str]


@dataclass
class GenerationStats:
    """What the last ``next_logits`` call did. ``finish_reason``: "stop" (EOS), "length", or
    "constraint" (a hard constraint could not hold: ``constraint`` says which strategy and why)."""

    delivered: int = 0
    rewound: int = 0
    rewinds: int = 0
    steps: int = 0
    seconds: float = 0.0
    finish_reason: Optional[str] = None
    events: List[RewindEvent] = field(default_factory=list)
    constraint: Optional[str] = None
    cached_tokens: int = 0  # prompt tokens a previous sequence left in the cache (not evaluated again)

    @property
    def tokens_per_second(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0


class TokenLogprob(NamedTuple):
    """A token's log-probability and the ``top`` alternatives ``[(id, logprob), ...]``, most likely
    first: log-softmax of the logits after the strategy's edits (bans, biases, penalties), at
    temperature 1, before top-k/top-p/min-p (OpenAI's logprobs are the model's, unfiltered)."""

    token: int
    logprob: float
    top: List[Tuple[int, float]]


def log_softmax_top(logits: np.ndarray, n: int) -> Tuple[np.ndarray, float, List[Tuple[int, float]]]:
    """``(logits, logsumexp, top n as (id, logprob))`` of one row."""
    total = log_partition(logits)[0]
    top: List[Tuple[int, float]] = []
    if n > 0:
        ids = np.argpartition(-logits, min(n, len(logits)) - 1)[:n]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        top = [(int(i), float(logits[i]) - total) for i in ids if np.isfinite(logits[i])]
    return logits, total, top


class Generation:
    """One generation in progress, advanced one token at a time by a driver::

        while not generation.done:
            logits = provider.next_logits(generation.sequence)   # or one batched call for many
            for token in generation.advance(logits):         # the tokens that became final
                ...

    ``advance`` = ``distribution`` (strategy hooks and sampling filters) + the draw +
    ``push`` (strategy sees the token, may rewind; EOS and the token limit end the generation).
    A driver that gets its tokens elsewhere (e.g. drafted by a serving engine) calls
    ``distribution`` and ``push`` itself. ``tokens`` holds the continuation, ``released`` how many
    of its tokens are final; ``stats`` describes the work done.

    limit: the most tokens to deliver; sampling: the ``Sampling`` filters (a 4-tuple
    ``(temperature, top_k, top_p, min_p)`` is taken too);
    budget: rewound tokens after which rewinding is switched off (with a warning), or, for a
    strategy that declares a hard constraint, after which the generation ends with finish_reason
    "constraint".

    A strategy's ``ConstraintError`` (from any hook) ends the generation the same way: its tokens
    that were not final are dropped (recorded as a rewind), ``stats.constraint`` says why.
    Every cut of the continuation, by the strategy (``backtrack``) or a driver (``rewind``), is
    recorded as a ``RewindEvent`` and told to the strategy with ``on_rewind(position)``.
    """

    def __init__(
        self,
        provider: BaseProvider,
        strategy: BaseStrategy,
        prompt: List[int],
        limit: int,
        sampling: Sampling | tuple,
        seed: Optional[int] = None,
        on_rewind: Optional[Callable[[RewindEvent], None]] = None,
        budget: int = 1000,
    ):
        self.provider, self.strategy, self.prompt = provider, strategy, list(prompt)
        self.sampling = sampling if isinstance(sampling, Sampling) else Sampling(*sampling)
        self.limit, self.on_rewind, self.budget = limit, on_rewind, budget
        self.rng = np.random.default_rng(seed)
        self.tokens: List[int] = []
        self.logprobs: Optional[int] = None  # set to record each token's log-probability and this many alternatives
        self.token_logprobs: List[TokenLogprob] = []  # one per continuation token, when ``logprobs`` is set
        self._scores: Optional[Tuple[np.ndarray, float, List[Tuple[int, float]]]] = None
        self.released = 0
        self.backtracking = True
        self.stats = GenerationStats()
        self.started = time.perf_counter()
        caps = strategy.capabilities
        self._hard = caps.hard
        self._dense = caps.reads_probs  # build the vocabulary-sized probs array only for strategies that read it
        self._eos = provider.eos_token_ids
        strategy.reset()
        strategy.on_start(limit)
        self._closed = False
        self.done = limit <= 0
        if self.done:
            self._finish("length")

    @property
    def sequence(self) -> List[int]:
        """Prompt + continuation: the tokens whose next-token logits ``advance`` needs."""
        return self.prompt + self.tokens

    def distribution(
        self, logits: np.ndarray, sampling: Optional[Sampling] = None
    ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """``(ids, probs, dense)``: the tokens the strategy and the filters allow after ``sequence``
        and their probabilities (weights, not always normalised); ``dense`` is the vocabulary-sized
        array the strategy's ``on_probs`` returned, or None when the strategy reads no probabilities.
        ``sampling``: the filters for this step when they are not ``self.sampling`` (a backend
        whose logits are already filtered, e.g. a serving engine's candidates, applies fewer)."""
        strategy, tokens = self.strategy, self.tokens
        logits = strategy.on_logits(logits, tokens)
        self.stats.steps += 1
        if self.logprobs is not None:
            self._scores = log_softmax_top(logits, self.logprobs)
        ids, weights = (sampling or self.sampling).filter(logits)
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

    def advance(self, logits: np.ndarray, sampling: Optional[Sampling] = None) -> List[int]:
        """Sample the next token from ``logits`` (the next-token logits after ``sequence``, yours to
        edit) and return the tokens that became final. ``sampling``: as for ``distribution``."""
        return self.take(lambda: self.draw(logits, sampling))

    def draw(self, logits: np.ndarray, sampling: Optional[Sampling] = None) -> Tuple[int, Optional[np.ndarray]]:
        """``(token, dense)``: the next token drawn from ``distribution(logits, sampling)``."""
        ids, probs, dense = self.distribution(logits, sampling)
        if (sampling or self.sampling).greedy:
            return int(ids[np.argmax(probs)]), dense
        return sample(ids, probs, self.rng), dense

    def push(self, token: int, probs: Optional[np.ndarray] = None) -> List[int]:
        """Append ``token`` (drawn from ``probs``, the ``dense`` array of ``distribution``), let the
        strategy rewind, and return the tokens that became final."""
        return self.take(lambda: (token, probs))

    def take(self, choose: Callable[[], Tuple[int, Optional[np.ndarray]]]) -> List[int]:
        """One step: ``choose()`` gives the next token and the ``dense`` probabilities it was drawn
        from (``draw``, or a backend's own choice, e.g. an engine's accepted draft); the strategy
        sees it and may rewind; returns the tokens that became final. The one place where a
        strategy's ``ConstraintError`` (from any hook, in ``choose`` too) ends the generation."""
        try:
            token, probs = choose()
            return self._push(token, probs)
        except ConstraintError as error:
            return self.fail(error)

    def _push(self, token: int, probs: Optional[np.ndarray]) -> List[int]:
        strategy = self.strategy
        self.tokens.append(token)
        if self.logprobs is not None:
            self.token_logprobs.append(self._logprob(token))
        before = len(self.tokens)
        strategy.on_next_token(self.tokens, probs)
        if self.backtracking:
            self._ask(strategy.backtrack)
        tokens = self.tokens
        if not self.done and len(tokens) == before and token in self._eos:
            tokens.pop()
            del self.token_logprobs[len(tokens) :]
            return self._finish("stop")
        if not self.done and len(tokens) >= self.limit and self.backtracking:
            self._ask(strategy.on_end)  # the last look before the token limit ends it
        if self.done:  # the rewind budget of a hard constraint ran out
            return []
        tokens = self.tokens
        if len(tokens) >= self.limit:
            return self._finish("length")
        keep = min(strategy.get_keep_index(), len(tokens)) if self.backtracking else len(tokens)
        return self._release(keep)

    def _ask(self, hook: Callable[[List[int]], List[int]]) -> None:
        """Let the strategy's ``backtrack`` (or ``on_end``) cut the continuation."""
        tokens, released = self.tokens, self.released
        tail = tokens[released:]  # a strategy may cut the list in place
        kept = hook(tokens)
        if len(kept) < released:
            raise RuntimeError(
                f"{type(self.strategy).__name__} rewound to {len(kept)} tokens, but {released} were "
                "already delivered as final (its keep index)"
            )
        if len(kept) < released + len(tail):
            self.tokens = tokens[:released] + tail  # as it was before the strategy cut it
            self._cut(len(kept), self.strategy.rewind_reason)

    def rewind(self, position: int, reason: Optional[str] = None) -> None:
        """Cut the continuation back to its first ``position`` tokens (a driver's rewind: it is
        recorded and told to the strategy like one of its own). ``position`` must not be before
        the final tokens (``released``): ValueError."""
        if not self.released <= position <= len(self.tokens):
            raise ValueError(f"cannot rewind to {position}: {self.released} of {len(self.tokens)} tokens are final")
        if position < len(self.tokens):
            self._cut(position, reason)

    def fail(self, error: ConstraintError) -> List[int]:
        """End the generation because a hard constraint cannot hold (``error`` says which and
        why): the tokens that are not final are dropped, finish_reason is "constraint"."""
        name = type(self.strategy).__name__
        message = str(error) if getattr(error, "named", False) else f"{name}: {error}" if str(error) else name
        self.stats.constraint = message
        if len(self.tokens) > self.released:
            self._cut(self.released, f"constraint: {message}", count=False)
        self.done = True
        self.stats.finish_reason = "constraint"
        self._stop_clock()
        return []

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

    def _logprob(self, token: int) -> TokenLogprob:
        scores, self._scores = self._scores, None
        if scores is None:  # pushed without a distribution of its own (nothing to report)
            return TokenLogprob(token, float("nan"), [])
        logits, total, top = scores
        return TokenLogprob(token, float(logits[token]) - total if token < len(logits) else float("nan"), top)

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

    def _cut(self, position: int, reason: Optional[str], count: bool = True) -> None:
        """Drop ``tokens[position:]``: record the rewind, tell the strategy, watch the budget."""
        removed = self.tokens[position:]
        self.tokens = self.tokens[:position]
        del self.token_logprobs[position:]  # a rewound token's log-probability is never reported
        stats = self.stats
        stats.rewinds += 1
        stats.rewound += len(removed)
        event = RewindEvent(position, removed, self.provider.decode(removed), reason)
        stats.events.append(event)
        self.strategy.on_rewind(position)
        if self.on_rewind is not None:
            self.on_rewind(event)
        if count and stats.rewound >= self.budget and self.backtracking:
            name = type(self.strategy).__name__
            message = f"{name} rewound {stats.rewound} tokens (max_rewound_tokens={self.budget})"
            if self._hard:
                hard = getattr(self.strategy, "hard_members", None)
                error = ConstraintError(
                    f"{hard() if hard else name}: rewound {stats.rewound} tokens "
                    f"(max_rewound_tokens={self.budget}) without satisfying its constraint"
                )
                error.named = True
                self.fail(error)
                return
            self.backtracking = False
            warnings.warn(f"{message}; rewinding is off for the rest of this generation", RuntimeWarning, stacklevel=5)
