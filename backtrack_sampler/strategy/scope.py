"""Reasoning scopes: a strategy that acts only inside a model's reasoning (``<think>`` ... ``</think>``),
only on the answer after it, or on both.

    scoped = ScopedStrategy(provider, AntiSlopStrategy(provider, ["delve"]), scope="answer")

``ReasoningTracker`` finds the reasoning span from the markers in the text (or their token ids, for
markers that are one special token); ``ScopedStrategy`` shows its strategy only the tokens of its
scope, as if they were the whole continuation, and maps its rewinds and keep index back. A rewind
into the reasoning re-opens it (the span is recomputed from the tokens kept).
"""

from __future__ import annotations

import re
import sys
from bisect import bisect_left
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np

from ..provider.base_provider import BaseProvider
from ..provider.text import TextView
from .base_strategy import BaseStrategy, Capabilities

Scope = Literal["reasoning", "answer", "both"]
SCOPES: Tuple[str, ...] = ("reasoning", "answer", "both")
# (opening, closing) markers of current reasoning models' chat templates: Qwen3, QwQ, DeepSeek-R1,
# SmolLM3, GLM (<think>), Magistral ([THINK]), Seed-OSS (<seed:think>), Kimi (◁think▷), Claude-style prompts
REASONING_MARKERS: Tuple[Tuple[str, str], ...] = (
    ("<think>", "</think>"),
    ("[THINK]", "[/THINK]"),
    ("<seed:think>", "</seed:think>"),
    ("◁think▷", "◁/think▷"),
    ("<thinking>", "</thinking>"),
)


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    return scope


def prompt_opens_reasoning(provider: BaseProvider, prompt: Sequence[int], markers=REASONING_MARKERS) -> bool:
    """Whether a prompt leaves a reasoning block open (a chat template that starts the model's turn
    with ``<think>``): its last marker within its last 32 tokens opens one (a one-token marker
    by id, else in the decoded text)."""
    tail = list(prompt)[-32:]
    ids = marker_ids(provider, markers)
    found = [ids[token] for token in tail if token in ids]
    if found:
        return found[-1]
    text = provider.decode(tail)
    last = max(
        ((text.rfind(m), opens) for pair in markers for m, opens in zip(pair, (True, False))), default=(-1, False)
    )
    return last[0] >= 0 and last[1]


def single_token(provider: BaseProvider, text: str) -> Optional[int]:
    """The id of ``text`` when it is one token of the vocabulary, else None."""
    try:
        ids = provider.encode(text, add_special_tokens=False)
    except ValueError:  # a tokenizer that cannot write it at all
        return None
    return ids[0] if len(ids) == 1 else None


def marker_ids(provider: BaseProvider, markers=REASONING_MARKERS) -> Dict[int, bool]:
    """{token id: whether it opens a block} for the markers that are one token of this vocabulary."""
    ids = {}
    for pair in markers:
        for marker, opens in zip(pair, (True, False)):
            token = single_token(provider, marker)
            if token is not None:
                ids[token] = opens
    return ids


def single_token_markers(provider: BaseProvider, markers=REASONING_MARKERS) -> List[Tuple[str, str]]:
    """The markers this model's vocabulary has as single tokens (a reasoning model's own)."""
    return [pair for pair in markers if all(single_token(provider, m) is not None for m in pair)]


def default_scope(name: str, provider: BaseProvider) -> str:
    """A strategy's scope when none is given: "answer" for structured output (the grammar) on a
    model whose vocabulary has reasoning markers (as vLLM applies structured output after the
    reasoning), else "both" (bans act everywhere)."""
    return "answer" if name == "grammar" and single_token_markers(provider) else "both"


