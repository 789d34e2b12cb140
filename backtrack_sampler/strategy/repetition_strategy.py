"""RepetitionStrategy: when the text starts repeating itself verbatim, rewind to where the copy
began and write something else there."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set

import numpy as np

from ..provider.base_provider import BaseProvider
from ..quality import Repeat, RepeatDetector, RepeatRules
from ..text import TextView, text_after
from .base_strategy import BaseStrategy

_CANDIDATES = 64  # widening looks at the best this many tokens (the others are too unlikely to matter)


class RepetitionStrategy(BaseStrategy):
    """Rewinds degenerate repetition: loops, repeated word runs and repeated sentences.

    The decoded text is read through ``RepeatDetector`` (``backtrack_sampler.quality``, the one
    definition of a repeat, also used by the quality benchmark): a unit of up to ``max_period``
    characters repeated back to back over ``min_chars`` characters and ``min_repeats`` copies
    (``symbol_chars`` for a unit without letters or digits); the last ``ngram_words`` words
    already written, in that order, within the ``window`` words before; or a sentence of at least
    ``sentence_words`` words written before. 0 turns a rule off.

    When a repeat is found, generation rewinds to the token where the copy begins and that token
    is excluded there (the text before it stays, so one copy of the unit is kept). A repeat found
    within ``episode_tokens`` tokens of the previous rewind is a retry of the same loop, and each
    retry escalates at its position: from the 2nd on, every likely token whose text would begin the
    rejected copy again is excluded too (the same text through another tokenization), and the
    distribution there is flattened, as if the temperature were ``1 + heat * (retry - 1)`` times
    higher, among the tokens with at least ``min_p`` of the best one's probability (so it gets
    more varied, not incoherent). After ``max_retries`` rewinds the loop is accepted (reported
    to ``on_accept(position, reason)``) until the text has gone ``episode_tokens`` tokens without
    a repeat. So it always ends: at most ``max_retries`` rewinds per loop.

    Tokens are held back (not final) only while a repeat found later could still begin in them:
    the open run of a loop, the last ``ngram_words - 1`` words and a short open sentence.
    Chains with AntiSlop (both rewind; each is told of the other's rewinds). A soft constraint:
    when the sampler's rewind budget runs out it stops rewinding. Sets ``rewind_reason`` to
    e.g. ``repeat: loop '-h' x10``.
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
        max_retries: int = 4,
        heat: float = 0.5,
        min_p: float = 0.02,
        episode_tokens: int = 48,
        on_accept: Optional[Callable[[int, str], None]] = None,
    ):
        self.rules = RepeatRules(min_chars, min_repeats, max_period, symbol_chars, ngram_words, window, sentence_words)
        for key, value in dict(max_retries=max_retries, episode_tokens=episode_tokens).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key} must be an int >= 0, got {value!r}")
        if not (isinstance(heat, (int, float)) and heat >= 0):
            raise ValueError(f"heat must be a number >= 0, got {heat!r}")
        if not (isinstance(min_p, (int, float)) and 0 <= min_p < 1):
            raise ValueError(f"min_p must be in [0, 1), got {min_p!r}")
        self.provider, self.max_retries, self.heat, self.min_p = provider, max_retries, float(heat), float(min_p)
        self.episode_tokens, self.on_accept = episode_tokens, on_accept
        self.view = TextView(provider.decode)
        self.detector = RepeatDetector(self.rules)
        self.reset()

    def reset(self) -> None:
        self.view.reset()
        self.detector.reset()
        self._bans: Dict[int, Set[int]] = {}  # position -> tokens excluded there
        self._level: Dict[int, int] = {}  # position -> retry number of the rewind to it (escalation)
        self._rejected: Dict[int, List[str]] = {}  # position -> texts of the copies rejected there
        self._episode: Optional[List[int]] = None  # [where the last repeat was, retries] of the current loop
        self._keep = 0
        self.rewind_reason = None

    def get_keep_index(self) -> int:
        return self._keep

    # --- the distribution at a position it rewound to -------------------------------------------
    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        position = len(continuation_tokens)
        bans = self._bans.get(position)
        if not bans:
            return logits
        edited = logits.copy()
        edited[list(bans)] = -np.inf
        level = self._level.get(position, 1)
        if level >= 2 and np.isfinite(np.max(edited)):
            best = np.argpartition(edited, -_CANDIDATES)[-_CANDIDATES:] if len(edited) > _CANDIDATES else np.arange(len(edited))
            before, rejected = continuation_tokens[-1:], self._rejected.get(position, ())
            for token in best.tolist():  # the same copy again through another tokenization
                if np.isfinite(edited[token]):
                    piece = text_after(self.provider.decode, before, [token])
                    if piece and any(copy.startswith(piece) for copy in rejected):
                        edited[token] = -np.inf
            top = float(np.max(edited))
            if np.isfinite(top):
                if self.min_p > 0:  # min-p among what is left, on the model's own distribution
                    edited[edited < top + np.float32(np.log(self.min_p))] = -np.inf
                finite = np.isfinite(edited)
                scale = np.float32(1.0 / (1.0 + self.heat * (level - 1)))
                edited[finite] = top + (edited[finite] - top) * scale  # hotter, among the likely ones
        if not np.isfinite(np.max(edited)):  # everything excluded: leave it to the next retry
            return logits
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
        self._keep = max(self._keep, min(hold, len(tokens)))
        return tokens

    def _on_repeat(self, tokens: List[int], repeat: Repeat) -> List[int]:
        position = max(self.view.token_at(repeat.start), self._keep)
        if position >= len(tokens):
            return tokens
        reason = f"repeat: {repeat.describe(self.detector.text)}"
        episode = self._episode
        if episode is not None and position - episode[0] <= self.episode_tokens:
            episode[1] += 1  # a retry of the same loop (the text has not gone far without one)
        else:
            episode = self._episode = [position, 1]
        if episode[1] > self.max_retries:  # accepted, until the text goes on without a repeat
            episode[0] = len(tokens)
            if episode[1] == self.max_retries + 1:
                self._accept(position, reason)
            return tokens
        episode[0] = position
        copy = self.view.text[self.view.offset(position) : repeat.end]
        self._drop_after(position)
        self._bans.setdefault(position, set()).add(tokens[position])
        self._level[position] = max(self._level.get(position, 0), episode[1])
        self._rejected.setdefault(position, []).append(copy)
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
        for state in (self._bans, self._level, self._rejected):  # they depended on the text being replaced
            for later in [p for p in state if p > position]:
                del state[later]
