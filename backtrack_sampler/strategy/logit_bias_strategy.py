"""LogitBiasStrategy: OpenAI's ``logit_bias`` and bans by token id."""

from __future__ import annotations

from typing import Dict, List, Optional, Union

import numpy as np

from .base_strategy import BaseStrategy

MAX_BIAS = 100.0  # OpenAI's range is [-100, 100]; values beyond it are clamped


class LogitBiasStrategy(BaseStrategy):
    """Adds ``bias[token]`` to each listed token's logit (clamped to [-100, 100], OpenAI's range:
    -100 all but bans a token, 100 all but forces it; -inf bans it); ``banned_tokens`` are never sampled (their
    logits become -inf, like llama.cpp's ``false`` bias). Keys are token ids (ints, or strings of
    digits as JSON has them). ``provider``: when given, ids must be in its vocabulary.
    """

    name = "logit_bias"
    reads_probs = False
    edits_logits = True

    def __init__(
        self, provider=None, *, bias: Optional[Dict[str, float]] = None, banned_tokens: Optional[List[int]] = None
    ):
        vocab = getattr(provider, "vocab_size", None)
        biased: Dict[int, float] = {}
        for key, value in dict(bias or {}).items():
            token = _token_id(key, vocab)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or np.isnan(value):
                raise ValueError(f"the bias of token {key} must be a number, got {value!r}")
            biased[token] = -np.inf if value == -np.inf else float(min(max(value, -MAX_BIAS), MAX_BIAS))
        for banned in banned_tokens or ():
            biased[_token_id(banned, vocab)] = -np.inf
        self.ids = np.fromiter(biased, dtype=np.int64, count=len(biased))
        self.values = np.fromiter(biased.values(), dtype=np.float32, count=len(biased))

    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        if len(self.ids):
            logits[self.ids] += self.values
        return logits


def _token_id(key: Union[int, str], vocab: Optional[int]) -> int:
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, int) or key < 0 or (vocab is not None and key >= vocab):
        where = f"in [0, {vocab})" if vocab is not None else ">= 0"
        raise ValueError(f"token ids must be integers {where}, got {key!r}")
    return key
