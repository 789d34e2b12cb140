"""ConfidenceStrategy: when the model suddenly grows unsure of what it just wrote, rewind the
doubtful token and draw again without it."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Set

import numpy as np

from ..provider.base_provider import BaseProvider
from .base_strategy import BaseStrategy
from .sampling import log_partition


class ConfidenceStrategy(BaseStrategy):
    """Confidence-triggered revision of short low-confidence spans.

    For every token it records, under the model's own distribution (softmax of the logits it is
    given, before temperature and filters), the sampled token's surprisal (-log p) and the
    entropy of the step. A span of the last ``span`` tokens is *doubtful* when it holds a token
    with p < ``min_prob`` and its mean surprisal is at least ``drop`` nats above the mean of the
    ``window`` tokens before it (a sharp fall in confidence), or its mean entropy is at least
    ``spike`` nats above theirs (the model lost its footing); at least ``span`` tokens must come
    before the span (the first tokens are never revised). Then generation rewinds to the first
    token of the span with p < ``min_prob`` and draws again there with it excluded (exclusions
    add up: at most ``max_retries`` per position); after ``max_revisions`` rewinds in a
    generation it stops revising. ``span - 1`` tokens are held back (not final) meanwhile.

    This is a post-hoc truncation: it removes unlikely draws that the model itself finds
    surprising in context. With greedy decoding it never fires on the token chosen unless that
    token was itself unlikely (then the model had no clear answer and another draw may be worse).
    ``rewind_reason`` is e.g. ``low confidence: ' Paris' p=0.03``.
    """

    name = "confidence"
    reads_probs = False
    edits_logits = True

    def __init__(
        self,
        provider: BaseProvider,
        *,
        min_prob: float = 0.1,
        span: int = 3,
        drop: float = 1.0,
        spike: float = 1.0,
        window: int = 32,
        max_retries: int = 2,
        max_revisions: int = 16,
    ):
        for key, value in dict(span=span, window=window, max_retries=max_retries, max_revisions=max_revisions).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "span" else 0):
                raise ValueError(f"{key} must be an int >= {1 if key == 'span' else 0}, got {value!r}")
        if not (isinstance(min_prob, (int, float)) and 0 < min_prob < 1):
            raise ValueError(f"min_prob must be in (0, 1), got {min_prob!r}")
        for key, nats in dict(drop=drop, spike=spike).items():
            if not (isinstance(nats, (int, float)) and math.isfinite(nats)):
                raise ValueError(f"{key} must be a finite number (nats), got {nats!r}")
        self.provider = provider
        self.min_prob, self.span, self.drop, self.spike = float(min_prob), span, float(drop), float(spike)
        self.window, self.max_retries, self.max_revisions = window, max_retries, max_revisions
        self._doubt = -math.log(min_prob)
        self.reset()

    def reset(self) -> None:
        self._surprisal: List[float] = []  # per position of the continuation
        self._entropy: List[float] = []
        self._step: Optional[tuple] = None  # (position, logits, log-sum-exp, entropy) of the last on_logits
        self._bans: Dict[int, Set[int]] = {}
        self._revisions = 0
        self._keep = 0
        self.rewind_reason = None

    def get_keep_index(self) -> int:
        return self._keep

    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        position = len(continuation_tokens)
        total, entropy = log_partition(logits)
        if math.isfinite(total):
            self._step = (position, logits.copy(), total, entropy)
        bans = self._bans.get(position)
        if bans:
            edited = logits.copy()
            edited[list(bans)] = -np.inf
            if np.isfinite(np.max(edited)):
                return edited
        return logits

    def backtrack(self, continuation_tokens: List[int]) -> List[int]:
        tokens = continuation_tokens
        position = len(tokens) - 1
        step = self._step
        if step is None or step[0] != position or position < 0:
            self._keep = max(self._keep, min(len(tokens) - self.span + 1, len(tokens)))
            return tokens
        _, logits, lse, entropy = step
        self._step = None
        del self._surprisal[position:], self._entropy[position:]
        self._surprisal.append(max(lse - float(logits[tokens[-1]]), 0.0))
        self._entropy.append(entropy)
        target = self._doubtful(position)
        if target is not None and self._revisions < self.max_revisions:
            bans = self._bans.setdefault(target, set())
            if len(bans) < self.max_retries and tokens[target] not in self.provider.eos_token_ids:
                self._revisions += 1
                p = math.exp(-self._surprisal[target])
                self.rewind_reason = f"low confidence: {self.provider.decode([tokens[target]])!r} p={p:.2g}"
                bans.add(tokens[target])
                self._drop_after(target)
                return tokens[:target]
        self._keep = max(self._keep, min(len(tokens) - self.span + 1, len(tokens)))
        return tokens

    def _doubtful(self, last: int) -> Optional[int]:
        """The position to revise when the span ending at ``last`` is doubtful, else None."""
        first = max(last - self.span + 1, self._keep)
        surprisal, entropy = self._surprisal, self._entropy
        low = [i for i in range(first, last + 1) if surprisal[i] > self._doubt]
        if not low:
            return None
        n = last + 1 - first
        before = range(max(first - self.window, 0), first)
        if len(before) < self.span:  # too little before it to tell a fall from how the text began
            return None
        base_s = sum(surprisal[i] for i in before) / len(before)
        base_h = sum(entropy[i] for i in before) / len(before)
        mean_s = sum(surprisal[first : last + 1]) / n
        mean_h = sum(entropy[first : last + 1]) / n
        if mean_s - base_s >= self.drop or mean_h - base_h >= self.spike:
            return low[0]
        return None

    def on_rewind(self, position: int) -> None:
        del self._surprisal[position:], self._entropy[position:]
        self._drop_after(position)
        self._keep = min(self._keep, position)

    def _drop_after(self, position: int) -> None:
        for later in [p for p in self._bans if p > position]:
            del self._bans[later]
        del self._surprisal[position:], self._entropy[position:]
