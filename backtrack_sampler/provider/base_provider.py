"""The base class of every model backend: tokenizer plus next-token logits with a rewindable cache."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Dict, FrozenSet, List, Optional, Sequence

import numpy as np

_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|hip|npu|meta|vulkan|metal)(:\d+)?")


def check_device(device) -> str:
    """Return the device as a string ("cpu", "cuda:0", ...) or raise ValueError for an unknown one."""
    name = "cpu" if device is None else str(device)
    if not _DEVICE.fullmatch(name):
        raise ValueError(f"unknown device {device!r}: expected 'cpu', 'cuda', 'cuda:N', 'mps', ...")
    return name


def without_double_bos(tokens: List[int], bos: Optional[int]) -> List[int]:
    """``tokens`` less their first token when it is a BOS followed by another BOS: the tokenizer
    added one to a text that already started with the BOS token's text (e.g. a rendered chat
    template "<bos><start_of_turn>...")."""
    return tokens[1:] if bos is not None and len(tokens) >= 2 and tokens[0] == tokens[1] == bos else tokens


class BaseProvider(ABC):
    """Wraps a model backend. Subclasses implement the tokenizer, ``_forward`` and ``_truncate``.

    The provider remembers which tokens its KV cache holds. ``generate(tokens)`` keeps the longest
    cached prefix of ``tokens``, drops the rest of the cache, and evaluates only the new tokens, so
    a rewind is simply a call with a shorter sequence; the logits of the last ``KEEP_LOGITS``
    positions are kept, so a short rewind evaluates nothing. After any number of rewinds the
    logits are those of a fresh forward pass over the same tokens.
    """

    KEEP_LOGITS = 8  # logits kept for the last positions, so that short rewinds cost no evaluation

    def __init__(self) -> None:
        self._cached: List[int] = []
        self._recent: Dict[int, np.ndarray] = {}  # sequence length -> the logits after it

    # --- tokenizer -------------------------------------------------------------------------
    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """Token ids of ``text`` (with the BOS token when ``add_special_tokens``, unless ``text``
        already starts with the BOS token's text: one BOS, never two)."""

    @abstractmethod
    def decode(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens``; special tokens (BOS, EOS, ...) render as nothing."""

    @abstractmethod
    def get_eos_token_id(self) -> int:
        """The end-of-sequence token id."""

    @property
    def eos_token_ids(self) -> FrozenSet[int]:
        """Every token id that ends generation (EOS, end-of-turn, ...)."""
        return frozenset([self.get_eos_token_id()])

    # --- model -----------------------------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Length of the logits vector."""

    @property
    @abstractmethod
    def context_length(self) -> int:
        """The most tokens (prompt + continuation) the model can attend to."""

    @abstractmethod
    def _forward(self, tokens: List[int]) -> np.ndarray:
        """Append ``tokens`` to the cache and return the last position's logits (float32, 1-D)."""

    @abstractmethod
    def _truncate(self, length: int) -> int:
        """Drop every cached position from ``length`` on; return how many positions remain
        (fewer than ``length`` when the backend cannot keep them, e.g. a pruned sliding window)."""

    def generate(self, input_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits after ``input_ids`` as a float32 array of ``vocab_size`` (yours to edit)."""
        tokens = list(input_ids)
        if not tokens:
            raise ValueError("generate() needs at least one token")
        if len(tokens) > self.context_length:
            raise ValueError(f"{len(tokens)} tokens do not fit in the context of {self.context_length}")
        cached = self._cached
        n = len(cached)
        if not (n < len(tokens) and tokens[:n] == cached):  # not a plain extension: find the shared prefix
            n = next((i for i, (a, b) in enumerate(zip(cached, tokens)) if a != b), min(len(cached), len(tokens)))
            if n == len(tokens) and n in self._recent:  # a short rewind: these logits are known
                self._cut(n)
                return self._recent[n].copy()
            self._cut(min(n, len(tokens) - 1))  # the last token must be evaluated to get its logits
            n = len(cached)
        logits = self._forward(tokens[n:])
        cached.extend(tokens[n:])
        self._recent[len(cached)] = logits.copy()
        for old in [k for k in self._recent if k <= len(cached) - self.KEEP_LOGITS]:
            del self._recent[old]
        return logits

    def crop_cache(self, n: int) -> None:
        """Drop the last ``n`` positions of the cache (the next ``generate`` re-evaluates them)."""
        if n < 0:
            raise ValueError(f"crop_cache takes the number of positions to drop (>= 0), got {n}")
        self._cut(max(len(self._cached) - n, 0))

    def _cut(self, length: int) -> None:
        length = self._truncate(length)
        del self._cached[length:]
        for known in [k for k in self._recent if k > length]:
            del self._recent[known]

    @property
    def cached_tokens(self) -> List[int]:
        """A copy of the token ids whose keys and values are in the cache."""
        return list(self._cached)

    def reset(self) -> None:
        """Empty the cache."""
        self.crop_cache(len(self._cached))
