"""GrammarStrategy: structured output (a JSON Schema, a Lark/GBNF grammar or a regex) that follows
every rewind, so it composes with bans: the output is valid for the grammar and free of what the
other strategies ban, or the generation says it cannot be both (finish_reason "constraint").

The grammar engine is llguidance (``pip install 'backtrack-sampler[grammar]'``): it compiles JSON
Schema, Lark (and llama.cpp's GBNF) and regexes, computes the mask of allowed tokens for a whole
vocabulary in tens of microseconds, and rolls back consumed tokens (``LLMatcher.rollback``).
"""

from __future__ import annotations

from typing import Dict, FrozenSet, List, Optional, Set

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
        "constraint". 0 streams each token at once (a dead end then ends the generation).

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
    ):
        if not isinstance(lookback, int) or isinstance(lookback, bool) or lookback < 0:
            raise ValueError(f"lookback must be an int >= 0, got {lookback!r}")
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
        self.reset()

    def reset(self) -> None:
        self.matcher.reset()
        self._consumed: List[int] = []
        self._bans: Dict[int, Set[int]] = {}  # position -> tokens refused there (dead ends, invalid tokens)
        self._dead: Optional[int] = None  # the position whose placeholder token backtrack rewinds
        self._keep = 0
        self.rewind_reason = None

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
        np.copyto(logits, np.float32(-np.inf), where=~allowed)
        bans = self._bans.get(position)
        if bans:
            logits[list(bans)] = -np.inf
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
        self._keep = max(self._keep, len(tokens) - self.lookback)
        return tokens

    def on_rewind(self, position: int) -> None:
        consumed = self._consumed
        if position < len(consumed):
            self._rollback(len(consumed) - position)
        for later in [p for p in self._bans if p > position]:
            del self._bans[later]
        if self._dead is not None and self._dead >= position:
            self._dead = None
        self._keep = min(self._keep, position)

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
