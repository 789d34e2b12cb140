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
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

from ._regex import CompiledRegex

MAX_CHAR_TOKENS = 4  # a character is at most 4 UTF-8 bytes, so at most 4 byte-tokens


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


class TextMatcher:
    """``update(tokens)`` decodes the new tokens and returns the matches they complete.

    ``text`` is the text of the committed tokens; ``ends[i]`` is where token i's text ends in it
    (tokens that together form one character share an end; a token still waiting for the rest of
    its character is not committed yet). Whole-word matches are confirmed by the next character,
    or by ``update(tokens, at_end=True)`` when the text ends there.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], phrases: Dict[str, float],
                 regexes: Sequence[CompiledRegex], case_sensitive: bool = False, whole_words: bool = False,
                 regex_window: int = 100):
        self.decode, self.phrases, self.regexes = decode, phrases, list(regexes)
        self.sorted = sorted(phrases)  # phrases sharing a beginning are neighbours
        self.first: Dict[str, Tuple[int, int]] = {}  # first character -> its range in self.sorted
        for index, phrase in enumerate(self.sorted):
            lo, _ = self.first.get(phrase[0], (index, index))
            self.first[phrase[0]] = (lo, index + 1)
        self.case_sensitive, self.whole_words, self.regex_window = case_sensitive, whole_words, regex_window
        self.reset()

    def reset(self) -> None:
        self.tokens: List[int] = []
        self.text = self.folded = ""
        self.ends: List[int] = []
        # live[k]: the live starts after the first k characters, as (start, lo, hi): text[start:k]
        # begins every phrase in self.sorted[lo:hi] and no other
        self.live: List[Tuple[Tuple[int, int, int], ...]] = [()]

    def token_at(self, char: int) -> int:
        """Index of the token whose text holds character ``char`` (len(ends) past the end)."""
        return bisect_right(self.ends, char)

    def hold_token(self) -> int:
        """The first token that could still be part of a match: text before it is safe."""
        char = min((start for start, _, _ in self.live[-1]), default=len(self.text))
        if self.regexes:
            char = min(char, len(self.text) - self.regex_window)
        return self.token_at(max(char, 0))

    def rewind(self, length: int) -> None:
        """Forget every token from ``length`` on."""
        del self.tokens[length:]
        while 0 < length < len(self.ends) and self.ends[length - 1] == self.ends[length]:
            length -= 1  # cut inside a character: its first tokens go back to waiting
        if length < len(self.ends):
            chars = self.ends[length - 1] if length else 0
            del self.ends[length:], self.live[chars + 1 :]
            self.text, self.folded = self.text[:chars], self.folded[:chars]

    def update(self, tokens: Sequence[int], at_end: bool = False) -> List[Match]:
        known = len(self.tokens)
        if len(tokens) < known or list(tokens[:known]) != self.tokens:  # rewound by someone else
            same = next((i for i, (a, b) in enumerate(zip(self.tokens, tokens)) if a != b), len(tokens))
            self.rewind(min(same, len(tokens)))
        self.tokens.extend(tokens[len(self.tokens) :])
        done, waiting = len(self.ends), len(self.tokens) - len(self.ends)
        context = max(done - 1, 0)  # decode with one token before, so spacing comes out right
        piece = self.decode(self.tokens[context:])[len(self.decode(self.tokens[context:done])) :]
        if piece.endswith("\ufffd") and waiting < MAX_CHAR_TOKENS and not at_end:
            return []  # half a character: wait for its other bytes
        start = len(self.text)
        self.text += piece
        self.folded += fold(piece, self.case_sensitive)
        self.ends += [len(self.text)] * waiting
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
