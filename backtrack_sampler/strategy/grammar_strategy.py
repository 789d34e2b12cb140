"""GrammarStrategy: structured output (a JSON Schema, a Lark/GBNF grammar or a regex) that follows
every rewind, so it composes with bans: the output is valid for the grammar and free of what the
other strategies ban, or the generation says it cannot be both (finish_reason "constraint").

The grammar engine is llguidance (``pip install 'backtrack-sampler[grammar]'``): it compiles JSON
Schema, Lark (and llama.cpp's GBNF) and regexes, computes the mask of allowed tokens for a whole
vocabulary in tens of microseconds, and rolls back consumed tokens (``LLMatcher.rollback``).
"""

from __future__ import annotations

from typing import Dict, FrozenSet, List, Optional, Set, cast

import numpy as np

from ..provider.base_provider import BaseProvider
from .base_strategy import BaseStrategy, ConstraintError
from .grammar import (
    INSTALL,
    GrammarChecker,
    GrammarError,
    JsonSchema,
    check_grammar,
    grammar_kind,
    grammar_source,
    llguidance_module,
    short_message,
)
from .grammar_paths import Closer, DeadEnds, allowed_mass
from .grammar_tokenizer import tokenizer_for

__all__ = [
    "GrammarStrategy",
    # grammar.py and grammar_tokenizer.py, importable from here as before
    "INSTALL",
    "GrammarChecker",
    "GrammarError",
    "JsonSchema",
    "check_grammar",
    "grammar_source",
    "tokenizer_for",
]


HOLD = 64  # dead ends hold back at most this many tokens
CLOSE_MARGIN = 24  # closing starts when the shortest way to the end leaves this many tokens or fewer
CLOSE_CANDIDATES = 12  # the likeliest tokens checked there


def _ban_unless_empty(logits: np.ndarray, tokens: Set[int]) -> None:
    """-inf for ``tokens`` unless that leaves no token."""
    ids = list(tokens)
    saved = logits[ids].copy()
    logits[ids] = -np.inf
    if not np.max(logits) > -np.inf:
        logits[ids] = saved


