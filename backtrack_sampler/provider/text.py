"""``TextView``: the decoded text of a growing, rewindable token list, with character offsets.

The one incremental, UTF-8-safe detokenizer of the library: strategies (AntiSlop's matcher),
``generate_text``, the events, the server and the playground all read text through it. ::

    view = TextView(provider.decode)
    piece = view.update(tokens)     # the text the new tokens added ("" while a character is split)
    view.text                       # all committed text
    view.token_at(char)             # the token that wrote character ``char``
    view.offset(token)              # where token ``token``'s text begins
    view.rewind(position)           # forget tokens[position:] (or pass a shorter list to update)

A token is *committed* once its text is whole: a token that ends inside a multi-byte character
waits (its text is not in ``text`` yet) until the bytes that complete it arrive, or until
``update(tokens, at_end=True)`` / four tokens have passed (then the replacement character is
kept). Each new piece is decoded with one token of context before it, so spacing comes out as a
whole decode has it (SentencePiece drops a leading space from a lone token).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Callable, List, Sequence

MAX_CHAR_TOKENS = 4  # a character is at most 4 UTF-8 bytes, so at most 4 byte-tokens


def text_after(decode: Callable[[Sequence[int]], str], before: Sequence[int], tokens: Sequence[int]) -> str:
    """The text ``tokens`` add after ``before`` (decoded with one token of context, which keeps a
    leading space that a lone decode may drop)."""
    context = list(before[-1:])
    return decode(context + list(tokens))[len(decode(context)) :]


class TextView:
    """``tokens``: the tokens seen; ``text``: the committed text; ``ends[i]``: where token ``i``'s
    text ends in ``text`` (tokens that together write one character share an end)."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self.decode = decode
        self.reset()

    def reset(self) -> None:
        self.tokens: List[int] = []
        self.text = ""
        self.ends: List[int] = []

    @property
    def committed(self) -> int:
        """How many tokens' text is in ``text`` (the others wait for the rest of a character)."""
        return len(self.ends)

    def token_at(self, char: int) -> int:
        """Index of the token whose text holds character ``char`` (``committed`` past the end)."""
        return bisect_right(self.ends, char)

    def offset(self, token: int) -> int:
        """Where token ``token``'s text begins in ``text`` (``len(text)`` for a token not committed)."""
        if token <= 0:
            return 0
        return self.ends[token - 1] if token <= len(self.ends) else len(self.text)

    def rewind(self, length: int) -> int:
        """Forget every token from ``length`` on; returns the length of the text kept."""
        del self.tokens[length:]
        while 0 < length < len(self.ends) and self.ends[length - 1] == self.ends[length]:
            length -= 1  # cut inside a character: its first tokens go back to waiting
        if length < len(self.ends):
            del self.ends[length:]
            self.text = self.text[: self.ends[-1] if self.ends else 0]
        return len(self.text)

    def update(self, tokens: Sequence[int], at_end: bool = False) -> str:
        """Follow ``tokens`` (the whole list: a list that no longer starts with the tokens seen
        rewinds first) and return the text added to ``text``."""
        known = len(self.tokens)
        if len(tokens) < known or list(tokens[:known]) != self.tokens:  # rewound
            same = next((i for i, (a, b) in enumerate(zip(self.tokens, tokens)) if a != b), min(known, len(tokens)))
            self.rewind(same)
        self.tokens.extend(tokens[len(self.tokens) :])
        done, waiting = len(self.ends), len(self.tokens) - len(self.ends)
        if not waiting:
            return ""
        context = max(done - 1, 0)  # decode with one token before, so spacing comes out right
        piece = self.decode(self.tokens[context:])[len(self.decode(self.tokens[context:done])) :]
        if piece.endswith("\ufffd") and waiting < MAX_CHAR_TOKENS and not at_end:
            return ""  # half a character: wait for its other bytes
        self.text += piece
        self.ends += [len(self.text)] * waiting
        return piece
