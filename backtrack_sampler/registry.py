"""The strategy registry: strategies by name (for the CLI and the server), their parameters,
chaining, and the readers of slop-phrase and regex files."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .errors import UsageError
from .provider.base_provider import BaseProvider
from .strategy._regex import compile_regex
from .strategy.base_strategy import BaseStrategy

STRATEGIES = ("none", "antislop", "creative", "adaptive", "replace", "debug", "human")


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
    text = _read_text(path, "slop file")
    data = _json_list(text, path)
    if data is not None:
        for item in data:
            ok = isinstance(item, str) or (
                isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], (int, float)) and not isinstance(item[1], bool)
            )
            if not ok:
                raise UsageError(f"{path}: expected a JSON list of strings or of [phrase, multiplier] pairs, found {item!r}")
        return data
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def read_regexes(path: str) -> List[str]:
    """Regular expressions from a JSON list, or one per line; a line may be quoted ("...", as a
    JSON string or with regex backslashes left as they are) and end with a comma. Blank lines and
    lines starting with # are skipped."""
    text = _read_text(path, "regex file")
    patterns = _json_list(text, path)
    if patterns is None:
        patterns = []
        for number, line in enumerate(text.splitlines(), 1):
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


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {what} {path}: {error}") from None


def strategy_class(name: str):
    """The strategy class behind a CLI / API name (None for "none")."""
    if name == "none":
        return None
    if name == "antislop":
        from .strategy.antislop_strategy import AntiSlopStrategy as cls
    elif name == "creative":
        from .strategy.creative_writing_strategy import CreativeWritingStrategy as cls
    elif name == "adaptive":
        from .strategy.adaptive_temperature_strategy import AdaptiveTemperatureStrategy as cls
    elif name == "replace":
        from .strategy.replace_strategy import ReplaceStrategy as cls
    elif name == "debug":
        from .strategy.debug_strategy import DebugStrategy as cls
    elif name == "human":
        from .strategy.human_guidance_strategy import HumanGuidanceStrategy as cls
    else:
        raise UsageError(f"unknown strategy {name!r}: choose one of {', '.join(STRATEGIES)}")
    return cls


def strategy_parameters(name: str) -> Dict[str, inspect.Parameter]:
    """The keyword parameters a strategy's constructor takes (without ``provider``)."""
    cls = strategy_class(name)
    if cls is None:
        return {}
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return {}
    return {
        key: p for key, p in params.items()
        if key not in ("self", "provider") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def make_strategy(name: str, provider: BaseProvider, **params) -> BaseStrategy:
    """Build the strategy ``name`` ("none", "antislop", ...) with constructor keyword ``params``.
    Raises UsageError for an unknown name, unknown parameter or a value the constructor rejects."""
    cls = strategy_class(name)
    if cls is None:
        if params:
            raise UsageError(f"strategy 'none' takes no parameters, got {', '.join(sorted(params))}")
        return BaseStrategy()
    try:
        signature = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        signature = {}
    known = strategy_parameters(name)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.values())
    unknown = [] if takes_any else sorted(set(params) - set(known))
    if unknown:
        raise UsageError(
            f"strategy {name!r} has no parameter {unknown[0]!r}"
            + (f" (it takes: {', '.join(known)})" if known else " (it takes none)")
        )
    try:
        return cls(provider, **params) if "provider" in signature else cls(**params)
    except (TypeError, ValueError, re.error) as error:
        raise UsageError(f"strategy {name!r}: {error}") from None


def chain(strategies: Sequence[BaseStrategy]) -> BaseStrategy:
    """One strategy from several (a ChainStrategy when there is more than one)."""
    strategies = [s for s in strategies if type(s) is not BaseStrategy] or [BaseStrategy()]
    if len(strategies) == 1:
        return strategies[0]
    from .strategy.chain_strategy import ChainStrategy

    try:
        return ChainStrategy(strategies)
    except TypeError as error:
        raise UsageError(f"cannot combine strategies: {error}") from None


def build_strategies(plan: Sequence[tuple], provider: BaseProvider) -> BaseStrategy:
    """The strategy for a plan ``[(name, params), ...]``: one, a ChainStrategy of several, or BaseStrategy."""
    return chain([make_strategy(name, provider, **params) for name, params in plan])
