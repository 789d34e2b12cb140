r"""Mining a model's own slop: the words, phrases and word families a set of outputs uses far more
often than human text does (the antislop paper's profiling, arXiv 2510.15061), as a ranked ban
list with each entry's evidence (``profile``).

* **Words and phrases**: word n-grams of 1 to ``max_words`` words inside a run of words (one space
  between them, no punctuation or line break: so a phrase matches the text as written), found in at
  least ``min_docs`` different outputs and ``min_count`` times in all, whose frequency (occurrences
  per word of the outputs) is at least ``min_ratio`` times the human baseline's: ``wordfreq``'s
  frequency of the word, and for a phrase wordfreq's estimate for it as a whole (its words'
  frequencies combined, ``1/f = sum(1/f_i)``: about the rarest word's). That baseline is generous
  (human text uses most phrases far less often than their rarest word), so a phrase of common words
  passes only when it is very frequent. Words of the prompts are left out (a story about a
  lighthouse says "lighthouse"), and so are the phrases that hold one ("the old lighthouse"; a
  function word of the prompts, as common as ``_FUNCTION`` or more in human text, such as "a" or
  "about", does not count), and tokens without a letter.
* **Families**: words with one stem (an inflection: whisper, whispers, whispered, whispering) are
  counted together; a family of two forms or more that passes the same tests as a whole is one
  regex entry, ``\bwhisper\w*``, which bans the forms not seen yet too.
* **The narrowest ban**: a word with 80% of its occurrences inside one over-represented phrase is
  banned as that phrase ("once upon", not "once").
* **Nothing twice**: an entry that holds a shorter entry (a phrase with a banned word, or with a
  word of a banned family, or a longer phrase around a banned one) is left out: banning the shorter
  one bans it too (with ``whole_words``, as ``slop mine`` uses the list).

* **Documents are prompts** when a prompt has several outputs (``groups``): ``docs`` and
  ``min_docs`` then count the different prompts an entry is in, so a word one prompt calls for
  (a clock story's "gears") does not pass by being in every sample of that prompt; slop recurs
  across prompts.

Entries are ranked by ``docs * log10(ratio)``: spread over many outputs, and far above human use,
first. ``hits`` counts the entries' occurrences in a text (the ``overrep_phrases_per_1k`` measure);
``family_forms`` spells a family out as phrases (for soft bans, which take phrases only).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, Hashable, Iterable, List, Optional, Sequence, Set, Tuple

from .repeats import words_of

_FLOOR = 1e-7  # wordfreq's frequency for a word it does not know
_RUN = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*(?: [^\W_]+(?:['\u2019][^\W_]+)*)*")  # words, one space between
_SUFFIXES = ("ing", "ed", "es", "ly", "s", "e")  # longest first where they overlap
_MIN_STEM = 4
_IN_PHRASE = 0.8  # a word with this share of its occurrences in one over-used phrase is banned as that phrase
_FUNCTION = 1e-3  # a prompt word this common in human text ("a", "about", "who") does not rule out a phrase


@dataclass(frozen=True)
class Entry:
    """One entry of a ban list and its evidence.

    ``pattern``: the phrase (lower-case words with single spaces) or, for ``kind`` "regex", the
    pattern. ``count``: its occurrences in the outputs; ``docs``: how many outputs hold it;
    ``ratio``: its frequency there over the human baseline's; ``members``: the forms a regex was
    seen as."""

    pattern: str
    kind: str
    count: int
    docs: int
    ratio: float
    members: Tuple[str, ...] = ()

    @property
    def score(self) -> float:
        """The rank: ``docs * log10(ratio)``."""
        return self.docs * math.log10(max(self.ratio, 1.0))

    def regex(self) -> str:
        """A Python regex for the entry's occurrences, as ``profile`` counts them (case-insensitive:
        whole words, one space between them, an apostrophe inside a word)."""
        if self.kind == "regex":
            return self.pattern
        return r"(?<!\w)(?<!\w['\u2019])" + re.escape(self.pattern) + r"(?!\w|['\u2019]\w)"


@lru_cache(maxsize=1 << 16)
def human_frequency(text: str) -> float:
    """The frequency of a word (or wordfreq's estimate for a phrase) in human English text, at least 1e-7."""
    try:
        from wordfreq import word_frequency
    except ImportError as error:  # pragma: no cover - the extra is installed with the tests
        raise ImportError(
            "the slop measures need wordfreq (a human word-frequency baseline): pip install 'backtrack-sampler[quality]'"
        ) from error
    return max(word_frequency(text, "en"), _FLOOR)


def stem(word: str) -> str:
    """The word without one common inflection suffix (whispered -> whisper), when 4 letters or more stay."""
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= _MIN_STEM:
            return word[: -len(suffix)]
    return word


def _noun(word: str) -> str:
    """The word without a possessive 's."""
    return word[:-2] if word.endswith(("'s", "\u2019s")) and len(word) > 2 else word


def runs(text: str) -> List[List[str]]:
    """The runs of words of ``text`` (lower-cased; punctuation and line breaks end a run)."""
    return [words_of(m.group()) for m in _RUN.finditer(text)]


class _Counts:
    """Occurrences and documents of every n-gram (n <= max_words) of a set of texts; a document is
    a group of texts (``groups[i]``: text i's; by default each text is its own)."""

    def __init__(self, texts: Sequence[str], max_words: int, groups: Optional[Sequence[Hashable]] = None):
        self.count: Counter = Counter()
        self.docs: Counter = Counter()
        self.total = 0
        self.where: Dict[str, Set[int]] = {}  # word -> the documents it is in
        keys: Dict[Hashable, int] = {}
        seen: Dict[int, Set[Tuple[str, ...]]] = {}
        for index, text in enumerate(texts):
            doc = keys.setdefault(groups[index] if groups is not None else index, len(keys))
            grams = seen.setdefault(doc, set())
            for run in runs(text):
                for word in run:
                    self.where.setdefault(word, set()).add(doc)
                self.total += len(run)
                for n in range(1, max_words + 1):
                    for i in range(len(run) - n + 1):
                        gram = tuple(run[i : i + n])
                        self.count[gram] += 1
                        grams.add(gram)
        for grams in seen.values():
            self.docs.update(grams)


def profile(
    texts: Sequence[str],
    prompts: Iterable[str] = (),
    min_count: int = 3,
    min_docs: int = 3,
    min_ratio: float = 20.0,
    max_words: int = 4,
    baseline: Callable[[str], float] = human_frequency,
    groups: Optional[Sequence[Hashable]] = None,
) -> List[Entry]:
    """The over-represented words, phrases and word families of ``texts``, ranked (see the module
    docstring). ``groups``: text i's prompt (any key), when a prompt has several outputs: then
    ``min_docs`` and an entry's ``docs`` count distinct prompts, not outputs."""
    counts = _Counts(texts, max_words, groups)
    if not counts.total:
        return []
    asked = {stem(w) for prompt in prompts for w in words_of(prompt)}
    per_word = 1.0 / counts.total

    def ratio(gram: Tuple[str, ...]) -> float:  # a possessive is measured as its noun (generous)
        return counts.count[gram] * per_word / baseline(" ".join(map(_noun, gram)))

    def passes(count: int, docs: int, ratio: float) -> bool:
        return count >= min_count and docs >= min_docs and ratio >= min_ratio

    families = _families(counts, asked, baseline, passes)
    covered = {w for family in families for w in family.members}
    common = [g for g, c in counts.count.items() if len(g) > 1 and c >= min_count and counts.docs[g] >= min_docs]
    asked_words = {w for w in {w for g in common for w in g} if stem(_noun(w)) in asked}
    prompted = {w for w in asked_words if baseline(w) < _FUNCTION}  # content words of the prompts
    common = [g for g in common if not prompted.intersection(g)]
    frequent = [g for g in common if ratio(g) >= min_ratio]  # (the baseline is looked up for these only)
    in_phrase: Dict[str, int] = {}  # word -> the most occurrences of one passing phrase that holds it
    for gram in frequent:
        for word in set(gram):
            in_phrase[word] = max(in_phrase.get(word, 0), counts.count[gram])
    words: Dict[str, Entry] = {}
    for gram, count in counts.count.items():
        word = gram[0]
        if len(gram) > 1 or stem(_noun(word)) in asked or word in covered or not any(c.isalpha() for c in word):
            continue
        if in_phrase.get(word, 0) >= _IN_PHRASE * count:  # over-used in one phrase: ban that, not the word
            continue
        entry = Entry(word, "phrase", count, counts.docs[gram], ratio(gram))
        if passes(entry.count, entry.docs, entry.ratio):
            words[word] = entry
    chosen: List[Entry] = [*families, *words.values()]
    banned = set(words) | covered
    phrases: Set[Tuple[str, ...]] = set()
    for gram in sorted(frequent, key=len):  # shorter first: a longer phrase around a banned one is left out
        if banned.intersection(gram) or any(
            gram[i : i + k] in phrases for k in range(2, len(gram)) for i in range(len(gram) - k + 1)
        ):
            continue
        chosen.append(Entry(" ".join(gram), "phrase", counts.count[gram], counts.docs[gram], ratio(gram)))
        phrases.add(gram)
    return sorted(chosen, key=lambda e: (-e.score, e.pattern))


def _families(counts: _Counts, asked: Set[str], baseline: Callable[[str], float], passes) -> List[Entry]:
    """The word families (two forms or more of one stem) that pass as a whole."""
    forms: Dict[str, List[str]] = {}
    for (word,) in (g for g in counts.count if len(g) == 1):
        if stem(word) not in asked and word.isalpha():
            forms.setdefault(stem(word), []).append(word)
    families = []
    for root, members in forms.items():
        if len(members) < 2:
            continue
        count = sum(counts.count[(w,)] for w in members)
        docs = len(set().union(*(counts.where[w] for w in members)))
        ratio = count / counts.total / sum(baseline(w) for w in members)
        if passes(count, docs, ratio):
            families.append(Entry(family_pattern(root), "regex", count, docs, ratio, tuple(sorted(members))))
    return families


INFLECTIONS = "e|s|es|d|ed|ing|er|ers|y|ly"  # what a family's regex lets follow its stem


def family_pattern(root: str) -> str:
    """The regex of a word family: its stem and an inflection, as a whole word ("whisper",
    "whispers", "whispered", "whisperer", but not "star" -> "start" or "linger" -> "lingerie")."""
    return rf"\b{root}(?:{INFLECTIONS})?(?:\b|_)"  # "_": a word ends there as profile reads words


def family_forms(entry: Entry) -> List[str]:
    """The words a family's regex bans, as phrases (for soft bans, which take phrases only): its
    stem, the stem and every inflection, and the forms it was seen as; a phrase entry is itself."""
    if entry.kind != "regex":
        return [entry.pattern]
    found = re.match(r"\\b(\w+)\(\?:", entry.pattern)
    if found is None:
        return list(entry.members)
    root = found.group(1)
    return sorted({root, *(root + ending for ending in INFLECTIONS.split("|")), *entry.members})


def hits(text: str, entries: Sequence[Entry]) -> int:
    """Occurrences of the entries in ``text``, each entry's counted as ``profile`` counts them
    (case-insensitive; overlapping ones too: "light light light" holds "light light" twice)."""
    return sum(len(_pattern(e.regex()).findall(text)) for e in entries)


@lru_cache(maxsize=4096)
def _pattern(regex: str) -> re.Pattern:
    return re.compile(f"(?=(?:{regex}))", re.IGNORECASE)  # a lookahead: every start, overlapping or not