# --------------------------------------------------------------------------------------------
# the strategy
# --------------------------------------------------------------------------------------------
class GrammarStrategy(BaseStrategy):
    """Constrained decoding: the text is valid for a JSON Schema, a grammar or a regex, whatever
    else is chained with it.

    json_schema: a JSON Schema (object; ``{}`` is any JSON value); ``{"type": "object"}`` is
        OpenAI's json_object mode. JSON comes out compact (``{"a": 1, "b": 2}``) unless
        ``whitespace_flexible``.
    grammar: a Lark grammar (llguidance's dialect, with ``%json`` and regex terminals) or a
        llama.cpp GBNF grammar (``root ::= ...``).
    regex: the whole text matches it (Rust regex syntax).
    lookback: how many of the last tokens are not final yet: a position where every token the
        grammar allows is banned (by another strategy of the chain, e.g. AntiSlop) rewinds up to
        that many tokens to try another way; past them the generation ends with finish_reason
        "constraint". With ``dead_ends`` the value being written is held back too (below). 0
        streams each token at once (a dead end then ends the generation, and ``dead_ends`` finds
        nothing it may rewind).
    dead_ends: rewind out of the dead ends the grammar pushes the model into (below); False: the
        mask alone (plain masking, as llguidance, xgrammar, Outlines and vLLM do it).
    dead_end_loss: the nats of the model's probability the grammar must refuse within one value
        (over at least 3 steps that each keep less than 0.9 of it) for that value to be a dead end.
    max_retries: dead-end rewinds to one position before trying the one before it.
    max_rewinds: dead-end rewinds in one generation; then the text is kept as it goes.
    close_at_limit: when the token limit comes near, keep to the tokens that still let the grammar
        be complete within it (the shortest way llguidance's matcher finds), so that the text ends
        valid instead of being cut.

    Each step masks the logits to the tokens the grammar allows (llguidance's bitmask applied with
    vectorised numpy: about half a millisecond on a 262k vocabulary). Each token is consumed by
    the matcher, and every rewind, by any strategy of a chain or the driver, rolls it back
    (``on_rewind``). When the grammar is complete only end-of-sequence tokens are allowed, so the
    generation ends there (finish_reason "stop"); a token limit that comes first ends it with
    "length" and the text is unfinished (as OpenAI's). A dead end (nothing allowed is left
    unbanned) samples a placeholder end-of-sequence token and ``backtrack`` rewinds it and the
    token before, which is banned at its position; the ban holds until an earlier rewind. A token
    the grammar refuses (from a driver that did not mask, or a strategy after this one that
    changed the logits) is rewound and banned the same way: the final text is always a prefix of
    a valid one, and when it ends with "stop" it is valid.

    Dead ends: plain masking samples each token from the model's distribution restricted to what
    the grammar allows, so where the grammar refuses what the model wants (a fourth item of a
    ``maxItems: 3`` array) the model is pushed down a path it would not take, and a small model
    then writes on inside a string it cannot close the way it wants. The target here is the
    model's distribution conditioned on the whole text being valid, which weights each choice by
    how likely its continuations are to stay valid; plain masking ignores that weight, and this
    approximates it with one sequence: at each step it measures the model's probability the
    grammar allows (before the mask), and a JSON value (string or number; for another grammar the
    text since the last step it did not refuse much) that keeps losing it (``dead_end_loss``) is a
    dead end: the text rewinds to the value's first free token, or to the free anchor before it
    (the separator or quote that opened it), and the token taken there is banned there (as AntiSlop
    does, ``max_retries`` per position, ``max_rewinds`` per generation; a ban that would leave no
    token is not applied). When none is left the value is kept: the text stays valid, as with plain
    masking. The tokens of the value being written and of the anchor before it are held back (not
    final) for that, up to 64 tokens.

    Budget-aware closing (``close_at_limit``): the strategy learns the generation's token limit
    (``on_start``); when the shortest way to a complete text (a greedy walk of the matcher: forced
    tokens, else quotes and closing brackets first) nearly fills the tokens left, only the model's
    likeliest tokens after which that way still fits are kept (at least the walk's first), so the
    text ends complete, with finish_reason "stop"; "length" and an unfinished text only when even
    the shortest way does not fit.

    Chain it after the strategies that edit logits (the server and the command line put it last):
    then its mask is the last word on what can be sampled, and a dead end is found at once (first
    in a chain, AntiSlop may find it later, or give up: its keep index does not know the grammar).

    Through a serving engine (``EngineProvider``, ``candidates_only``) the logits hold the engine's
    K candidates only: the grammar chooses among those it allows; a token it forces (the only one
    it allows, e.g. a key name of the schema, or the end once the JSON is complete) is taken even
    when it is not a candidate (its probability under the grammar is 1, as in process). Where it
    allows several tokens and none is a candidate, it is a dead end (rewind, as above). Exact (the
    distribution of the same generation in process) when every allowed token that the local
    filters would keep is among the K candidates, e.g. top-k off and K large; else it is the
    distribution restricted to the candidates, and always valid.
    """

    name = "grammar"
    reads_probs = False
    edits_logits = True
    hard_constraint = True

    def __init__(
        self,
        provider: BaseProvider,
        json_schema: Optional[JsonSchema] = None,
        grammar: Optional[str] = None,
        regex: Optional[str] = None,
        lookback: int = 8,
        whitespace_flexible: bool = False,
        dead_ends: bool = True,
        dead_end_loss: float = 1.0,
        max_retries: int = 2,
        max_rewinds: int = 6,
        close_at_limit: bool = True,
    ):
        for name, value in dict(lookback=lookback, max_retries=max_retries, max_rewinds=max_rewinds).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not isinstance(dead_end_loss, (int, float)) or not dead_end_loss > 0:
            raise ValueError(f"dead_end_loss must be a number > 0, got {dead_end_loss!r}")
        llg = llguidance_module()
        self.provider, self.lookback = provider, lookback
        self.kind = grammar_kind(json_schema, grammar, regex)
        self.source = grammar_source(json_schema, grammar, regex, whitespace_flexible)
        self.tokenizer = tokenizer_for(provider)
        self.matcher = llg.LLMatcher(self.tokenizer, self.source, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"{self.kind}: {short_message(self.matcher.get_error())}")
        # an engine's logits hold only its K candidates (-inf elsewhere): a token the grammar forces
        # may be missing from them; it is taken anyway (below), as in process
        self.candidates_only = hasattr(provider, "engine_type")
        self._eos: FrozenSet[int] = frozenset(provider.eos_token_ids)
        self._placeholder = min(self._eos) if self._eos else provider.get_eos_token_id()
        self._words = (self.tokenizer.vocab_size + 31) // 32
        self._bitmask = np.zeros(self._words, dtype=np.int32)
        self._paths = (
            DeadEnds(self.kind == "json_schema", dead_end_loss, max_retries, max_rewinds) if dead_ends else None
        )
        self._closer = Closer(self.matcher, self.tokenizer, self._restore) if close_at_limit else None
        self._limit: Optional[int] = None
        self.reset()

    def reset(self) -> None:
        self.matcher.reset()
        self._consumed: List[int] = []
        self._bans: Dict[int, Set[int]] = {}  # position -> tokens refused there (dead ends, invalid tokens)
        self._dead: Optional[int] = None  # the position whose placeholder token backtrack rewinds
        self._keep = 0
        self._estimate = (0, -1)  # (the shortest way's length, at which position it was measured)
        self._closing = False  # the last step kept to tokens that let the text end in time
        self.rewind_reason = None
        if self._paths is not None:
            self._paths.reset()

    def on_start(self, limit: int) -> None:
        self._limit = limit

    def get_keep_index(self) -> int:
        return self._keep

    # -- the mask ---------------------------------------------------------------------------
    def allowed(self, size: Optional[int] = None) -> np.ndarray:
        """A boolean array over the vocabulary (``size`` long, default the tokenizer's): the
        tokens the grammar allows after the tokens consumed so far."""
        self.matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        self._check_matcher()
        size = self.tokenizer.vocab_size if size is None else size
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little", count=min(size, 32 * self._words))
        if len(bits) < size:
            bits = np.concatenate([bits, np.zeros(size - len(bits), np.uint8)])
        return bits.view(bool)

    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        position = len(continuation_tokens)
        bad = self._sync(continuation_tokens)
        if bad is not None:
            raise ConstraintError(
                f"token {continuation_tokens[bad]} at position {bad} is not allowed by the "
                f"{self.kind} and was kept (a driver that does not rewind)"
            )
        allowed = self.allowed(len(logits))
        paths = self._paths
        if paths is not None:
            paths.observe(position, allowed_mass(logits, allowed), not self.matcher.compute_ff_bytes())
        np.copyto(logits, np.float32(-np.inf), where=~allowed)
        bans = self._bans.get(position)
        if bans:
            logits[list(bans)] = -np.inf
        if paths is not None and paths.banned(position):
            _ban_unless_empty(logits, paths.banned(position))
        self._closing = False
        if self._closer is not None and self._limit is not None and np.max(logits) > -np.inf:
            self._close(logits, position, self._limit - position - 2)
        if np.max(logits) > -np.inf:
            return logits
        # a dead end: nothing the grammar allows is left here
        if self.candidates_only:
            forced = np.flatnonzero(allowed)
            if len(forced) == 1 and not (bans and int(forced[0]) in bans):
                logits[forced[0]] = 0.0  # the one token the grammar allows: probability 1 whatever the model says
                return logits
        if position == 0 or position - 1 < self._keep:
            count = int(allowed.sum())
            why = "banned or not among the engine's candidates" if self.candidates_only else "banned"
            raise ConstraintError(
                f"every token the {self.kind} allows here ({count}) is {why}, after "
                f"{self._tail(continuation_tokens)!r}, and the tokens before are final"
            )
        self._dead = position
        logits.fill(-np.inf)
        logits[self._placeholder] = 0.0  # sampled, then rewound by backtrack with the token before it
        return logits

    # -- following the tokens ------------------------------------------------------------------
    def backtrack(self, continuation_tokens: List[int]) -> List[int]:
        tokens = continuation_tokens
        if self._dead is not None:
            position, self._dead = self._dead, None
            if len(tokens) == position + 1:  # the placeholder of a dead end: back up one more token
                return self._refuse(
                    tokens, position - 1, f"dead end: every token the {self.kind} allows after it is banned"
                )
        bad = self._sync(tokens)
        if bad is not None:
            return self._refuse(tokens, bad, f"token not allowed by the {self.kind}")
        keep, paths = len(tokens) - self.lookback, self._paths
        if paths is not None:
            text = tokens[:-1] if tokens and tokens[-1] in self._eos else tokens
            paths.follow(text, self._bytes)
            cut = None if self._closing or len(text) < len(tokens) else paths.target(tokens, self._keep)
            if cut is not None:
                position, reason = cut
                self.on_rewind(position)
                self.rewind_reason = f"{self.kind}: {reason}"
                return tokens[:position]
            if self.lookback:  # 0: every token is final at once, nothing is held back
                keep = min(keep, max(paths.hold(len(text)), len(tokens) - HOLD))
        self._keep = max(self._keep, keep)
        return tokens

    def on_rewind(self, position: int) -> None:
        consumed = self._consumed
        if position < len(consumed):
            self._rollback(len(consumed) - position)
        for later in [p for p in self._bans if p > position]:
            del self._bans[later]
        if self._dead is not None and self._dead >= position:
            self._dead = None
        if self._paths is not None:
            self._paths.truncate(position)
        self._keep = min(self._keep, position)

    def _close(self, logits: np.ndarray, position: int, room: int) -> None:
        """Budget-aware closing: ``room`` tokens may follow this one (the end-of-sequence token
        aside). Near it, keep the likeliest tokens (and the shortest way's first) after which that
        way is no longer and still fits (the way's first token when none is)."""
        closer, (cost, measured) = cast(Closer, self._closer), self._estimate
        slack = room - cost
        if measured >= 0 and slack > CLOSE_MARGIN and position - measured < (slack - CLOSE_MARGIN) // 4:
            return  # the shortest way cannot have grown enough since it was measured
        found = closer.cost(max(room, 0) + CLOSE_MARGIN + 1)
        self._estimate = (room + CLOSE_MARGIN + 1 if found is None else found, position)
        if room - (room + 1 if found is None else found) > CLOSE_MARGIN:
            return  # room enough (or no way found yet: nothing to steer by before the last tokens)
        self._closing = True
        first = closer.first
        kept: List[int] = []
        if found is not None:
            count = min(CLOSE_CANDIDATES, len(logits))
            likeliest = np.argpartition(-logits, count - 1)[:count]
            likeliest = likeliest[logits[likeliest] > -np.inf].tolist()
            if first is not None and first not in likeliest and logits[first] > -np.inf:
                likeliest.append(first)
            for token in likeliest:
                if token in self._eos:
                    fits = self.matcher.is_accepting()
                else:  # no token that makes the way longer (a new item, a new key): the text winds down
                    after = closer.cost_after(token, found + 1)
                    fits = after is not None and after <= min(found, room)
                if fits:
                    kept.append(token)
        if not kept and first is not None and first not in self._bans.get(position, ()):
            if logits[first] == -np.inf and not self.candidates_only:
                return  # banned by a strategy before this one
            kept = [first]  # through an engine: taken even when not a candidate, as a forced token
        if kept:
            chosen = np.maximum(logits[kept], np.float32(-1e9))
            logits.fill(-np.inf)
            logits[kept] = chosen

    def _bytes(self, token: int) -> bytes:
        return self.tokenizer.decode_bytes([token])

    def _restore(self) -> None:
        """The matcher as the consumed tokens leave it (after a walk it could not roll back)."""
        self.matcher.reset()
        self.matcher.consume_tokens(self._consumed)

    def _refuse(self, tokens: List[int], position: int, reason: str) -> List[int]:
        """Ban ``tokens[position]`` at ``position`` and rewind to there."""
        if position < self._keep:
            raise ConstraintError(f"{reason} ({self._tail(tokens[: position + 1])!r}), and the tokens before are final")
        self._bans.setdefault(position, set()).add(tokens[position])
        self.on_rewind(position)
        self.rewind_reason = f"{self.kind}: {reason}"
        return tokens[:position]

    def _sync(self, tokens: List[int]) -> Optional[int]:
        """Consume ``tokens`` not consumed yet (rolling back first if they differ from what was);
        the index of the first one the grammar refuses, or None. An end-of-sequence token, last,
        is accepted when the grammar is complete (it is not consumed)."""
        consumed = self._consumed
        n = len(consumed)
        if n and (n > len(tokens) or tokens[n - 1] != consumed[-1]):  # cut without on_rewind: find where
            same = next((i for i, (a, b) in enumerate(zip(consumed, tokens)) if a != b), min(n, len(tokens)))
            self._rollback(n - same)
        matcher = self.matcher
        for index in range(len(consumed), len(tokens)):
            token = tokens[index]
            if token in self._eos:
                return None if index == len(tokens) - 1 and matcher.is_accepting() else index
            if matcher.validate_tokens([token]) != 1:
                return index
            if not matcher.consume_token(token):
                self._check_matcher()
            consumed.append(token)
        return None

    def _rollback(self, count: int) -> None:
        """Forget the last ``count`` consumed tokens (never raises: it runs in ``on_rewind``; a
        matcher that cannot roll back is reset and given the tokens that stay)."""
        if count <= 0:
            return
        del self._consumed[len(self._consumed) - count :]
        if self.matcher.is_error() or not self.matcher.rollback(count) or self.matcher.is_error():
            self.matcher.reset()
            self.matcher.consume_tokens(self._consumed)  # an error state here is raised by the next hook

    def _check_matcher(self) -> None:
        if self.matcher.is_error():
            raise ConstraintError(f"the {self.kind} engine failed: {short_message(self.matcher.get_error(), 300)}")

    def _tail(self, tokens: List[int]) -> str:
        return self.provider.decode(tokens[-8:])

    # -- for callers -----------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """Whether the tokens consumed so far are a complete text of the grammar."""
        return self.matcher.is_accepting()
