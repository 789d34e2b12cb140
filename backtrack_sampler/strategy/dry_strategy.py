"""DryStrategy: "Don't Repeat Yourself", the n-gram repetition penalty of text-generation-webui
(#5677) and llama.cpp (``llama_sampler_dry``)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from .base_strategy import BaseStrategy
from .penalty_strategy import TokenWindow

DEFAULT_BREAKERS = ("\n", ":", '"', "*")  # llama.cpp's and SillyTavern's defaults
_FLOAT_MAX_LOG = 88.7228391  # log of float32's largest value: the exponent is clamped below it


class DryStrategy(BaseStrategy):
    """Penalizes the token that would extend a repeat of earlier text: when the last ``L`` tokens
    (``L >= allowed_length``) also occur earlier in the window and were followed there by token
    ``t``, ``t``'s logit is lowered by ``multiplier * base ** (L - allowed_length)`` (the longest
    such ``L`` for each ``t``; the exponent is clamped so it cannot overflow).

    ``last_n``: the window, the last tokens of ``context`` + the continuation (0 or -1: all).
    ``sequence_breakers``: strings that end a repeat: a match never reaches back past the last
    token whose text contains one, and such a token is never penalized. (llama.cpp also matches a
    breaker split over several tokens; here a breaker counts where one token's text holds it whole.)
    ``context``: the tokens before the continuation (the server passes the prompt).

    Stateless like ``PenaltyStrategy``: it reads the tokens as they are, so it follows rewinds.
    The matching is vectorised over the window: a step costs a few numpy operations per token of
    the longest repeat.
    """

    name = "dry"
    reads_probs = False
    edits_logits = True

    def __init__(
        self,
        provider,
        *,
        multiplier: float = 0.8,
        base: float = 1.75,
        allowed_length: int = 2,
        last_n: int = -1,
        sequence_breakers: Sequence[str] = DEFAULT_BREAKERS,
        context: Optional[List[int]] = None,
    ):
        if not isinstance(multiplier, (int, float)) or multiplier < 0:
            raise ValueError(f"multiplier must be a number >= 0 (0: off), got {multiplier!r}")
        if not isinstance(base, (int, float)) or base < 1:
            raise ValueError(f"base must be a number >= 1, got {base!r}")
        if not isinstance(allowed_length, int) or isinstance(allowed_length, bool) or allowed_length < 0:
            raise ValueError(f"allowed_length must be an int >= 0, got {allowed_length!r}")
        breakers = [sequence_breakers] if isinstance(sequence_breakers, str) else list(sequence_breakers)
        if not all(isinstance(b, str) and b for b in breakers):
            raise ValueError("sequence_breakers must be non-empty strings")
        self.provider, self.multiplier, self.base, self.allowed_length = (
            provider,
            float(multiplier),
            float(base),
            allowed_length,
        )
        self.breakers = breakers
        self.window = TokenWindow(last_n, context, provider)
        self.max_exponent = int(_FLOAT_MAX_LOG / np.log(self.base)) if self.base > 1.000001 else 0
        self._is_breaker: Dict[int, bool] = {}

    def is_breaker(self, token: int) -> bool:
        known = self._is_breaker.get(token)
        if known is None:
            text = self.provider.decode([token])
            known = self._is_breaker[token] = any(b in text for b in self.breakers)
        return known

    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        if self.multiplier == 0:
            return logits
        window = self.window(continuation_tokens)
        n, allowed = len(window), self.allowed_length
        if n <= allowed:
            return logits
        limit = n  # a repeat never reaches back past the last breaker
        for i in range(n - 1, -1, -1):
            if self.is_breaker(int(window[i])):
                limit = n - 1 - i
                break
        if limit < allowed or limit == 0:
            return logits
        # beyond allowed + max_exponent tokens the penalty no longer grows: no need to measure further
        saturated = allowed + self.max_exponent if self.max_exponent > 0 else allowed if self.base == 1 else limit
        ends, length = repeat_lengths(window, min(limit, max(saturated, 1)))
        hit = length >= allowed
        best: Dict[int, int] = {}
        for token, size in zip(window[ends[hit] + 1].tolist(), length[hit].tolist()):
            if size > best.get(token, -1):
                best[token] = size
        for token, size in best.items():
            if not self.is_breaker(token):
                exponent = size - allowed
                if self.max_exponent > 0:
                    exponent = min(exponent, self.max_exponent)
                logits[token] -= self.multiplier * self.base**exponent
        return logits


def repeat_lengths(window: np.ndarray, limit: int):
    """``(ends, lengths)``: the positions ``e < len(window) - 1`` whose token equals the last one, and
    for each the length of the longest common suffix of ``window[:e + 1]`` and ``window`` (at most
    ``limit``), i.e. how many of the last tokens also end at ``e``. The suffixes are compared in
    blocks of growing size, so a long repeat (a loop, where DRY matters) costs a few numpy steps."""
    n = len(window)
    ends = np.flatnonzero(window[:-1] == window[-1])
    length = np.ones(len(ends), dtype=np.int64)
    alive, k, block = np.arange(len(ends)), 1, 8
    while alive.size and k < limit:
        offsets = np.arange(k, min(k + block, limit))
        back = ends[alive, None] - offsets[None, :]
        same = (back >= 0) & (window[np.maximum(back, 0)] == window[n - 1 - offsets][None, :])
        run = np.where(same.all(axis=1), len(offsets), np.argmin(same, axis=1))
        length[alive] += run
        alive = alive[run == len(offsets)]
        k, block = k + len(offsets), min(block * 2, 512)
    return ends, length
