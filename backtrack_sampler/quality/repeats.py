"""The one definition of a degenerate repeat (a loop), and the repetition scores.

``RepeatDetector`` finds repetition in a growing, rewindable text; ``RepetitionStrategy`` runs it
on the decoded continuation, the quality benchmark, ``slop`` measures and the tests call
``find_repeat`` / ``is_degenerate`` on finished texts: the same rules (``RepeatRules``)
everywhere. Words are compared normalised: lower-cased, punctuation and spacing ignored
("Super", "SUPER" and "super," are one word). Five kinds:

* ``"loop"``: a unit of 1 to ``max_period`` characters repeated back to back ("-h-h-h-h...",
  "lololol", "!!!!!!!!") over at least ``min_chars`` characters and ``min_repeats`` copies; a unit
  with no letter or digit (rules, dots, blank lines) over at least ``symbol_chars``.
* ``"ngram"``: the last ``ngram_words`` words (lower-cased, punctuation ignored) already appeared,
  in that order, within the ``window`` words before.
* ``"sentence"``: a sentence of at least ``sentence_words`` words that is, word for word, one
  written before (shorter than ``ngram_words``, or the n-gram rule finds it first).
* ``"phrase"``: a run of ``phrase_words`` to 8 words (12 characters or more) written twice back
  to back ("often used for furniture making, often used for furniture making").
* ``"near"``: near-repeats. A sentence (or line) of ``near_words`` to 60 words is a near-copy when
  its normalised text is at least ``NEAR_RATIO`` similar (``difflib`` ratio) to one of the 8
  sentences of that length before it: the same sentence with a word changed, added or dropped
  ("Reflections of our dreams" / "Reflecting on our dreams"). One near-copy is prose (a refrain,
  "The keeper looked at the sea. The keeper looked at the sky."); two in a row (shorter
  sentences between them aside) are a loop, found where the first of them begins: where the loop
  began.

A ``Repeat`` says where the copy begins (``start``), where the text it copies begins
(``source``) and where it was found (``end``), in characters.

The detector costs about a microsecond per new character: the loop rule keeps, for the periods p
at which the text now repeats, how many characters at the end equal the one p before (per
character, a ``str.find`` of it in the ``max_period`` characters before); words and sentences are
hashed once, when complete. A rewind truncates (the loop runs are
recomputed from the last few dozen characters).

``distinct_n`` (unique word n-grams / all), ``rep_n`` (1 - distinct-n over the whole text, the
"rep-n" of Welleck et al. 2019) and ``repeated_fraction`` (share of words inside a repeated
``ngram_words``-gram) are the benchmark's repetition scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from difflib import SequenceMatcher
from typing import Dict, List, NamedTuple, Optional, Tuple

_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")  # letters/digits, with inner apostrophes
_SENTENCE_END = re.compile(r"[.!?\u2026\n]")
_APOSTROPHES = "'\u2019"
NEAR_RATIO = 0.8  # two sentences at least this similar (difflib ratio, normalised) are near-copies
_NEAR_MAX = 60  # longer sentences are not compared (and not held back for it)
_NEAR_LOOKBACK = 8  # a sentence is compared with this many sentences of near_words or more before it
_PHRASE_MAX = 8  # the longest run of words the phrase rule looks for doubled


@dataclass(frozen=True)
class RepeatRules:
    """Thresholds of the three repeat kinds (see the module docstring); 0 turns a rule off.

    The defaults are for prose (stories, answers): a small model's loop is found after about
    20 characters or 8 words, while a story that reuses a name or a short phrase is not."""

    min_chars: int = 20
    min_repeats: int = 3
    max_period: int = 16
    symbol_chars: int = 64
    ngram_words: int = 8
    window: int = 400
    sentence_words: int = 5
    phrase_words: int = 4
    near_words: int = 4

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{f.name} must be an int >= 0, got {value!r}")
        if self.max_period and self.min_repeats < 2:
            raise ValueError(f"min_repeats must be >= 2 (a unit and one copy), got {self.min_repeats}")
        if self.ngram_words == 1:
            raise ValueError("ngram_words must be 0 (off) or >= 2: a single repeated word is not a repeat")
        if self.phrase_words == 1:
            raise ValueError("phrase_words must be 0 (off) or >= 2: a single repeated word is not a repeat")


class Repeat(NamedTuple):
    kind: str  # "loop", "ngram", "sentence", "phrase" or "near"
    start: int  # where the copy begins (characters)
    end: int  # where it was found
    source: int  # where the text it copies begins

    def describe(self, text: str, limit: int = 40) -> str:
        """A short description: ``loop '-h' x12``, ``ngram 'the keeper looked at ...'``."""
        if self.kind == "loop":
            unit = text[self.source : self.start]
            return f"loop {unit!r} x{(self.end - self.source) // max(len(unit), 1)}"
        copy = " ".join(text[self.start : self.end].split())
        return f"{self.kind} {copy if len(copy) <= limit else copy[: limit - 4] + ' ...'!r}"


class RepeatDetector:
    """Feed text with ``extend`` (returns the first ``Repeat`` the new text completes, or None),
    cut it with ``rewind(length)``; ``hold`` is the earliest character a repeat found later can
    begin at (text before it is safe). ``text`` is everything fed and kept."""

    def __init__(self, rules: Optional[RepeatRules] = None):
        self.rules = rules or RepeatRules()
        r = self.rules
        self._periods = range(1, r.max_period + 1) if r.min_chars or r.symbol_chars else range(0)
        # the least run (characters equal to the one p before) that makes a loop of period p
        self._need = [max(r.min_chars, r.min_repeats * p) - p for p in self._periods]
        self._symbol_need = [max(r.symbol_chars, r.min_repeats * p) - p for p in self._periods]
        self._low = min(self._need, default=0)  # a quick filter: no loop while every run is shorter
        self.reset()

    def reset(self) -> None:
        self.text = ""
        self._runs: Dict[int, int] = {}  # period -> characters at the end equal to the one that far before
        self._words: List[Tuple[int, int, str]] = []  # complete words: (start, end, lower-cased)
        self._grams: Dict[Tuple[str, ...], List[int]] = {}  # n-gram -> indices of the words ending it
        self._sentences: List[int] = [0]  # word index where each sentence begins (the last is open)
        self._said: Dict[Tuple[str, ...], List[int]] = {}  # sentence -> indices of its first word
        self._said_log: List[Tuple[str, ...]] = []  # the sentences recorded, in order (for rewinds)
        # per closed sentence: (its normalised text when near_words..60 words long, else None;
        # where the run of near-copies it ends began, or -1; how many near-copies are in that run;
        # where the sentence the run's first copy copies begins)
        self._closed: List[Tuple[Optional[str], int, int, int]] = []
        self._ended = False  # the last extend was at_end (its last word and sentence were closed)

    # --- feeding ------------------------------------------------------------------------------
    def extend(self, piece: str, at_end: bool = False) -> Optional[Repeat]:
        """Append ``piece``; ``at_end``: the text ends here (its last word and sentence are complete)."""
        start = len(self.text)
        self.text += piece
        found = self._loops(start) if self._periods else None
        r = self.rules
        if r.ngram_words or r.sentence_words or r.phrase_words or r.near_words:
            found = _first(found, self._scan_words(at_end))
        return found

    def _loops(self, start: int) -> Optional[Repeat]:
        """Loops completed by the characters from ``start`` on. ``runs`` maps a period p to how
        many characters at the end equal the one p before (periods with none are left out): per
        character, only the periods at which the same character occurs are looked at."""
        text, runs, periods = self.text, self._runs, len(self._periods)
        found = None
        for t in range(start, len(text)):
            char, lo, new = text[t], max(t - periods, 0), {}
            j = text.find(char, lo, t)
            while j != -1:
                p = t - j
                new[p] = runs.get(p, 0) + 1
                j = text.find(char, j + 1, t)
            runs = new
            if found is None and runs and max(runs.values()) >= self._low:
                found = self._loop_at(t + 1, runs)
        self._runs = runs
        return found

    def _loop_at(self, end: int, runs: Dict[int, int]) -> Optional[Repeat]:
        """The loop of the smallest period that the text up to ``end`` ends with, if any."""
        text = self.text
        for p in sorted(runs):
            run = runs[p]
            if run >= self._need[p - 1] and (
                run >= self._symbol_need[p - 1] or any(c.isalnum() for c in text[end - p : end])
            ):
                return Repeat("loop", end - run, end, end - run - p)
        return None

    def _scan_words(self, at_end: bool) -> Optional[Repeat]:
        words, text = self._words, self.text
        pos = words[-1][1] if words else 0
        found: Optional[Repeat] = None
        for m in _WORD.finditer(text, pos):
            if not at_end and (m.end() == len(text) or (m.end() + 1 == len(text) and text[-1] in _APOSTROPHES)):
                break  # the last word may go on ("they" + "'" may become "they're")
            gap = text[words[-1][1] if words else 0 : m.start()]
            if words and _SENTENCE_END.search(gap):
                found = _first(found, self._close_sentence())  # (both always run: they record what they saw)
            words.append((m.start(), m.end(), m.group().lower()))
            found = _first(found, self._gram())
            found = _first(found, self._phrase())
        if at_end and self._sentences[-1] < len(words):  # the text ends: so does its last sentence
            found = _first(found, self._close_sentence())
        self._ended = at_end
        return found

    def _gram(self) -> Optional[Repeat]:
        n, words = self.rules.ngram_words, self._words
        if not n or len(words) < n:
            return None
        last = len(words) - 1
        key = tuple(w for _, _, w in words[-n:])
        seen = self._grams.setdefault(key, [])
        found = None
        if seen and last - seen[-1] <= self.rules.window:
            found = Repeat("ngram", words[last - n + 1][0], words[last][1], words[seen[-1] - n + 1][0])
        seen.append(last)
        return found

    def _phrase(self) -> Optional[Repeat]:
        """The last k words (phrase_words <= k <= 8) are the k before them again."""
        low, words = self.rules.phrase_words, self._words
        if not low:
            return None
        for k in range(low, min(_PHRASE_MAX, len(words) // 2) + 1):
            unit = [w for _, _, w in words[-k:]]
            if unit == [w for _, _, w in words[-2 * k : -k]] and len(" ".join(unit)) >= 12:
                return Repeat("phrase", words[-k][0], words[-1][1], words[-2 * k][0])
        return None

    def _near(self, first: int, key: Tuple[str, ...]) -> Optional[Repeat]:
        """Record the sentence just closed (words ``first`` on) for the near rule; a Repeat when it
        is the 2nd near-copy in a row."""
        closed, low = self._closed, self.rules.near_words
        run, count, copied = closed[-1][1:] if closed else (-1, 0, -1)
        if not low or not low <= len(key) <= _NEAR_MAX:
            closed.append((None, run, count, copied))  # a short sentence leaves the run as it was
            return None
        joined, source, seen = " ".join(key), -1, 0
        for i in range(len(closed) - 1, -1, -1):
            other = closed[i][0]
            if other is None:
                continue
            matcher = SequenceMatcher(None, joined, other, autojunk=False)
            if matcher.real_quick_ratio() >= NEAR_RATIO and matcher.ratio() >= NEAR_RATIO:
                source = i
                break
            seen += 1
            if seen == _NEAR_LOOKBACK:
                break
        if source < 0:
            closed.append((joined, -1, 0, -1))
            return None
        if count:
            count += 1
        else:
            run, count, copied = self._words[first][0], 1, self._words[self._sentences[source]][0]
        closed.append((joined, run, count, copied))
        return Repeat("near", run, self._words[-1][1], copied) if count >= 2 else None

    def _close_sentence(self) -> Optional[Repeat]:
        first, words = self._sentences[-1], self._words
        self._sentences.append(len(words))
        key = tuple(w for _, _, w in words[first:])
        near = self._near(first, key)
        self._said_log.append(key)
        seen = self._said.setdefault(key, [])
        found = None
        if (
            seen
            and self.rules.sentence_words
            and len(key) >= self.rules.sentence_words
            and len(words) - seen[-1] <= self.rules.window
        ):
            found = Repeat("sentence", words[first][0], words[-1][1], words[seen[-1]][0])
        seen.append(first)
        return _first(near, found)

    # --- rewinding ----------------------------------------------------------------------------
    def rewind(self, length: int) -> None:
        """Forget the text from character ``length`` on."""
        if length >= len(self.text) and not self._ended:
            return
        self._ended = False
        self.text = self.text[:length]
        words, n = self._words, self.rules.ngram_words
        while words and (words[-1][1] >= length or (words[-1][1] + 1 == length and self.text[-1] in _APOSTROPHES)):
            # a word ending at the cut (or before an apostrophe there) may go on: not complete
            last = len(words) - 1
            if n and last >= n - 1:
                key = tuple(w for _, _, w in words[last - n + 1 :])
                seen = self._grams[key]
                seen.pop()
                if not seen:
                    del self._grams[key]
            words.pop()
        # a sentence is closed when the word after it comes (or the text ends): undo the closes
        # made by a word that is gone (or by an end that is no longer one)
        while len(self._sentences) > 1 and self._sentences[-1] >= len(words):
            self._sentences.pop()
            self._closed.pop()
            key = self._said_log.pop()
            seen = self._said[key]
            seen.pop()
            if not seen:
                del self._said[key]
        self._recount()

    def _recount(self) -> None:
        text, n = self.text, len(self.text)
        runs = {}
        for p in self._periods:
            run, j = 0, n - 1
            while j - p >= 0 and text[j] == text[j - p]:
                run, j = run + 1, j - 1
            if run:
                runs[p] = run
        self._runs = runs

    @property
    def hold(self) -> int:
        """The earliest character a repeat found later can begin at: text before it never becomes
        part of one (a loop's run, the words an n-gram or the open sentence can still take in)."""
        n = len(self.text)
        hold = n - max(self._runs.values(), default=0)
        words, rules = self._words, self.rules
        n = max(rules.ngram_words, _PHRASE_MAX if rules.phrase_words else 0)
        if n and words:
            hold = min(hold, words[max(len(words) - n + 1, 0)][0])
        if self._closed and self._closed[-1][2]:  # a run of near-copies: its 2nd would begin at the 1st
            hold = min(hold, self._closed[-1][1])
        if (rules.sentence_words or rules.near_words) and self._sentences[-1] < len(words):
            first = self._sentences[-1]
            open_words = len(words) - first
            if (rules.near_words and open_words <= _NEAR_MAX) or (
                rules.sentence_words and (not rules.ngram_words or open_words < rules.ngram_words)
            ):
                hold = min(hold, words[first][0])
        if rules.ngram_words or rules.sentence_words or rules.phrase_words or rules.near_words:
            tail = _WORD.search(self.text, words[-1][1] if words else 0)
            if tail is not None:  # a word still being written
                hold = min(hold, tail.start())
        return max(hold, 0)


def _first(a: Optional[Repeat], b: Optional[Repeat]) -> Optional[Repeat]:
    """Of two repeats found in the same new text, the one whose copy begins first."""
    if a is None or (b is not None and b.start < a.start):
        return b
    return a


def find_repeats(text: str, rules: Optional[RepeatRules] = None, first: bool = False) -> List[Repeat]:
    """The repeats found reading ``text`` a character at a time, as a generation writes it (each
    where it completes; a loop that goes on is found again at every character); ``first``: stop
    at the first one."""
    detector, found = RepeatDetector(rules), []
    for i, char in enumerate(text):
        hit = detector.extend(char, at_end=i == len(text) - 1)
        if hit is not None:
            found.append(hit)
            if first:
                break
    return found


def find_repeat(text: str, rules: Optional[RepeatRules] = None) -> Optional[Repeat]:
    """The first repeat in ``text`` (the first one completed, reading left to right), or None."""
    found = find_repeats(text, rules, first=True)
    return found[0] if found else None


def is_degenerate(text: str, rules: Optional[RepeatRules] = None) -> bool:
    """True when ``text`` holds a repeat by ``rules`` (the defaults: those of RepetitionStrategy)."""
    return find_repeat(text, rules) is not None


def words_of(text: str) -> List[str]:
    """The lower-cased words of ``text`` (as the detector reads them)."""
    return [m.group().lower() for m in _WORD.finditer(text)]


def distinct_n(text: str, n: int) -> float:
    """Unique word n-grams / all word n-grams (0.0 for a text with fewer than n words)."""
    words = words_of(text)
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def rep_n(text: str, n: int = 4) -> float:
    """1 - distinct-n: the share of word n-grams that repeat an earlier one (0: none)."""
    words = words_of(text)
    return 1.0 - distinct_n(text, n) if len(words) >= n else 0.0


def repeated_fraction(text: str, n: int = RepeatRules.ngram_words) -> float:
    """The share of words that lie inside an n-gram written earlier in the text."""
    words = words_of(text)
    if len(words) < n:
        return 0.0
    seen, covered = set(), [False] * len(words)
    for i in range(len(words) - n + 1):
        key = tuple(words[i : i + n])
        if key in seen:
            covered[i : i + n] = [True] * n
        seen.add(key)
    return sum(covered) / len(words)