def scoped(provider: BaseProvider, strategy: BaseStrategy, scope: str, prompt: Sequence[int] = ()) -> BaseStrategy:
    """``strategy`` on ``scope`` only: itself for "both", else a ``ScopedStrategy`` (that starts
    inside the reasoning when the ``prompt`` tokens leave a block open)."""
    if check_scope(scope) == "both":
        return strategy
    return ScopedStrategy(provider, strategy, scope, starts_in_reasoning=prompt_opens_reasoning(provider, prompt))  # type: ignore[arg-type]


BEFORE, INSIDE, AFTER = 0, 1, 2  # no answer text yet / in a reasoning block / the answer has begun


class ReasoningTracker:
    """Follows a continuation and tells, for every token, whether it belongs to the reasoning.

    A token belongs to the reasoning when the text before it is inside a reasoning block, or when it
    completes an opening marker; the closing marker's last token still belongs to it. As vLLM's
    reasoning parsers read it, the reasoning comes first: a marker in the text counts while no
    answer text has been written (an opening one) or inside the block (a closing one), so a
    literal "<think>" in an answer is text; a marker that is one token (the model's own special
    token, which may not even decode) counts wherever it comes. ``starts_inside``: the prompt
    left a reasoning block open."""

    def __init__(
        self, provider: BaseProvider, markers: Sequence[Tuple[str, str]] = REASONING_MARKERS, starts_inside=False
    ):
        self.markers = [tuple(pair) for pair in markers]
        if not self.markers or not all(len(p) == 2 and all(isinstance(m, str) and m for m in p) for p in self.markers):
            raise ValueError("markers must be (opening, closing) pairs of non-empty strings")
        self.starts_inside = bool(starts_inside)
        self._ids = marker_ids(provider, self.markers)
        self._opens = {m: opens for pair in self.markers for m, opens in zip(pair, (True, False))}
        self._openers = [opening for opening, _ in self.markers]
        self._pattern = re.compile("|".join(re.escape(m) for m in sorted(self._opens, key=len, reverse=True)))
        self._longest = max(map(len, self._opens))
        self.opening_ids = [token for token, opens in self._ids.items() if opens]
        self.view = TextView(provider.decode)
        self.reset()

    def reset(self) -> None:
        self.view.reset()
        self._after: List[int] = []  # BEFORE, INSIDE or AFTER, after token i
        self._scanned = 0  # characters of view.text searched for markers

    def _state(self, position: int) -> int:
        if position <= 0 or not self._after:
            return INSIDE if self.starts_inside else BEFORE
        return self._after[min(position, len(self._after)) - 1]

    def inside(self, position: int) -> bool:
        """Whether the text before token ``position`` is inside a reasoning block."""
        return self._state(position) == INSIDE

    def in_reasoning(self, position: int) -> bool:
        """Whether token ``position`` (seen already) belongs to the reasoning."""
        return self.inside(position) or self._after[position] == INSIDE

    def kept(self, tokens: Sequence[int]) -> int:
        """How many of the tokens followed so far ``tokens`` keeps (the rest were rewound)."""
        known = len(self._after)
        if len(tokens) >= known and (not known or tokens[known - 1] == self.view.tokens[known - 1]):
            if known < 2 or list(tokens[: known - 1]) == self.view.tokens[: known - 1]:
                return known
        return next((i for i, (a, b) in enumerate(zip(self.view.tokens, tokens)) if a != b), min(known, len(tokens)))

    def update(self, tokens: Sequence[int]) -> None:
        """Follow ``tokens`` (the whole continuation; a shorter or different one rewinds first)."""
        known = self.kept(tokens)
        if known < len(self._after):
            self.rewind(known)
        for i in range(known, len(tokens)):
            self.view.update(tokens[: i + 1])
            state = self._state(i)
            start = max(0, self._scanned - self._longest + 1)
            for match in self._pattern.finditer(self.view.text, start):
                opens = self._opens[match.group()]
                if match.end() > self._scanned and state == (BEFORE if opens else INSIDE):
                    state = INSIDE if opens else AFTER
            if tokens[i] in self._ids:
                state = INSIDE if self._ids[tokens[i]] else AFTER
            elif (
                state == BEFORE
                and self.view.text.strip()
                and not any(m.startswith(self.view.text.strip()) for m in self._openers)
            ):
                state = AFTER  # answer text (not the start of an opening marker)
            self._scanned = len(self.view.text)
            self._after.append(state)

    def rewind(self, position: int) -> None:
        """Forget the tokens from ``position`` on (the span is what the tokens kept make it)."""
        del self._after[position:]
        self._scanned = min(self._scanned, self.view.rewind(position))


