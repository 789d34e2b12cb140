"""TextMatcher: finds phrases and regexes in the decoded text of a growing, rewindable token list.

Phrases are kept in one sorted list (memory and set-up linear in their total length). A "live"
start is a character position s such that text[s:] is still the beginning of some phrase; it is
kept with the range [lo, hi) of the sorted list that shares that beginning. Each new character
narrows the range of every live start (a binary search on one character of the phrases in the
range) and may open a new start (a dict lookup of its first character), so the cost per character
is O(live starts x log(phrases)): it depends on how many phrases are half-typed at the end of the
text (a handful), not on how many phrases there are or how long they are. The live starts after
every character are kept, so a rewind just truncates lists.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from ..provider.text import TextView
from ._regex import CompiledRegex


class Match(NamedTuple):
    start: int  # character offsets in TextMatcher.text
    end: int
    pattern: str  # the phrase (as folded) or the regex's pattern
    is_regex: bool


def fold(text: str, case_sensitive: bool) -> str:
    """Lower-case ``text`` without changing its length (so offsets stay valid)."""
    if case_sensitive:
        return text
    low = text.lower()
    return low if len(low) == len(text) else "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


def _word(char: str) -> bool:
    return char.isalnum() or char == "_"


_last_tables: Optional[tuple] = None  # (phrases dict, tables) of the last _tables call


def _tables(phrases: Dict[str, float]) -> Tuple[List[str], Dict[str, Tuple[int, int]]]:
    """The sorted phrases and each first character's range in them; the same dict object as the
    last call (strategies built from one list share it) gives the same read-only tables."""
    global _last_tables
    last = _last_tables  # one read: another thread may replace it meanwhile
    if last is not None and last[0] is phrases:
        return last[1]
    ordered = sorted(phrases)
    first: Dict[str, Tuple[int, int]] = {}
    for index, phrase in enumerate(ordered):
        lo, _ = first.get(phrase[0], (index, index))
        first[phrase[0]] = (lo, index + 1)
    _last_tables = (phrases, (ordered, first))
    return ordered, first


class TextMatcher:
    """``update(tokens)`` decodes the new tokens (a ``TextView``) and returns the matches they complete.

    ``text`` is the text of the committed tokens; ``ends[i]`` is where token i's text ends in it
    (see ``TextView``). Whole-word matches are confirmed by the next character, or by
    ``update(tokens, at_end=True)`` when the text ends there.
    """

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        phrases: Dict[str, float],
        regexes: Sequence[CompiledRegex],
        case_sensitive: bool = False,
        whole_words: bool = False,
        regex_window: int = 100,
    ):
        self.phrases, self.regexes = phrases, list(regexes)
        self.view = TextView(decode)
        # sorted: phrases sharing a beginning are neighbours; first: first character -> its range in sorted
        self.sorted, self.first = _tables(phrases)
        self.case_sensitive, self.whole_words, self.regex_window = case_sensitive, whole_words, regex_window
        self.reset()

    def reset(self) -> None:
        self.view.reset()
        self.folded = ""
        # live[k]: the live starts after the first k characters, as (start, lo, hi): text[start:k]
        # begins every phrase in self.sorted[lo:hi] and no other
        self.live: List[Tuple[Tuple[int, int, int], ...]] = [()]

    @property
    def text(self) -> str:
        return self.view.text

    @property
    def decode(self) -> Callable[[Sequence[int]], str]:
        return self.view.decode

    @decode.setter
    def decode(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.view.decode = decode

    @property
    def tokens(self) -> List[int]:
        return self.view.tokens

    @property
    def ends(self) -> List[int]:
        return self.view.ends

    def token_at(self, char: int) -> int:
        """Index of the token whose text holds character ``char`` (len(ends) past the end)."""
        return self.view.token_at(char)

    def hold_token(self, keep: int = 0) -> int:
        """How many leading tokens can be final (at least ``keep``, which already are).

        The tokens before K can be final when no continuation can make them part of a match
        whatever is rewound later, and rewinds go back at most to K: so every phrase half-typed
        (a live start) at every token boundary from K on must begin at or after K's text. Appending
        text only adds live starts that were live at an earlier boundary, and a rewind keeps the
        boundaries before it, so such a K stays safe. The largest such K is returned. With regexes
        the last ``regex_window`` characters are held too."""
        view, live = self.view, self.live
        limit = len(view.text) - self.regex_window if self.regexes else len(view.text)
        lowest = len(view.text)  # the earliest live start at the boundaries from k on
        for k in range(view.committed, keep, -1):
            at = view.offset(k)
            for start, _, _ in live[at]:
                lowest = min(lowest, start)
            if lowest >= at and at <= limit:
                return k
        return keep

    def rewind(self, length: int) -> None:
        """Forget every token from ``length`` on."""
        chars = self.view.rewind(length)
        del self.live[chars + 1 :]
        self.folded = self.folded[:chars]

    def update(self, tokens: Sequence[int], at_end: bool = False) -> List[Match]:
        view = self.view
        if len(tokens) < len(view.tokens) or list(tokens[: len(view.tokens)]) != view.tokens:
            same = next((i for i, (a, b) in enumerate(zip(view.tokens, tokens)) if a != b), len(tokens))
            self.rewind(min(same, len(tokens)))  # rewound by someone else
        start, committed = len(view.text), view.committed
        piece = view.update(tokens, at_end)
        if view.committed == committed:  # nothing new (or half a character: wait for its other bytes)
            return self._scan(start, True) if at_end and self.whole_words else []  # the end confirms a word
        self.folded += fold(piece, self.case_sensitive)
        return self._scan(start, at_end) + self._search_regexes(start)

    def _scan(self, start: int, at_end: bool) -> List[Match]:
        text, whole, phrases = self.folded, self.whole_words, self.sorted
        found = []
        for i in range(start, len(text) + at_end):
            live = self.live[i]
            edge = i == 0 or i == len(text) or not (_word(text[i - 1]) and _word(text[i]))
            if whole and edge:  # a whole-word match is confirmed by the boundary after it
                found += [Match(s, i, phrases[lo], False) for s, lo, _ in live if len(phrases[lo]) == i - s]
            if i == len(text):
                break
            char, extended = text[i], []
            for s, lo, hi in live:
                depth = i - s  # the phrases in [lo, hi) agree on their first `depth` characters
                lo = bisect_left(phrases, char, lo, hi, key=lambda p: p[depth : depth + 1])
                if lo < hi and len(phrases[lo]) > depth and phrases[lo][depth] == char:
                    extended.append((s, lo, bisect_right(phrases, char, lo, hi, key=lambda p: p[depth : depth + 1])))
            if char in self.first and (edge or not whole):
                extended.append((i, *self.first[char]))
            live = tuple(extended)
            self.live.append(live)
            if not whole:
                found += [Match(s, i + 1, phrases[lo], False) for s, lo, _ in live if len(phrases[lo]) == i + 1 - s]
        return found

    def _search_regexes(self, start: int) -> List[Match]:
        """Matches that end in the new text (from ``start`` on) and begin within the window. Only
        the window (and one character before it, for ``\\b``) is handed to the regex engine."""
        found = []
        lo = max(start - self.regex_window, 0)
        context = max(lo - 1, 0)
        window = self.text[context:]
        for regex in self.regexes:
            for m in regex.finditer(window, lo - context):
                if m.end() + context > start and m.end() > m.start():
                    found.append(Match(m.start() + context, m.end() + context, regex.pattern, True))
                    break
        return found
