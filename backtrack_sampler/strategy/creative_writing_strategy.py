"""CreativeWritingStrategy: skip the obvious word, unless doing so leaves the model lost."""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from ..provider.base_provider import BaseProvider
from .base_strategy import BaseStrategy
from .sampling import NEGLIGIBLE


class CreativeWritingStrategy(BaseStrategy):
    """Bans the most likely token at every position, and takes it back when that was a bad idea.

    At each position the token with the highest logit is banned (EOS excepted), so the sampler
    picks among the alternatives: a *creative pick*. The pick is judged one step later, by the
    model's distribution at the next position (softmax of the logits this strategy receives,
    before its own ban). That distribution is *flat* when at least ``top_k_threshold_flat``
    tokens are needed to reach ``top_p_flat`` of the probability mass. If it is flat, the pick
    left the model unsure how to go on: both the pick and the token after it are rewound and the
    originally most likely token is placed at that position instead (and is not banned). If it
    is not flat, the pick stays.

    A token is final (the keep index moves past it) as soon as it can no longer be rewound: a
    creative pick once the step after it has been judged, a forced or EOS-argmax token at once.
    Each rewind is followed by a forced, final token, so generation always makes progress.

    top_p_flat: the probability mass the flatness test counts tokens up to.
    top_k_threshold_flat: the distribution is flat when this many tokens or more are needed to
        reach ``top_p_flat``; higher values rewind less often.
    eos_penalty: multiplies the probability of the EOS token(s) (in ``on_probs``), because
        banning the likely word makes the model end too early. 1 is no penalty; 0 bans EOS, and
        generation then stops only at ``max_new_tokens`` / ``max_length``.
    """

    reads_probs = True

    def __init__(
        self,
        provider: BaseProvider,
        top_p_flat: float = 0.65,
        top_k_threshold_flat: int = 9,
        eos_penalty: float = 0.8,
    ):
        if not 0 < top_p_flat <= 1:
            raise ValueError(f"top_p_flat must be in (0, 1], got {top_p_flat!r}")
        if top_k_threshold_flat < 1:
            raise ValueError(f"top_k_threshold_flat must be >= 1, got {top_k_threshold_flat!r}")
        if not 0 <= eos_penalty <= 1:
            raise ValueError(f"eos_penalty must be in [0, 1], got {eos_penalty!r}")
        self.eos_ids = np.array(sorted(provider.eos_token_ids), dtype=np.intp)  # may be empty
        self.top_p_flat = top_p_flat
        self.top_k_threshold_flat = top_k_threshold_flat
        self.eos_penalty = eos_penalty
        self.reset()

    def reset(self) -> None:
        self._keep_index = 0
        self._flat = False  # is the distribution at the current position flat?
        self._banned: Optional[int] = None  # token banned at the current position
        self._pick: Optional[Tuple[int, int]] = None  # (position, likely token) of the unjudged pick
        self._rewind_to: Optional[Tuple[int, int]] = None  # the pick to undo in backtrack
        self._force: Optional[Tuple[int, int]] = None  # (position, token) to place after a rewind

    def get_keep_index(self) -> int:
        return self._keep_index

    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        position = len(continuation_tokens)
        self._flat = self._is_flat(logits)
        if self.eos_penalty == 0:
            logits[self.eos_ids] = -np.inf
        force, self._force, self._banned = self._force, None, None
        if force is not None and force[0] == position:
            logits.fill(-np.inf)  # the likely token is the only candidate
            logits[force[1]] = 0.0
            return logits
        likely = int(np.argmax(logits))
        if likely not in self.eos_ids:
            logits[likely] = -np.inf
            self._banned = likely
        return logits

    def on_probs(self, probs: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        probs[self.eos_ids] *= self.eos_penalty
        return probs

    def on_next_token(self, continuation_tokens: List[int], probs: Optional[np.ndarray]) -> None:
        position = len(continuation_tokens) - 1
        judged = self._pick if self._pick is not None and self._pick[0] == position - 1 else None
        self._rewind_to = judged if judged is not None and self._flat else None
        self._pick = (position, self._banned) if self._banned is not None else None
        if self._rewind_to is None:
            self._keep_index = position if self._pick is not None else position + 1

    def backtrack(self, continuation_tokens: List[int]) -> List[int]:
        rewind, self._rewind_to = self._rewind_to, None
        if rewind is None or rewind[0] >= len(continuation_tokens):
            return continuation_tokens
        position = rewind[0]
        self._force, self._pick, self._keep_index = rewind, None, position  # force the likely token
        self.rewind_reason = "flat distribution after a creative pick; taking the likely token"
        return continuation_tokens[:position]

    def _is_flat(self, logits: np.ndarray) -> bool:
        """Whether ``top_k_threshold_flat`` or more tokens are needed to reach ``top_p_flat`` of
        softmax(logits): true exactly when the ``top_k_threshold_flat - 1`` most likely tokens
        hold less than ``top_p_flat``. Only tokens within NEGLIGIBLE of the best logit count."""
        top = float(np.max(logits))
        if not np.isfinite(top):
            return False
        candidates = logits[logits >= top - NEGLIGIBLE]
        weights = np.exp(candidates.astype(np.float64) - top)
        k = self.top_k_threshold_flat - 1
        if k >= len(weights):
            return False  # all the candidates together reach any top_p_flat
        head = weights[np.argpartition(weights, -k)[-k:]].sum() if k else 0.0
        return head < self.top_p_flat * weights.sum()
