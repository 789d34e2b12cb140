"""PenaltyStrategy: llama.cpp's repetition, frequency and presence penalties over the last tokens."""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from .base_strategy import BaseStrategy


def check_range(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < -1:
        raise ValueError(f"{name} must be an int >= -1 (0 or -1: the whole context), got {value!r}")
    return value


class TokenWindow:
    """The last ``last_n`` tokens of ``context`` + the continuation (``last_n`` 0 or -1: all of them).
    A function of the tokens passed in, so a rewound token never counts."""

    def __init__(self, last_n: int, context: Optional[Sequence[int]], provider=None):
        self.last_n = check_range("last_n", last_n)
        cap = getattr(provider, "context_length", None)  # more could never be in the model's context
        keep = min(n for n in (last_n if last_n > 0 else None, cap) if n) if (last_n > 0 or cap) else None
        context = [int(t) for t in context or ()]
        self.context = context[-keep:] if keep else context

    def __call__(self, continuation_tokens: List[int]) -> np.ndarray:
        n = self.last_n
        if n > 0 and len(continuation_tokens) >= n:
            return np.asarray(continuation_tokens[-n:], dtype=np.int64)
        window = np.asarray(self.context + continuation_tokens, dtype=np.int64)
        return window[-n:] if n > 0 else window


class PenaltyStrategy(BaseStrategy):
    """Repetition penalties as llama.cpp applies them (``llama_sampler_penalties``): for every token
    in the window of the last ``last_n`` tokens (0 or -1: all), its logit is divided by
    ``repeat_penalty`` when positive, multiplied by it when not, and then lowered by
    ``count * frequency_penalty + presence_penalty`` (``count``: its occurrences in the window;
    OpenAI's frequency and presence penalties). ``context``: the tokens before the continuation
    that count too (the server passes the prompt; llama.cpp, KoboldCpp and TabbyAPI count it).

    llama.cpp's rule is not shift-invariant: on a serving engine's candidates, whose logits are
    log-probabilities (all <= 0), ``repeat_penalty`` always multiplies. It never rewinds and keeps no
    state of its own: the window is read from the tokens as they are
    at each step, so a rewound token no longer counts toward any penalty.
    """

    name = "penalties"
    reads_probs = False
    edits_logits = True

    def __init__(
        self,
        provider=None,
        *,
        repeat_penalty: float = 1.1,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        last_n: int = -1,
        context: Optional[List[int]] = None,
    ):
        if not isinstance(repeat_penalty, (int, float)) or not repeat_penalty > 0:
            raise ValueError(f"repeat_penalty must be a number > 0 (1: off), got {repeat_penalty!r}")
        for key, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
            if not isinstance(value, (int, float)) or not -100 <= value <= 100:
                raise ValueError(f"{key} must be a number in [-100, 100], got {value!r}")
        self.repeat_penalty, self.frequency_penalty = float(repeat_penalty), float(frequency_penalty)
        self.presence_penalty = float(presence_penalty)
        self.window = TokenWindow(last_n, context, provider)

    @property
    def active(self) -> bool:
        return self.repeat_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0

    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        window = self.window(continuation_tokens)
        if not len(window) or not self.active:
            return logits
        ids, counts = np.unique(window, return_counts=True)
        values = logits[ids]
        values = np.where(values <= 0, values * self.repeat_penalty, values / self.repeat_penalty)
        values -= counts * self.frequency_penalty + self.presence_penalty
        logits[ids] = values
        return logits
