"""RepetitionStrategy: when the text starts repeating itself verbatim, rewind to where the copy
began and write something else there."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set, Tuple

import numpy as np

from ..provider.base_provider import BaseProvider
from ..provider.text import TextView, text_after
from ..quality import Repeat, RepeatDetector, RepeatRules
from .base_strategy import BaseStrategy

_CANDIDATES = 64  # widening looks at the best this many tokens (the others are too unlikely to matter)


class RepetitionStrategy(BaseStrategy):
    """Rewinds degenerate repetition: loops, repeated word runs and (near-)repeated sentences.

    What counts as a loop is ``RepeatDetector``'s definition (``backtrack_sampler.quality``, also
    used by the quality benchmark and the slop measures), on normalised text (lower-cased,
    punctuation and spacing ignored): a unit of up to ``max_period`` characters repeated back to
    back over ``min_chars`` characters and ``min_repeats`` copies (``symbol_chars`` for a unit
    without letters or digits); the last ``ngram_words`` words already written, in that order,
    within the ``window`` words before; a sentence of at least ``sentence_words`` words written
    before; a run of ``phrase_words`` to 8 words written twice back to back; two sentences in a
    row (of ``near_words`` words or more) each a near-copy of a recent one (the same sentence
    with a word changed, added or dropped: ``quality.NEAR_RATIO`` similar). 0 turns a rule off.

    When a repeat is found, generation rewinds to where the loop began (the copy's first token;
    for near-copies, the first of the run) and that token is excluded there (the text before it
    stays, so one copy of the unit is kept). A repeat that begins within ``episode_tokens`` tokens
    of where the loop began is a retry of the same loop: it rewinds there again (not to its
    latest copy), so the exclusions pile up where the loop began and the model must leave it,
    not vary it. While a loop is being retried, the text from where it began is held back. Each
    retry escalates: from the 2nd on, every likely token whose text would begin a rejected copy
    again is excluded at the position too (the same text through another tokenization), and
    there and for the ``heat_tokens`` tokens after it the distribution is flattened, as if the
    temperature were ``1 + heat * (retry - 1)`` times higher, among the tokens with at least
    ``min_p`` of the best one's probability (more varied, not incoherent). After ``max_retries``
    rewinds the loop is kept (reported to ``on_accept(position, reason)``); repeats that begin
    within ``episode_tokens`` tokens of where it began are kept too, later ones are a new loop.
    So it always ends: a new loop begins more than ``episode_tokens`` tokens after the last one
    began, so there are at most ``max_retries * (1 + max_new_tokens / episode_tokens)`` rewinds.

    Tokens are held back (not final) only while a repeat found later could still begin in them:
    the open run of a loop, the last 7 words, the open sentence, a run of near-copies and a loop
    being retried. Chains with AntiSlop (both rewind; each is told of the other's rewinds). A
    soft constraint: when the sampler's rewind budget runs out it stops rewinding. Sets
    ``rewind_reason`` to e.g. ``repeat: loop '-h' x10``.
    """

    name = "repetition"
    reads_probs = False
    edits_logits = True

    def __init__(
        self,
        provider: BaseProvider,
        *,
        min_chars: int = RepeatRules.min_chars,
        min_repeats: int = RepeatRules.min_repeats,
        max_period: int = RepeatRules.max_period,
        symbol_chars: int = RepeatRules.symbol_chars,
        ngram_words: int = RepeatRules.ngram_words,
        window: int = RepeatRules.window,
        sentence_words: int = RepeatRules.sentence_words,
        phrase_words: int = RepeatRules.phrase_words,
        near_words: int = RepeatRules.near_words,
        max_retries: int = 6,
        heat: float = 0.5,
        heat_tokens: int = 8,
        min_p: float = 0.02,
        episode_tokens: int = 48,
        on_accept: Optional[Callable[[int, str], None]] = None,
    ):
        self.rules = RepeatRules(
            min_chars,
            min_repeats,
            max_period,
            symbol_chars,
            ngram_words,
            window,
            sentence_words,
            phrase_words,
            near_words,
        )
        for key, value in dict(max_retries=max_retries, heat_tokens=heat_tokens, episode_tokens=episode_tokens).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key} must be an int >= 0, got {value!r}")
        if not (isinstance(heat, (int, float)) and heat >= 0):
            raise ValueError(f"heat must be a number >= 0, got {heat!r}")
        if not (isinstance(min_p, (int, float)) and 0 <= min_p < 1):
            raise ValueError(f"min_p must be in [0, 1), got {min_p!r}")
        self.provider, self.max_retries, self.heat, self.min_p = provider, max_retries, float(heat), float(min_p)
        self.heat_tokens, self.episode_tokens, self.on_accept = heat_tokens, episode_tokens, on_accept
        self.view = TextView(provider.decode)
        self.detector = RepeatDetector(self.rules)
        self.reset()

    def reset(self) -> None:
        self.view.reset()
        self.detector.reset()
        self._bans: Dict[int, Set[int]] = {}  # position -> tokens excluded there
        self._rejected: Dict[int, List[str]] = {}  # position -> texts of the copies rejected there
        self._hot: Optional[Tuple[int, int, int]] = None  # (first, end, retry): positions flattened
        self._episode: Optional[List[int]] = None  # [where the current loop began, retries]
        self._keep = 0
        self.rewind_reason = None

    def get_keep_index(self) -> int:
        return self._keep

    # --- the distribution at a position it rewound to -------------------------------------------
    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        position = len(continuation_tokens)
        bans, hot = self._bans.get(position), self._hot
        level = hot[2] if hot is not None and hot[0] <= position < hot[1] else 1
        if not bans and level < 2:
            return logits
        edited = logits.copy()
        if bans:
            edited[list(bans)] = -np.inf
        rejected = self._rejected.get(position) if level >= 2 else None
        if rejected and np.isfinite(np.max(edited)):
            best = (
                np.argpartition(edited, -_CANDIDATES)[-_CANDIDATES:]
                if len(edited) > _CANDIDATES
                else range(len(edited))
            )
            before = continuation_tokens[-1:]
            for token in best:  # the same copy again through another tokenization
                if np.isfinite(edited[token]):
                    piece = text_after(self.provider.decode, before, [int(token)])
                    if piece and any(copy.startswith(piece) for copy in rejected):
                        edited[token] = -np.inf
        top = float(np.max(edited))
        if not np.isfinite(top):  # everything excluded: leave it to the next retry
            return logits
        if level >= 2:
            if self.min_p > 0:  # min-p among what is left, on the model's own distribution
                edited[edited < top + np.float32(np.log(self.min_p))] = -np.inf
            finite = np.isfinite(edited)
            scale = np.float32(1.0 / (1.0 + self.heat * (level - 1)))
            edited[finite] = top + (edited[finite] - top) * scale  # hotter, among the likely ones
        return edited

    # --- finding repeats ---------------------------------------------------------------------
    def backtrack(self, continuation_tokens: List[int]) -> List[int]:
        at_end = bool(continuation_tokens) and continuation_tokens[-1] in self.provider.eos_token_ids
        return self._check(continuation_tokens, at_end)

    def on_end(self, continuation_tokens: List[int]) -> List[int]:
        return self._check(continuation_tokens, True)

    def _check(self, tokens: List[int], at_end: bool) -> List[int]:
        view, detector = self.view, self.detector
        piece = view.update(tokens, at_end=at_end)
        before = len(view.text) - len(piece)
        if before < len(detector.text):  # the view rewound (tokens changed under it)
            detector.rewind(before)
        found = detector.extend(piece, at_end=at_end) if piece or at_end else None
        if found is not None:
            tokens = self._on_repeat(tokens, found)
        hold = min(view.token_at(detector.hold), view.committed)
        episode = self._episode
        if episode is not None and len(tokens) <= episode[0] + 2 * self.episode_tokens:
            hold = min(hold, episode[0])  # a loop being retried: keep where it began rewindable
        self._keep = max(self._keep, min(hold, len(tokens)))
        return tokens

    def _on_repeat(self, tokens: List[int], repeat: Repeat) -> List[int]:
        position = max(self.view.token_at(repeat.start), self._keep)
        if position >= len(tokens):
            return tokens
        reason = f"repeat: {repeat.describe(self.detector.text)}"
        episode = self._episode
        if episode is not None and position - episode[0] <= self.episode_tokens:
            episode[1] += 1  # a retry of the same loop: back to where it began
            position = max(min(position, episode[0]), self._keep)
        else:
            episode = self._episode = [position, 1]
        if episode[1] > self.max_retries:  # kept: repeats near it are kept too
            if episode[1] == self.max_retries + 1:
                self._accept(position, reason)
            return tokens
        episode[0] = position
        copy = self.view.text[self.view.offset(position) : repeat.end]
        self._drop_after(position)
        self._bans.setdefault(position, set()).add(tokens[position])
        self._rejected.setdefault(position, []).append(copy)
        if episode[1] >= 2:
            self._hot = (position, position + 1 + self.heat_tokens, episode[1])
        self.rewind_reason = reason
        self._rewind(position)
        return tokens[:position]

    def _accept(self, position: int, reason: str) -> None:
        if self.on_accept is not None:
            self.on_accept(position, reason)

    # --- rewinds -----------------------------------------------------------------------------
    def _rewind(self, position: int) -> None:
        self.detector.rewind(self.view.rewind(position))

    def on_rewind(self, position: int) -> None:
        if position < len(self.view.tokens):  # rewound by another strategy (or the driver)
            self._drop_after(position)
            self._rewind(position)
            self._keep = min(self._keep, position)

    def _drop_after(self, position: int) -> None:
        for state in (self._bans, self._rejected):  # they depended on the text being replaced
            for later in [p for p in state if p > position]:
                del state[later]
        if self._hot is not None and self._hot[0] > position:
            self._hot = None
