"""The readers of the files strategies take lists from: slop phrases, regular expressions, and any
text file (a grammar, a JSON Schema), each with its problems as one-line UsageErrors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

from ..errors import UsageError
from ._regex import compile_regex


def read_text(path: str, what: str) -> str:
    """The UTF-8 text of the file ``path``; UsageError naming it as ``what`` ("grammar file")
    when it is missing or unreadable."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {what} {path}: {error}") from None


def _json_list(text: str, path: str) -> Optional[list]:
    """The JSON list ``text`` holds, or None when it is not JSON (a plain one-per-line file)."""
    if not text.lstrip().startswith("["):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{path} is not valid JSON: {error}") from None


def read_slops(path: str) -> list:
    """Phrases from a JSON file (a list of strings, or of [phrase, multiplier] pairs) or a text
    file with one phrase per line (blank lines and lines starting with # are skipped)."""
    text = read_text(path, "slop file")
    data = _json_list(text, path)
    if data is not None:
        for item in data:
            ok = isinstance(item, str) or (
                isinstance(item, list)
                and len(item) == 2
                and isinstance(item[0], str)
                and isinstance(item[1], (int, float))
                and not isinstance(item[1], bool)
            )
            if not ok:
                raise UsageError(
                    f"{path}: expected a JSON list of strings or of [phrase, multiplier] pairs, found {item!r}"
                )
        return data
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def read_regexes(path: str) -> List[str]:
    """Regular expressions from a JSON list, or one per line; a line may be quoted ("...", as a
    JSON string or with regex backslashes left as they are) and end with a comma. Blank lines and
    lines starting with # are skipped."""
    text = read_text(path, "regex file")
    patterns = _json_list(text, path)
    if patterns is None:
        patterns = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            quoted = line.rstrip(",").rstrip()
            if len(quoted) >= 2 and quoted[0] == quoted[-1] == '"':
                try:
                    line = json.loads(quoted)
                except json.JSONDecodeError:  # e.g. "\s": keep the backslashes, they are regex escapes
                    line = quoted[1:-1].replace('\\"', '"')
            patterns.append(line)
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise UsageError(f"{path}: expected a list of regular expressions")
    return check_regexes(patterns)


def check_regexes(patterns: Sequence[str]) -> List[str]:
    """``patterns`` as a list, once each compiles with ``compile_regex`` (RE2, linear time);
    UsageError naming the pattern and the problem (e.g. an unsupported backreference) otherwise."""
    for pattern in patterns:
        try:
            compile_regex(pattern)
        except ValueError as error:
            raise UsageError(f"bad regular expression: {error}") from None
    return list(patterns)
