"""AntiSlopStrategy: when a banned phrase or regex shows up in the text, rewind to where it starts
and make the token that began it less likely (or impossible) there."""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Union, cast

import numpy as np

from ..provider.base_provider import BaseProvider
from ._phrase_matcher import Match, TextMatcher, fold
from ._regex import CompiledRegex, compile_regex
from .base_strategy import BaseStrategy, ConstraintError

Slops = Union[Iterable[str], Iterable[tuple], Dict[str, float]]


class AntiSlopStrategy(BaseStrategy):
    """Bans phrases and regexes, matched on the decoded text however the model tokenizes them.

    slops: phrases to ban: ``["a tapestry of", ...]`` (hard bans), or ``[[phrase, multiplier], ...]``
        / ``{phrase: multiplier}`` (soft bans; multipliers in [0, 1], 0 is a hard ban). May be empty
        (or None) when ``regexes`` are given.
    keep_index_buffer: extra tokens held back before the earliest possible match, so that
        ``on_exhausted="rewind"`` can back up that far; 0 streams with the least delay.
    with_variants: 3.x name for case-insensitive matching; ``case_sensitive`` overrides it.
    skip_tokens: the first ``skip_tokens`` generated tokens are final at once and never matched.
    regexes: patterns banned like phrases (hard bans); matches are searched for in the last
        ``regex_window`` characters, and that much text is held back while regexes are in use.
        Pattern strings run on RE2 (``compile_regex``): linear time, so a search costs
        O(regex_window) whatever the pattern; backreferences and lookarounds are rejected with a
        ValueError naming the feature. A precompiled ``re.Pattern`` is used as it is, by Python's
        ``re``, whose time is not bounded: pass those only for patterns you trust.
    adjustment_strength: when a phrase with multiplier m is found, generation rewinds to its first
        token and that token becomes m**strength times as likely there (strength * ln(m) is added
        to its logit), then is resampled; if the model picks it again, the phrase stays. 0 turns
        soft bans off (phrases with m > 0 are ignored); ``math.inf`` makes every phrase a hard ban
        (logit -inf: never kept). Plain-string phrases (and regexes) are always hard bans.
    whole_words: a match must not be glued to letters or digits on either side ("weave" then
        bans "weave," but not "weaver").
    max_retries: rewinds allowed at one position (with the same text before it); one more is
        "exhausted", and so is a position where every token is banned. Then ``on_exhausted``:
        "rewind" also bans the token before it and rewinds there; when that token is already
        final, a hard ban raises ``ConstraintError`` (the generation ends with finish_reason
        "constraint", without the match) and a soft ban is kept. "accept" keeps the match. Kept
        matches are reported to ``on_accept(position, reason)``.

    Guarantee: with hard bans and ``on_exhausted="rewind"`` (a hard constraint,
    ``capabilities.hard``) no banned phrase or regex match is ever in the final text. A token
    becomes final only when no continuation can still make it part of a banned phrase, whatever is
    rewound later (by this strategy or another one of a chain); a regex match that begins in final
    text (its search window reaches back after a rewind) is rewound to its first token that is not
    final, and banned there.

    A ban belongs to its position and the text before it: it is dropped when generation rewinds to
    an earlier position. Where a ban holds (a position rewound to), end-of-text is excluded too,
    unless nothing else is left: the model was writing on there, and a ban must not end the text
    (``end_at_rewind = True`` allows it, as before; docs/repetition.md measures both). Each rewind
    sets ``rewind_reason`` (e.g. "phrase 'a tapestry of'").
    """

    reads_probs = False
    edits_logits = True
    end_at_rewind = False  # True: end-of-text may be drawn where a ban holds (as before; for comparisons)

    def __init__(
        self,
        provider: BaseProvider,
        slops: Optional[Slops],
        keep_index_buffer: int = 0,
        with_variants: bool = True,
        skip_tokens: int = 0,
        *,
        regexes: Iterable[Union[str, CompiledRegex]] = (),
        adjustment_strength: float = 1.0,
        case_sensitive: Optional[bool] = None,
        whole_words: bool = False,
        max_retries: int = 10,
        on_exhausted: str = "rewind",
        regex_window: int = 100,
        on_accept: Optional[Callable[[int, str], None]] = None,
    ):
        if on_exhausted not in ("rewind", "accept"):
            raise ValueError(f'on_exhausted must be "rewind" or "accept", got {on_exhausted!r}')
        for name, value in dict(
            keep_index_buffer=keep_index_buffer,
            skip_tokens=skip_tokens,
            max_retries=max_retries,
            regex_window=regex_window,
        ).items():
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not (isinstance(adjustment_strength, (int, float)) and adjustment_strength >= 0):
            raise ValueError(f"adjustment_strength must be a number >= 0 (inf: hard bans), got {adjustment_strength!r}")
        self.provider = provider
        self.keep_index_buffer, self.skip_tokens, self.max_retries = keep_index_buffer, skip_tokens, max_retries
        self.on_exhausted, self.on_accept = on_exhausted, on_accept
        case_sensitive = not with_variants if case_sensitive is None else case_sensitive
        if isinstance(regexes, str) or hasattr(regexes, "finditer"):  # one pattern given alone
            regexes = [cast(Union[str, CompiledRegex], regexes)]
        compiled = [r if not isinstance(r, str) else compile_regex(r, case_sensitive) for r in regexes]
        items = _items(slops)
        if not items and not compiled:
            raise ValueError("AntiSlopStrategy needs something to ban: a non-empty list of phrases (slops) or regexes")
        phrases = _penalties(items, adjustment_strength, case_sensitive)
        self.hard_constraint = on_exhausted == "rewind" and (bool(compiled) or -math.inf in phrases.values())
        self.matcher = TextMatcher(provider.decode, phrases, compiled, case_sensitive, whole_words, regex_window)
        self.reset()

    def reset(self) -> None:
        self.matcher.reset()
        self._bans: Dict[int, Dict[int, float]] = {}  # position -> {token: logit penalty}
        self._retries: Dict[int, int] = {}
        self._keep = self.skip_tokens
        self.rewind_reason = None

    def get_keep_index(self) -> int:
        return self._keep

    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        bans = self._bans.get(len(continuation_tokens))
        if not bans:
            return logits
        banned = logits.copy()
        banned[list(bans)] += np.fromiter(bans.values(), np.float32, len(bans))
        if np.max(banned) == -np.inf:  # every token is banned here: exhausted, sample unbanned
            self._retries[len(continuation_tokens)] = self.max_retries
            return logits
        if self.end_at_rewind:
            return banned
        ends = [t for t in self.provider.eos_token_ids if t < len(banned)]
        kept = banned[ends]
        banned[ends] = -np.inf  # a rewind is no reason to end the text here (unless nothing else is left)
        if np.max(banned) == -np.inf:
            banned[ends] = kept
        return banned

    def backtrack(self, continuation_tokens: List[int]) -> List[int]:
        at_end = bool(continuation_tokens) and continuation_tokens[-1] in self.provider.eos_token_ids
        return self._check(continuation_tokens, at_end)  # (empty: a chain's earlier member rewound it all)

    def on_end(self, continuation_tokens: List[int]) -> List[int]:
        return self._check(continuation_tokens, True)  # the text ends here: whole words and split characters too

    def _check(self, tokens: List[int], at_end: bool) -> List[int]:
        found = self.matcher.update(tokens, at_end=at_end)
        if found and self.skip_tokens:  # text of the skipped tokens is never matched
            found = [m for m in found if self.matcher.token_at(m.end - 1) >= self.skip_tokens]
        if found:
            tokens = self._on_match(tokens, min(found, key=lambda m: m.start))
        hold = self.matcher.hold_token(self._keep) - self.keep_index_buffer
        self._keep = max(self._keep, min(hold, len(tokens)))
        return tokens

    def on_rewind(self, position: int) -> None:
        if position < len(self.matcher.view.tokens):  # rewound by another strategy (or the driver)
            self._drop_after(position)
            self.matcher.rewind(position)
            # below this one's keep index: the tokens before `position` stay final for this
            # strategy (the chain's final tokens are before them); a match that begins before it
            # is handled as one that begins in final text
            self._keep = min(self._keep, position)

    def _on_match(self, tokens: List[int], match: Match) -> List[int]:
        start = self.matcher.token_at(match.start)
        position = max(start, self._keep)  # a match that begins in final text: its first token that is not
        reason = f"{'regex' if match.is_regex else 'phrase'} {match.pattern!r}"
        penalty = -math.inf if match.is_regex else self.matcher.phrases[match.pattern]
        hard = penalty == -math.inf
        if start < position:
            reason += " (it begins in final text: rewinding to its first token that is not final)"
            penalty = -math.inf
        if penalty > -math.inf and tokens[position] in self._bans.get(position, {}):
            return tokens  # a soft ban already made this token less likely here: the model chose it anyway
        while self._retries.get(position, 0) >= self.max_retries:  # exhausted here
            if self.on_exhausted == "accept" or position - 1 < self._keep:
                if hard and self.on_exhausted == "rewind":
                    raise ConstraintError(
                        f"{reason}: every position it could rewind to is exhausted "
                        f"(max_retries={self.max_retries}; the {self._keep} tokens before are final)"
                    )
                if self.on_accept:
                    self.on_accept(position, reason)
                return tokens
            position, penalty = position - 1, -math.inf
            reason += f" (exhausted at token {position + 1}; rewinding further)"
        self._retries[position] = self._retries.get(position, 0) + 1
        bans = self._bans.setdefault(position, {})
        bans[tokens[position]] = penalty
        return self._rewind(tokens, position, reason)

    def _rewind(self, tokens: List[int], position: int, reason: str) -> List[int]:
        self._drop_after(position)
        self.rewind_reason = reason
        self.matcher.rewind(position)
        return tokens[:position]

    def _drop_after(self, position: int) -> None:
        for state in (self._bans, self._retries):  # bans after it depended on the text being replaced
            for later in [p for p in state if p > position]:
                del state[later]


