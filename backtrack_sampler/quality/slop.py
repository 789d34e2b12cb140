"""Slop measures over a set of finished outputs, each with a bootstrap confidence interval.

Every measure is a ratio of per-output sums, ``sum(numerator) / sum(denominator) * scale``, so an
interval comes from resampling the outputs (``bootstrap``), and two sets compare by resampling
each (``compare``: the interval of the difference). Words are the detector's (``words_of``:
lower-cased, punctuation ignored).

* ``overrep_per_1k``: occurrences of over-represented words per 1,000 words. A word is
  over-represented (the antislop paper's profiling, arXiv 2510.15061) when it occurs at least
  ``min_count`` times in the set and its frequency there is at least ``min_ratio`` times its
  frequency in human text: ``wordfreq``'s English baseline (``pip install
  backtrack-sampler[quality]``), floored at 1e-7 for words it does not know.
* ``overrep_phrases_per_1k``: occurrences of the set's own over-represented words, phrases and word
  families (``mine.profile`` with its defaults: what ``slop mine`` would ban in these outputs) per
  1,000 words. The prompts' words (and phrases holding one) are left out, as the miner leaves them
  out, when the prompts are known: ``Output.prompt``, or ``prompts`` given to ``score``.
* ``cross_ngrams_per_1k``: word ``n``-grams (3) that occur in at least ``min_docs`` (3) different
  outputs, per 1,000 words: a phrase that recurs across unrelated prompts (a story opening, a
  stock image) rather than a repeat inside one text.
* ``not_x_but_y_per_1k``: the "not X, but Y" family per 1,000 characters (``NOT_X_BUT_Y``:
  "not X, but Y", "not just X, but Y", "isn't X, it's Y", "It's not X. It's Y", "not X; rather Y").
* ``mattr``: moving-average type-token ratio (Covington & McFall 2010): the mean share of unique
  words over every window of 500 words (the whole text when shorter), averaged over outputs.
* ``loops``: the share of outputs that loop: ``is_degenerate`` (``repeats``), the definition
  ``RepetitionStrategy`` uses, near-repeats included.
* ``early_endings``: the share of outputs that stopped (``finish_reason`` "stop") with fewer than
  ``early_words`` (50) words.
* ``rewind_endings`` (only when the outputs say, ``Output.rewind_ending``): the share of outputs whose
  end-of-text was drawn where a rewind had gone back to, or within 2 tokens after it: an ending a
  rewind may have caused.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .mine import hits, human_frequency, profile
from .repeats import is_degenerate, words_of

NOT_X_BUT_Y = re.compile(
    r"\b(?:not|never|no\s+longer|is\s*n[o']t|was\s*n[o']t|are\s*n[o']t|were\s*n[o']t|do(?:es)?\s*n[o']t|did\s*n[o']t)"
    r"\s+(?:just|only|merely|simply|about)?\b[^.!?;\n]{1,80}?[,;:.\u2014\u2013]\s*"
    r"(?:but|rather|instead|it['\u2019]?s|it\s+is|it\s+was|they['\u2019]?re|they\s+are|this\s+is)\b",
    re.IGNORECASE,
)
Pairs = List[Tuple[float, float]]  # per output: (numerator, denominator)


@dataclass(frozen=True)
class Output:
    """One generation: its text and, when known, why it stopped (``"stop"``, ``"length"``) and its
    prompt (the request's text: its words are not counted as over-represented)."""

    text: str
    finish_reason: Optional[str] = None
    rewind_ending: Optional[bool] = None  # it ended (EOS) at or just after a rewind's position
    prompt: Optional[str] = None


@dataclass(frozen=True)
class Estimate:
    """A measure's value on the whole set and its bootstrap interval (``low``, ``high``)."""

    value: float
    low: float
    high: float


def overrepresented(
    texts: Sequence[str],
    min_count: int = 3,
    min_ratio: float = 20.0,
    baseline: Callable[[str], float] = human_frequency,
) -> Dict[str, float]:
    """The words of ``texts`` that are over-represented: word -> ratio of its frequency here to the
    baseline's, for words seen ``min_count`` times or more and ``min_ratio`` times or more as often."""
    counts = Counter(w for text in texts for w in words_of(text))
    total = sum(counts.values())
    ratios = {w: c / total / baseline(w) for w, c in counts.items() if c >= min_count}
    return {w: r for w, r in sorted(ratios.items(), key=lambda kv: -kv[1]) if r >= min_ratio}


def cross_ngrams(texts: Sequence[str], n: int = 3, min_docs: int = 3) -> Dict[Tuple[str, ...], int]:
    """Word n-grams found in at least ``min_docs`` different texts: n-gram -> how many texts."""
    docs: Counter = Counter()
    for text in texts:
        words = words_of(text)
        docs.update({tuple(words[i : i + n]) for i in range(len(words) - n + 1)})
    return {gram: d for gram, d in docs.most_common() if d >= min_docs}


def mattr(text: str, window: int = 500) -> float:
    """Moving-average type-token ratio over ``window``-word windows (the TTR when shorter; 0 if empty)."""
    words = words_of(text)
    if len(words) <= window:
        return len(set(words)) / len(words) if words else 0.0
    counts = Counter(words[:window])
    unique = len(counts)
    summed = float(unique)
    for new, old in zip(words[window:], words):  # slide by one word: add the new, drop the oldest
        counts[new] += 1
        unique += counts[new] == 1
        counts[old] -= 1
        unique -= counts[old] == 0
        summed += unique
    return summed / (len(words) - window + 1) / window


def measure_pairs(
    outputs: Sequence[Output], early_words: int = 50, min_docs: int = 3, n: int = 3, prompts: Sequence[str] = ()
) -> Dict[str, Tuple[Pairs, float]]:
    """Per measure, its per-output (numerator, denominator) pairs and scale (see the module
    docstring); ``prompts`` (with the outputs' own) are left out of ``overrep_phrases_per_1k``."""
    texts = [o.text for o in outputs]
    words = [words_of(t) for t in texts]
    over = overrepresented(texts)
    mined = profile(texts, [*prompts, *(o.prompt for o in outputs if o.prompt)])
    grams = cross_ngrams(texts, n, min_docs)
    lengths = [float(len(w)) for w in words]
    pairs: Dict[str, Tuple[Pairs, float]] = {
        "overrep_per_1k": ([(float(sum(x in over for x in w)), k) for w, k in zip(words, lengths)], 1000.0),
        "overrep_phrases_per_1k": ([(float(hits(t, mined)), k) for t, k in zip(texts, lengths)], 1000.0),
        "cross_ngrams_per_1k": (
            [
                (float(sum(tuple(w[i : i + n]) in grams for i in range(len(w) - n + 1))), k)
                for w, k in zip(words, lengths)
            ],
            1000.0,
        ),
        "not_x_but_y_per_1k": ([(float(len(NOT_X_BUT_Y.findall(t))), float(len(t))) for t in texts], 1000.0),
        "mattr": ([(mattr(t), 1.0) for t in texts], 1.0),
        "loops": ([(float(is_degenerate(t)), 1.0) for t in texts], 1.0),
        "early_endings": (
            [(float(o.finish_reason == "stop" and len(w) < early_words), 1.0) for o, w in zip(outputs, words)],
            1.0,
        ),
    }
    if any(o.rewind_ending is not None for o in outputs):
        pairs["rewind_endings"] = ([(float(bool(o.rewind_ending)), 1.0) for o in outputs], 1.0)
    return pairs


def _ratio(pairs: Pairs, scale: float) -> float:
    den = sum(d for _, d in pairs)
    return sum(n for n, _ in pairs) / den * scale if den else 0.0


def bootstrap(
    pairs: Pairs, scale: float, other: Optional[Pairs] = None, rounds: int = 1000, level: float = 0.95, seed: int = 0
) -> Estimate:
    """The ratio measure and its percentile bootstrap interval (outputs resampled with
    replacement, ``rounds`` times); with ``other``: the difference ``pairs - other``, each set
    resampled on its own."""
    rng = random.Random(seed)

    def value(a: Pairs, b: Optional[Pairs]) -> float:
        return _ratio(a, scale) - (_ratio(b, scale) if b is not None else 0.0)

    draws = sorted(
        value(rng.choices(pairs, k=len(pairs)), rng.choices(other, k=len(other)) if other else None)
        for _ in range(rounds if pairs else 0)
    )
    point = value(pairs, other)
    if not draws:
        return Estimate(point, point, point)
    tail = (1 - level) / 2
    return Estimate(point, draws[int(tail * (len(draws) - 1))], draws[int(round((1 - tail) * (len(draws) - 1)))])


def score(
    outputs: Sequence[Output], rounds: int = 1000, prompts: Sequence[str] = (), **options: int
) -> Dict[str, Estimate]:
    """Every measure of ``outputs`` with its 95% bootstrap interval (``prompts``: see ``measure_pairs``)."""
    pairs = measure_pairs(outputs, prompts=prompts, **options)
    return {name: bootstrap(p, s, rounds=rounds) for name, (p, s) in pairs.items()}


def compare(
    a: Sequence[Output], b: Sequence[Output], rounds: int = 1000, prompts: Sequence[str] = (), **options: int
) -> Dict[str, Estimate]:
    """Every measure of ``b`` minus that of ``a`` (those both have), with the 95% bootstrap interval
    of the difference (``prompts``, with each set's own: see ``measure_pairs``)."""
    pa, pb = measure_pairs(a, prompts=prompts, **options), measure_pairs(b, prompts=prompts, **options)
    return {
        name: bootstrap(pb[name][0], scale, pa[name][0], rounds=rounds) for name, (_, scale) in pa.items() if name in pb
    }
