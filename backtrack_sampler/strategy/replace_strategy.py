"""ReplaceStrategy: find-and-replace while generating. When a ``find`` string shows up, rewind to
where it starts and force the tokens of ``replace``; the model then continues from the new text."""

from __future__ import annotations

import sys
from typing import Dict, Iterable, List, Optional, Union

import numpy as np

from ..provider.base_provider import BaseProvider
from ._phrase_matcher import Match
from .antislop_strategy import AntiSlopStrategy


class ReplaceStrategy(AntiSlopStrategy):
    """Replaces every ``find`` string (matched on the decoded text, case-sensitive by default)
    with ``replace``. Text that shares a token with the match is kept: with find="cat" and
    replace="dog", the token " cats" becomes " dogs".

    max_replacements: how many replacements at most.
    max_new_tokens_for_replace: only matches starting in the first N generated tokens are replaced.
    skip_tokens: matches starting in the first N generated tokens are left alone.
    max_prob: a match is replaced only if the token that started it had a probability <= max_prob
        when it was sampled (1.0: always), so that text the model is sure of stays.
    Other keyword arguments (case_sensitive, whole_words, ...) are those of AntiSlopStrategy.
    """

    reads_probs = True

    def __init__(
        self,
        provider: BaseProvider,
        find: Union[str, Iterable[str]],
        replace: str,
        max_replacements: int = sys.maxsize,
        max_new_tokens_for_replace: int = sys.maxsize,
        skip_tokens: int = 0,
        max_prob: float = 1.0,
        **kwargs,
    ):
        if not isinstance(replace, str):
            raise ValueError(f"replace must be a string, got {replace!r}")
        if not (isinstance(max_prob, (int, float)) and 0 <= max_prob <= 1):
            raise ValueError(f"max_prob must be in [0, 1], got {max_prob!r}")
        find = [find] if isinstance(find, str) else list(find)
        kwargs.setdefault("case_sensitive", True)
        super().__init__(provider, find, keep_index_buffer=0, with_variants=False, skip_tokens=skip_tokens, **kwargs)
        self.hard_constraint = False  # matches it may leave (max_replacements, max_prob) are not violations
        self.replace, self.max_replacements, self.max_prob = replace, max_replacements, max_prob
        self.max_new_tokens_for_replace = max_new_tokens_for_replace

    def reset(self) -> None:
        super().reset()
        self.replaced = 0
        self._forced: Dict[int, int] = {}  # position -> token to force there
        self._probs: List[float] = []  # the probability each token had when it was sampled

    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        token = self._forced.get(len(continuation_tokens))
        if token is None:
            return logits
        forced = np.full_like(logits, -np.inf)
        forced[token] = 0.0
        return forced

    def on_next_token(self, continuation_tokens: List[int], probs: Optional[np.ndarray]) -> None:
        del self._probs[len(continuation_tokens) - 1 :]
        assert probs is not None  # reads_probs: the sampler always passes them
        self._probs.append(float(probs[continuation_tokens[-1]]))

    def _on_match(self, tokens: List[int], match: Match) -> List[int]:
        position = self.matcher.token_at(match.start)
        if (
            position < self._keep  # inside a replacement (final: never matched again)
            or self.replaced >= self.max_replacements
            or position >= self.max_new_tokens_for_replace
            or self._probs[position] > self.max_prob
        ):
            return tokens
        text, start = self.matcher.text, self.matcher.ends[position - 1] if position else 0
        new_text = text[start : match.start] + self.replace + text[match.end :]
        forced = self.provider.encode(new_text, add_special_tokens=False)
        self._forced = {position + i: token for i, token in enumerate(forced)}
        self._keep = max(self._keep, position + len(forced))  # the replacement is final: never matched again
        self.replaced += 1
        return self._rewind(tokens, position, f"replace {match.pattern!r} with {self.replace!r}")