def _items(slops: Optional[Slops]) -> list:
    if isinstance(slops, str):
        raise ValueError("slops must be a list of phrases (or of [phrase, multiplier] pairs), not a string")
    return list(slops.items() if isinstance(slops, dict) else slops) if slops is not None else []


_last: Optional[tuple] = None  # (key, penalties) of the last _penalties call: a batch builds one strategy per prompt


def _penalties(items: list, strength: float, case_sensitive: bool) -> Dict[str, float]:
    """{folded phrase: logit penalty < 0} (phrases whose penalty is 0 are left out); ValueError for bad input.
    The same items as the last call give the same (shared, read-only) dict: checking that costs a copy
    and a comparison of the list (about 20 ms for 50,000 phrases), building it again 0.4 s."""
    global _last
    key = (strength, case_sensitive, tuple(tuple(item) if isinstance(item, (list, tuple)) else item for item in items))
    last = _last  # one read: another thread may replace it meanwhile
    if last is not None and last[0] == key:
        return last[1]
    penalties = _build_penalties(items, strength, case_sensitive)
    _last = (key, penalties)
    return penalties


def _build_penalties(items: list, strength: float, case_sensitive: bool) -> Dict[str, float]:
    penalties: Dict[str, float] = {}
    for item in items:
        phrase, multiplier = (item, 0.0) if isinstance(item, str) else (tuple(item) + (None, None))[:2]
        if not isinstance(phrase, str) or not phrase:
            raise ValueError(f"every slop phrase must be a non-empty string, got {phrase!r}")
        if not (isinstance(multiplier, (int, float)) and 0 <= multiplier <= 1):
            raise ValueError(f"the multiplier of {phrase!r} must be a number in [0, 1], got {multiplier!r}")
        factor = 0.0 if isinstance(item, str) else multiplier**strength
        penalty = math.log(factor) if factor > 0 else -math.inf
        key = fold(phrase, case_sensitive)
        penalties[key] = min(penalty, penalties.get(key, 0.0))
    return {phrase: penalty for phrase, penalty in penalties.items() if penalty < 0}
