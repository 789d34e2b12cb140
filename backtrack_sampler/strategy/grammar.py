"""Grammars for llguidance: what the user gives (a JSON Schema, a Lark/GBNF grammar or a regex)
-> llguidance's grammar text (``grammar_source``), and its checks for a grammar from an untrusted
source (``check_grammar``: its size, and its compilation bounded in time and memory by a child
process, ``GrammarChecker``). GrammarStrategy (grammar_strategy.py) uses it to build its matcher.

llguidance is optional: ``pip install 'backtrack-sampler[grammar]'``.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from types import ModuleType
from typing import IO, Any, Dict, List, Optional, Tuple

JsonSchema = Dict[str, Any]
INSTALL = "pip install 'backtrack-sampler[grammar]'"


class GrammarError(ValueError):
    """A JSON Schema, grammar or regex that cannot be used: malformed, unsupported, too large, or
    too slow to compile (the message names the problem)."""


def llguidance_module() -> ModuleType:
    """The ``llguidance`` module; ImportError saying how to install it."""
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
    llg = llguidance_module()
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


def grammar_kind(json_schema: Any, grammar: Any, regex: Any) -> str:
    """Which of the three is given: ``"json_schema"``, ``"grammar"`` or ``"regex"``."""
    return "json_schema" if json_schema is not None else "grammar" if grammar is not None else "regex"


def short_message(message: str, limit: int = 400) -> str:
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
            stdin, stdout = self._start()
            ready: List[IO[str]] = []  # a write that fails (the child died) is not a timeout either
            try:
                stdin.write(json.dumps({"grammar": source}) + "\n")
                stdin.flush()
                ready, _, _ = select.select([stdout], [], [], timeout)
                line = stdout.readline() if ready else ""
            except (OSError, ValueError):
                line = ""
            if not line:
                self._kill()
                if ready:
                    raise GrammarError("it could not be compiled (the compiler ran out of memory)")
                raise GrammarError(f"it takes longer than {timeout:g} s to compile (max_grammar_seconds)")
        error = json.loads(line)["error"]
        if error:
            raise GrammarError(short_message(error))
        if len(self._passed) >= self.remember:
            self._passed.pop(next(iter(self._passed)))
        self._passed[source] = None

    def _start(self) -> Tuple[IO[str], IO[str]]:
        """The child's stdin and stdout (started now if it is not running)."""
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
        stdin, stdout = self._process.stdin, self._process.stdout
        assert stdin is not None and stdout is not None  # started with pipes
        return stdin, stdout

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
    which = grammar_kind(json_schema, grammar, regex)
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
        problem = llguidance_module().LLMatcher.validate_grammar(source, None)
        if problem:
            raise GrammarError(f"{which}: {short_message(problem)}")
    return source
