"""GrammarStrategy: structured output (a JSON Schema, a Lark/GBNF grammar or a regex) that follows
every rewind, so it composes with bans: the output is valid for the grammar and free of what the
other strategies ban, or the generation says it cannot be both (finish_reason "constraint").

The grammar engine is llguidance (``pip install 'backtrack-sampler[grammar]'``): it compiles JSON
Schema, Lark (and llama.cpp's GBNF) and regexes, computes the mask of allowed tokens for a whole
vocabulary in tens of microseconds, and rolls back consumed tokens (``LLMatcher.rollback``).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import warnings
from typing import Any, Dict, FrozenSet, List, Optional, Set

import numpy as np

from ..provider.base_provider import BaseProvider
from .base_strategy import BaseStrategy, ConstraintError

JsonSchema = Dict[str, Any]
INSTALL = "pip install 'backtrack-sampler[grammar]'"


class GrammarError(ValueError):
    """A JSON Schema, grammar or regex that cannot be used: malformed, unsupported, too large, or
    too slow to compile (the message names the problem)."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ImportError(f"GrammarStrategy needs llguidance: {INSTALL}") from None
    return llguidance


# --------------------------------------------------------------------------------------------
# grammars: what the user gives -> llguidance's grammar text
# --------------------------------------------------------------------------------------------
def grammar_source(
    json_schema: Optional[JsonSchema] = None,
    grammar: Optional[str] = None,
    regex: Optional[str] = None,
    whitespace_flexible: bool = False,
) -> str:
    """llguidance's grammar text for exactly one of ``json_schema`` (a JSON Schema as a dict; ``{}``
    or True: any JSON value), ``grammar`` (Lark, or llama.cpp's GBNF, told apart by llguidance)
    and ``regex`` (the whole output must match it; Rust ``regex`` syntax). JSON is compact
    (``{"a": 1, "b": [2, 3]}``: one space after ``:`` and ``,``, none elsewhere) unless
    ``whitespace_flexible``; a schema's own ``x-guidance`` options win. GrammarError when none or
    several are given, or a schema is not a JSON object."""
    given = [
        name
        for name, value in (("json_schema", json_schema), ("grammar", grammar), ("regex", regex))
        if value is not None
    ]
    if len(given) != 1:
        raise GrammarError(
            "give exactly one of json_schema, grammar and regex" + (f" (got {', '.join(given)})" if given else "")
        )
    llg = _llguidance()
    if json_schema is not None:
        if json_schema is True:
            json_schema = {}
        if not isinstance(json_schema, dict):
            raise GrammarError(f"json_schema must be a JSON object, got {type(json_schema).__name__}")
        options: Dict[str, Any] = {"whitespace_flexible": bool(whitespace_flexible)}
        if not whitespace_flexible:
            options.update(item_separator=", ", key_separator=": ")
        try:
            return llg.LLMatcher.grammar_from_json_schema(json_schema, defaults=options)
        except (ValueError, TypeError) as error:
            raise GrammarError(f"json_schema: {error}") from None
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise GrammarError("grammar must be a non-empty string (Lark or GBNF)")
        try:
            return llg.grammar_from("grammar", grammar)
        except Exception as error:  # the GBNF converter raises its own errors
            raise GrammarError(f"grammar: {error}") from None
    if not isinstance(regex, str) or not regex:
        raise GrammarError("regex must be a non-empty string")
    return llg.LLMatcher.grammar_from_regex(regex)


def _which(json_schema, grammar, regex) -> str:
    return "json_schema" if json_schema is not None else "grammar" if grammar is not None else "regex"


