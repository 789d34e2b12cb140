"""Text-quality measures: the one definition of a degenerate repeat (``repeats``: the detector
``RepetitionStrategy`` runs while generating) and slop measures over finished outputs (``slop``).
A leaf: it imports nothing else of the package."""

from .repeats import (
    NEAR_RATIO,
    Repeat,
    RepeatDetector,
    RepeatRules,
    distinct_n,
    find_repeat,
    find_repeats,
    is_degenerate,
    rep_n,
    repeated_fraction,
    words_of,
)

__all__ = [
    "NEAR_RATIO",
    "Repeat",
    "RepeatDetector",
    "RepeatRules",
    "distinct_n",
    "find_repeat",
    "find_repeats",
    "is_degenerate",
    "rep_n",
    "repeated_fraction",
    "words_of",
]
