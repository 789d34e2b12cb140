"""The base class of every strategy: the hooks the sampler calls for each generated token."""

from __future__ import annotations

import sys
from typing import List, Optional

import numpy as np


class BaseStrategy:
    """Decides how to alter the distribution, when to rewind, how far, and which tokens are final.

    For every new token the sampler calls, in order::

        logits = on_logits(logits, continuation_tokens)   # full vocabulary, float32, edit in place
        probs  = on_probs(probs, continuation_tokens)     # after temperature/top-k/top-p/min-p
        continuation_tokens.append(sampled_token)
        on_next_token(continuation_tokens, probs)
        continuation_tokens = backtrack(continuation_tokens)   # return a prefix to rewind
        get_keep_index()                                        # tokens before it are final

    ``continuation_tokens`` are the generated token ids (the prompt is not included). ``logits``
    and ``probs`` are 1-D numpy arrays over the whole vocabulary; ``probs`` is zero for tokens the
    filters removed. Every hook has a default that changes nothing, so a strategy overrides only
    what it needs. Set ``self.rewind_reason`` before rewinding to say why (it is reported to the
    sampler's ``on_rewind`` callback). See ``DebugStrategy`` for a complete, minimal example.
    """

    rewind_reason: Optional[str] = None

    @property
    def needs_probs(self) -> bool:
        """Whether ``on_probs`` or ``on_next_token`` read the vocabulary-sized ``probs`` array. By
        default: whether the strategy overrides either. When False the sampler skips building that
        array (it costs about as much as the sampling itself on a 262k vocabulary) and passes
        ``probs=None`` to ``on_next_token``."""
        cls = type(self)
        return cls.on_probs is not BaseStrategy.on_probs or cls.on_next_token is not BaseStrategy.on_next_token

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

    def reset(self) -> None:
        """Forget all per-generation state; called before and after every ``generate``."""