class ScopedStrategy(BaseStrategy):
    """Runs ``strategy`` on one part of a reasoning model's output only: ``scope`` "reasoning"
    (inside ``<think>`` ... ``</think>``, markers included), "answer" (the rest) or "both".

    provider: the sampler's provider (to decode the text the markers are found in).
    strategy: the strategy to scope. It sees only the tokens of its scope, as one continuation:
        banned phrases do not match across the boundary, a grammar starts where the answer starts.
    scope: "reasoning", "answer" or "both" (then it is ``strategy`` itself, only slower).
    markers: (opening, closing) pairs; default ``REASONING_MARKERS`` (``<think>``, ``[THINK]``, ...).
    starts_in_reasoning: the prompt left a reasoning block open (``prompt_opens_reasoning``;
        chat templates that start the model's turn with ``<think>`` do).

    On the answer, while no answer token has come yet, an opening marker that is one token stays
    possible whatever the strategy masks (a grammar on the answer lets the model reason first); a
    hard constraint on the answer (a grammar) forbids ending inside the reasoning, and is told its
    token limit again when the answer begins (``on_start``: what is left of it then). A marker
    written in several tokens counts once it is whole: the tokens before that belong to the scope
    they were written in. When the scope ends (the first token after it), its strategy's last
    checks run (``on_end``), its tokens become final and it is done: one span per scope, as vLLM
    reads one reasoning block (a rewind into the span re-opens it).
    """

    def __init__(
        self,
        provider: BaseProvider,
        strategy: BaseStrategy,
        scope: Scope = "answer",
        markers: Optional[Sequence[Tuple[str, str]]] = None,
        starts_in_reasoning: bool = False,
    ):
        if not isinstance(strategy, BaseStrategy):
            raise TypeError(f"strategy must be a BaseStrategy, got {type(strategy).__name__}")
        self.strategy, self.scope = strategy, check_scope(scope)
        self.tracker = ReasoningTracker(provider, markers or REASONING_MARKERS, starts_in_reasoning)
        self._eos = sorted(provider.eos_token_ids)
        self.reset()

    @property
    def capabilities(self) -> Capabilities:
        return self.strategy.capabilities

    @property
    def hard_constraint(self) -> bool:  # type: ignore[override]
        return self.strategy.capabilities.hard

    def reset(self) -> None:
        self.strategy.reset()
        self.tracker.reset()
        self._positions: List[int] = []  # the continuation positions of the tokens in scope
        self._scoped: List[int] = []  # those tokens
        self._seen = 0  # continuation tokens classified
        self._limit: Optional[int] = None
        self._told = 0  # the position the strategy's on_start limit counts from
        self._ended_at: Optional[int] = None  # the first token after the scope, once it ended
        self.rewind_reason = None

    def on_start(self, limit: int) -> None:
        self._limit = limit
        self.strategy.on_start(limit)

    # --- which tokens are in scope ------------------------------------------------------------
    def _in_scope(self, reasoning: bool) -> bool:
        return self.scope == "both" or (self.scope == "reasoning") == reasoning

    def _follow(self, tokens: List[int]) -> List[int]:
        """Bring the tracker and the scope's positions up to ``tokens``; the scope's tokens."""
        kept = self.tracker.kept(tokens)
        if kept < self._seen:  # rewound without on_rewind
            self.on_rewind(kept)
        self.tracker.update(tokens)
        for i in range(self._seen, len(tokens)):
            if self._ended_at is not None:
                continue  # one span per scope: the strategy is done until a rewind re-opens it
            if self._in_scope(self.tracker.in_reasoning(i)):
                self._positions.append(i)
                self._scoped.append(tokens[i])
            elif self._positions and self._positions[-1] == i - 1:
                self._ended_at = i
        self._seen = len(tokens)
        return self._scoped

    def _position(self, count: int) -> int:
        """The continuation position of the scope's token ``count`` (its length when past the end)."""
        return self._positions[count] if count < len(self._positions) else self._seen

    def _in_scope_last(self) -> bool:
        return bool(self._positions) and self._positions[-1] == self._seen - 1

    # --- the hooks ----------------------------------------------------------------------------
    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        scoped, n = self._follow(continuation_tokens), len(continuation_tokens)
        if not self._in_scope(self.tracker.inside(n)):
            if self.scope == "answer" and self.hard_constraint and len(logits) > max(self._eos, default=-1):
                ended = logits.copy()
                ended[self._eos] = -np.inf  # the answer must come: no end inside the reasoning
                return ended if np.max(ended) > -np.inf else logits
            return logits
        if not scoped and self._limit is not None and n != self._told:  # the scope begins here
            self._told = n
            self.strategy.on_start(max(self._limit - n, 0))
        if self.scope != "answer" or scoped or not self.tracker.opening_ids:
            return self.strategy.on_logits(logits, scoped)
        opening = logits[self.tracker.opening_ids].copy()  # the model may still open its reasoning
        logits = self.strategy.on_logits(logits, scoped)
        logits[self.tracker.opening_ids] = opening
        return logits

    def on_probs(self, probs: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        if not self._in_scope(self.tracker.inside(len(continuation_tokens))):
            return probs
        return self.strategy.on_probs(probs, self._follow(continuation_tokens))

    def on_next_token(self, continuation_tokens: List[int], probs: Optional[np.ndarray]) -> None:
        scoped = self._follow(continuation_tokens)
        if self._in_scope_last():
            self.strategy.on_next_token(scoped, probs)

    def backtrack(self, continuation_tokens: List[int]) -> List[int]:
        scoped = self._follow(continuation_tokens)
        if self._in_scope_last():
            return self._through(self.strategy.backtrack, continuation_tokens, scoped)
        if self._ended_at == self._seen - 1:  # the scope just ended: its last checks
            return self._through(self.strategy.on_end, continuation_tokens, scoped)
        return continuation_tokens

    def on_end(self, continuation_tokens: List[int]) -> List[int]:
        scoped = self._follow(continuation_tokens)
        return (
            self._through(self.strategy.on_end, continuation_tokens, scoped)
            if self._in_scope_last()
            else continuation_tokens
        )

    def _through(self, hook, tokens: List[int], scoped: List[int]) -> List[int]:
        kept = hook(list(scoped))
        if len(kept) >= len(scoped):
            return tokens
        self.rewind_reason = self.strategy.rewind_reason
        position = self._position(len(kept))
        self._cut(position)
        return tokens[:position]

    def _cut(self, position: int) -> None:
        self.tracker.rewind(position)
        count = bisect_left(self._positions, position)
        del self._positions[count:], self._scoped[count:]
        self._seen = min(self._seen, position)
        if self._ended_at is not None and position <= self._ended_at:
            self._ended_at = None

    def get_keep_index(self) -> int:
        if not self._in_scope_last():  # out of the scope: what it wrote is final (its last checks ran)
            return self._seen
        keep = self.strategy.get_keep_index()
        return keep if keep == sys.maxsize else self._position(max(keep, 0))

    def on_rewind(self, position: int) -> None:
        if position < self._seen:
            self.strategy.on_rewind(bisect_left(self._positions, position))
            self._cut(position)
