"""compile_regex: the one place where user-supplied regular expressions are compiled.

Patterns run on RE2 (the ``google-re2`` package), whose matching time is linear in the length of
the searched text whatever the pattern: no catastrophic backtracking. RE2 has no backreferences,
lookarounds, conditionals, atomic groups or possessive quantifiers; a pattern using one is
rejected with a ValueError that names the feature. Other differences from Python's ``re``:
``\\d``, ``\\w``, ``\\s`` and ``\\b`` are ASCII-only (use ``\\pL``, ``\\pN`` for Unicode letters and
digits), the end of the text is ``\\z`` (Python's ``\\Z``), and a repetition count is at most 1000.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional, Protocol

try:  # Python 3.11+
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # Python 3.10
    import sre_parse as _sre_parse


class CompiledRegex(Protocol):
    """What TextMatcher needs from a compiled pattern (an RE2 pattern or a ``re.Pattern``)."""

    pattern: Any

    def finditer(self, string: str, pos: int = ...) -> Iterator[Any]: ...


def compile_regex(pattern: str, case_sensitive: bool = True) -> CompiledRegex:
    """Compile a user-supplied ``pattern`` with RE2 (linear-time matching).

    Time bound: one search costs time linear in the text searched. AntiSlopStrategy searches only
    the last ``regex_window`` characters (plus the newly decoded text), so each regex costs
    O(window) per search and at most O(window**2) per token in the worst case (one search per
    match found in the window), independent of the pattern's shape.

    Raises ValueError: ``"regex ... uses a backreference ..., which RE2 ... does not support"``
    (likewise lookahead / lookbehind assertions, conditionals, atomic groups, possessive
    quantifiers, ``\\Z``), or ``"invalid regex ...: <reason>"`` for a syntax error, a repetition
    count above 1000 or a pattern too big for RE2's memory limit; TypeError-like input (not a
    str) is a ValueError too. ImportError when ``google-re2`` is not installed.
    """
    if not isinstance(pattern, str):
        raise ValueError(f"a regex must be a string, got {pattern!r}")
    try:
        import re2
    except ImportError:
        raise ImportError("banned regexes need the google-re2 package: pip install google-re2") from None
    options = re2.Options()
    options.case_sensitive = case_sensitive
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as error:
        reason = (
            error.args[0].decode("utf-8", "replace") if error.args and isinstance(error.args[0], bytes) else str(error)
        )
    feature = _unsupported_feature(pattern)
    if feature:
        raise ValueError(f"regex {pattern!r} uses {feature}, which the linear-time regex engine (RE2) does not support")
    raise ValueError(f"invalid regex {pattern!r}: {reason}")


_FEATURES = {
    "GROUPREF": "a backreference (\\N or (?P=name))",
    "GROUPREF_EXISTS": "a conditional group ((?(N)yes|no))",
    "ATOMIC_GROUP": "an atomic group ((?>...))",
    "POSSESSIVE_REPEAT": "a possessive quantifier (*+, ++, ?+, {m,n}+)",
}
_ASSERTIONS = {
    ("ASSERT", True): "a lookahead assertion ((?=...))",
    ("ASSERT_NOT", True): "a negative lookahead assertion ((?!...))",
    ("ASSERT", False): "a lookbehind assertion ((?<=...))",
    ("ASSERT_NOT", False): "a negative lookbehind assertion ((?<!...))",
}


def _unsupported_feature(pattern: str) -> Optional[str]:
    """The first Python-only feature in ``pattern`` (None when Python's parser finds none or fails)."""
    try:
        parsed = _sre_parse.parse(pattern)
    except Exception:  # not valid Python syntax either: RE2's own message is the best we have
        return None
    stack: List[Any] = [parsed]
    while stack:
        item = stack.pop()
        if isinstance(item, _sre_parse.SubPattern):
            for op, av in item.data:
                name = str(op)
                if name in _FEATURES:
                    return _FEATURES[name]
                if name in ("ASSERT", "ASSERT_NOT"):
                    return _ASSERTIONS[name, av[0] >= 0]
                if name == "AT" and str(av) == "AT_END_STRING":
                    return "\\Z (RE2 writes the end of the text as \\z)"
                stack.append(av)
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
    return None
