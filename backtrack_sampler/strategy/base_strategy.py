"""The base class of every strategy: the hooks the sampler calls for each generated token."""

from __future__ import annotations

import sys
from typing import ClassVar, List, NamedTuple, Optional

import numpy as np


class ConstraintError(Exception):
    """Raised by a strategy (from any hook) when its constraint cannot hold: e.g. every token it
    could still rewind to is exhausted. The generation then ends with ``finish_reason``
    ``"constraint"`` (the server's ``"content_filter"``) and ``stats.constraint`` naming the
    strategy and this message; the tokens that were not final yet are dropped, so the result never
    contains what the strategy could not prevent. Final tokens were already delivered and stay.
    ``stats.constraint`` is "StrategyName: message" (the chain member that raised it)."""

    named = False  # set once the message starts with the strategy's name


class Capabilities(NamedTuple):
    """What a strategy does, as the drivers need to know it (``BaseStrategy.capabilities``).

    reads_probs: ``on_probs`` / ``on_next_token`` read the vocabulary-sized probability array
        (else the sampler keeps to the sparse path: the kept candidates only, ``probs=None``).
    edits_logits: ``on_logits`` may change the logits (else a driver may skip building them).
    hard: a hard constraint: when its rewind budget (``max_rewound_tokens``) runs out, the
        generation ends with finish_reason "constraint" instead of going on unconstrained.
    """

    reads_probs: bool
    edits_logits: bool
    hard: bool


def _overrides(cls: type, *names: str) -> bool:
    return any(getattr(cls, name) is not getattr(BaseStrategy, name) for name in names)


class BaseStrategy:
    """Decides how to alter the distribution, when to rewind, how far, and which tokens are final.

    For every new token the sampler calls, in order::

        logits = on_logits(logits, continuation_tokens)   # full vocabulary, float32, edit in place
        probs  = on_probs(probs, continuation_tokens)     # after temperature/top-k/top-p/min-p
        continuation_tokens.append(sampled_token)
        on_next_token(continuation_tokens, probs)
        continuation_tokens = backtrack(continuation_tokens)   # return a prefix to rewind
        get_keep_index()                                        # tokens before it are final

    then ``on_end(continuation_tokens)`` (may rewind too) when the token limit is reached, and ``on_rewind(position)`` whenever the continuation is cut back to ``position`` tokens, by
    this strategy, another one of a chain, or the driver (the time limit, a stop string).

    ``continuation_tokens`` are the generated token ids (the prompt is not included). ``logits``
    and ``probs`` are 1-D numpy arrays over the whole vocabulary; ``probs`` is zero for tokens the
    filters removed. Every hook has a default that changes nothing, so a strategy overrides only
    what it needs. Set ``self.rewind_reason`` before rewinding to say why (it is reported to the
    sampler's ``on_rewind`` callback). Raise ``ConstraintError`` when a constraint cannot hold.
    See ``DebugStrategy`` for a complete, minimal example.

    Capabilities are declared as class attributes (read through ``capabilities``):

    - ``reads_probs``: True when ``on_probs`` or ``on_next_token`` read ``probs``. Declare it: a
      strategy that leaves it None (written before 4.1) is taken to read them when it overrides
      either hook, which costs a vocabulary-sized array per token.
    - ``edits_logits``: True when ``on_logits`` may change the logits (None: when it overrides it).
    - ``hard_constraint``: True for a constraint that must hold (see ``Capabilities.hard``);
      an instance may set it too (AntiSlop is hard only with hard bans).
    """

    rewind_reason: Optional[str] = None
    reads_probs: ClassVar[Optional[bool]] = None
    edits_logits: ClassVar[Optional[bool]] = None
    hard_constraint: bool = False

    @property
    def capabilities(self) -> Capabilities:
        """What this strategy does (its declarations; see the class docstring)."""
        cls = type(self)
        reads = cls.reads_probs if cls.reads_probs is not None else _overrides(cls, "on_probs", "on_next_token")
        edits = cls.edits_logits if cls.edits_logits is not None else _overrides(cls, "on_logits")
        return Capabilities(bool(reads), bool(edits), bool(self.hard_constraint))

    @property
    def needs_probs(self) -> bool:
        """``capabilities.reads_probs`` (the 4.0 name): when False the sampler skips building the
        vocabulary-sized array (it costs about as much as the sampling itself on a 262k
        vocabulary) and passes ``probs=None`` to ``on_next_token``."""
        return self.capabilities.reads_probs

    def get_keep_index(self) -> int:
        """Number of leading continuation tokens that are final: they are streamed to the user and
        are never rewound. The default (no rewinds) makes every token final at once."""
        return sys.maxsize

    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        """Alter the raw next-token logits (before temperature and filters)."""
        return logits

    def on_probs(self, probs: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        """Alter the filtered next-token probabilities (they need not sum to 1)."""
        return probs

    def on_next_token(self, continuation_tokens: List[int], probs: np.ndarray) -> None:
        """Observe the token just sampled (``continuation_tokens[-1]``) and the probabilities it
        was drawn from."""

    def backtrack(self, continuation_tokens: List[int]) -> List[int]:
        """Return ``continuation_tokens`` or a prefix of it: the tokens after it are rewound."""
        return continuation_tokens

    def on_end(self, continuation_tokens: List[int]) -> List[int]:
        """The generation reached its token limit with these tokens: the last chance to rewind
        (return a prefix, as ``backtrack`` does; the generation then goes on). At an end-of-text
        token there is no extra call: ``backtrack`` sees that token last."""
        return continuation_tokens

    def on_rewind(self, position: int) -> None:
        """The continuation was cut back to its first ``position`` tokens (by any strategy or the
        driver): forget state about the tokens after it. May come more than once for one cut."""

    def reset(self) -> None:
        """Forget all per-generation state; called before and after every ``generate``."""