def _short(message: str, limit: int = 400) -> str:
    """llguidance's message on one line, without its parser-state dump and caret lines."""
    message = message.split("\n<state>")[0]
    message = " ".join(line.strip() for line in message.splitlines() if line.strip() and line.strip() != "^")
    return message if len(message) <= limit else message[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# bounded compilation: a child process that can be killed (for grammars from a request)
# --------------------------------------------------------------------------------------------
_WORKER = r"""
import json, sys
try:
    import resource
    cap = int(sys.argv[1])
    if cap > 0:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
except Exception:
    pass
import llguidance as llg
for line in sys.stdin:
    try:
        error = llg.LLMatcher.validate_grammar(json.loads(line)["grammar"], None)
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
    sys.stdout.write(json.dumps({"error": error}) + "\n")
    sys.stdout.flush()
"""


class GrammarChecker:
    """Validates grammars in a child process (one, started on first use, reused) and kills it when
    one takes longer than ``timeout`` seconds: a hostile schema (llguidance's compile time grows
    exponentially with, e.g., the number of ``allOf`` regex patterns: 20 took 35 s here) costs
    at most ``timeout``. ``memory``: the child's address-space cap in bytes (0: none). One check at
    a time (a lock); a grammar that passed is remembered (by its text) and not checked again."""

    def __init__(self, memory: int = 4 << 30, remember: int = 256):
        self.memory, self.remember = memory, remember
        self._process: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()
        self._passed: Dict[str, None] = {}

    def check(self, source: str, timeout: float) -> None:
        """GrammarError when ``source`` (llguidance's grammar text) is invalid or its check takes
        longer than ``timeout`` seconds."""
        if source in self._passed:
            return
        with self._lock:
            process = self._start()
            try:
                process.stdin.write(json.dumps({"grammar": source}) + "\n")
                process.stdin.flush()
                ready, _, _ = select.select([process.stdout], [], [], timeout)
                line = process.stdout.readline() if ready else ""
            except (OSError, ValueError):
                line = ""
            if not line:
                self._kill()
                if ready:
                    raise GrammarError("it could not be compiled (the compiler ran out of memory)")
                raise GrammarError(f"it takes longer than {timeout:g} s to compile (max_grammar_seconds)")
        error = json.loads(line)["error"]
        if error:
            raise GrammarError(_short(error))
        if len(self._passed) >= self.remember:
            self._passed.pop(next(iter(self._passed)))
        self._passed[source] = None

    def _start(self) -> subprocess.Popen:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _WORKER, str(self.memory)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                bufsize=1,
                close_fds=True,
            )
        return self._process

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def close(self) -> None:
        with self._lock:
            self._kill()


_CHECKER = GrammarChecker()


def check_grammar(
    json_schema: Optional[JsonSchema] = None,
    grammar: Optional[str] = None,
    regex: Optional[str] = None,
    whitespace_flexible: bool = False,
    *,
    max_chars: Optional[int] = None,
    timeout: Optional[float] = None,
) -> str:
    """The checks for a grammar from an untrusted source (the server runs them on every request's):
    at most ``max_chars`` characters (a schema: its compact JSON text), and valid once compiled
    within ``timeout`` seconds, in a child process that is killed beyond it (``GrammarChecker``;
    without ``timeout``: in this process, unbounded). Returns llguidance's grammar text; GrammarError naming the problem."""
    which = _which(json_schema, grammar, regex)
    text = json.dumps(json_schema, separators=(",", ":")) if which == "json_schema" else (grammar or regex or "")
    if max_chars is not None and len(text) > max_chars:
        raise GrammarError(
            f"the {which} is {len(text)} characters long; at most {max_chars} are allowed (max_grammar_chars)"
        )
    source = grammar_source(json_schema, grammar, regex, whitespace_flexible)
    if timeout is not None and os.name == "posix":
        try:
            _CHECKER.check(source, timeout)
        except GrammarError as error:
            raise GrammarError(f"{which}: {error}") from None
    else:
        error = _llguidance().LLMatcher.validate_grammar(source, None)
        if error:
            raise GrammarError(f"{which}: {_short(error)}")
    return source


# --------------------------------------------------------------------------------------------
# tokenizers: the provider's vocabulary as llguidance sees it (built once per model)
# --------------------------------------------------------------------------------------------
_TOKENIZERS: Dict[tuple, Any] = {}
_TOKENIZER_LOCK = threading.Lock()


def tokenizer_for(provider: BaseProvider):
    """An ``llguidance.LLTokenizer`` of ``provider``'s vocabulary (``vocab_size`` wide, with every
    one of its ``eos_token_ids``): from the llama.cpp vocabulary (``provider.llm``: a
    ``LlamacppProvider``, or an ``EngineProvider`` with a GGUF tokenizer), from a Hugging Face fast
    tokenizer (``provider.tokenizer``), else from each token's decoded text (any provider; a token
    whose text is empty counts as special). Cached by model: building one takes 0.3-7 s."""
    llg = _llguidance()
    eos = sorted(provider.eos_token_ids)
    size = provider.vocab_size
    llm, hf = getattr(provider, "llm", None), getattr(provider, "tokenizer", None)
    if llm is not None and type(llm).__module__.startswith("llama_cpp"):
        key: tuple = ("llama.cpp", getattr(llm, "model_path", None) or id(llm))
    elif hf is not None and hasattr(hf, "backend_tokenizer"):
        key = ("hf", getattr(hf, "name_or_path", None) or id(hf), len(hf))
    else:
        llm = hf = None
        key = ("decoded", id(provider))
    key += (size, tuple(eos))
    with _TOKENIZER_LOCK:
        found = _TOKENIZERS.get(key)
        if found is not None and (key[0] != "decoded" or found[1] is provider):
            return found[0]
        if llm is not None:
            import llama_cpp
            from llguidance.llamacpp import lltokenizer_from_vocab

            with warnings.catch_warnings():  # it calls llama_token_get_attr (deprecated) once per token
                warnings.simplefilter("ignore", DeprecationWarning)
                tokenizer = lltokenizer_from_vocab(
                    llama_cpp.llama_model_get_vocab(llm.model), n_vocab=size, eos_token=eos
                )
        elif hf is not None:
            from llguidance.hf import from_tokenizer

            tokenizer = from_tokenizer(hf, n_vocab=max(size, len(hf)), eos_token=eos)
        else:
            tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(_DecodedVocabulary(provider)), n_vocab=size, eos_token=eos)
        if len(_TOKENIZERS) >= 8:
            _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
        _TOKENIZERS[key] = (tokenizer, provider if key[0] == "decoded" else None)
        return tokenizer


class _DecodedVocabulary:
    """What ``llguidance.TokenizerWrapper`` needs, from a provider's ``decode`` and ``encode``."""

    def __init__(self, provider: BaseProvider):
        self.provider = provider
        self.tokens: List[bytes] = []
        self.special_token_ids: List[int] = []
        for token in range(provider.vocab_size):
            text = provider.decode([token])
            if text:
                self.tokens.append(text.encode("utf-8"))
            else:
                self.special_token_ids.append(token)
                self.tokens.append(f"<|special_{token}|>".encode())
        self.eos_token_id = provider.get_eos_token_id()
        self.bos_token_id = None

    def __call__(self, text) -> List[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        try:
            return self.provider.encode(text, add_special_tokens=False)
        except Exception:  # text the provider cannot encode: greedy longest pieces (llguidance must get tokens)
            return self._greedy(text)

    def _greedy(self, text: str) -> List[int]:
        if not hasattr(self, "_ids"):
            self._ids = {
                piece.decode("utf-8", "replace"): i
                for i, piece in enumerate(self.tokens)
                if i not in self.special_token_ids
            }
            self._longest = max(map(len, self._ids), default=1)
        tokens, i = [], 0
        while i < len(text):
            for size in range(min(self._longest, len(text) - i), 0, -1):
                if text[i : i + size] in self._ids:
                    tokens.append(self._ids[text[i : i + size]])
                    i += size
                    break
            else:
                i += 1  # a character no token has: skipped
        return tokens


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
        llg = _llguidance()
        self.provider, self.lookback = provider, lookback
        self.kind = _which(json_schema, grammar, regex)
        self.source = grammar_source(json_schema, grammar, regex, whitespace_flexible)
        self.tokenizer = tokenizer_for(provider)
        self.matcher = llg.LLMatcher(self.tokenizer, self.source, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"{self.kind}: {_short(self.matcher.get_error())}")
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
            raise ConstraintError(f"the {self.kind} engine failed: {_short(self.matcher.get_error(), 300)}")

    def _tail(self, tokens: List[int]) -> str:
        return self.provider.decode(tokens[-8:])

    # -- for callers -----------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """Whether the tokens consumed so far are a complete text of the grammar."""
        return self.matcher.is_accepting()
