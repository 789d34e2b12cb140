"""The strategy chain the command line asks for (``strategy_plan``): ``--strategy``/``--strategy-args``
in order, with the built-ins' flags (creative, replace, debug, human), the bans (``--slops``,
``--ban``, ``--regex`` ...: the first antislop, else one chained first) and the structured-output
flags (``--json-schema`` ...: the grammar strategy, chained last). Everything is read, resolved and
checked here, before any model loads; ``registry.build_strategies`` makes the strategies."""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, List, Optional, TextIO, Tuple

from ..errors import UsageError
from ..strategy.registry import (
    StrategyCall,
    StrategyRegistry,
    check_regexes,
    in_chain_order,
    read_regexes,
    read_slops,
    read_text,
)


def _antislop_params(args) -> Optional[dict]:
    slops: list = []
    for path in args.slops:
        slops.extend(read_slops(path))
    slops.extend(args.ban)
    regexes = check_regexes(args.regex)
    for path in args.regex_file:
        regexes.extend(read_regexes(path))
    extra = {
        "adjustment_strength": args.adjustment_strength,
        "keep_index_buffer": args.keep_index_buffer,
        "case_sensitive": args.case_sensitive or None,
        "whole_words": args.whole_words or None,
    }
    extra = {key: value for key, value in extra.items() if value is not None}
    if not slops and not regexes:
        return extra or None
    return {"slops": slops, **({"regexes": regexes} if regexes else {}), **extra}


def _json_object(text: Optional[str], spec: str) -> Dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"--strategy-args of {spec} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise UsageError(f"--strategy-args of {spec} must be a JSON object, e.g. '{{\"top_n\": 3}}', got {text!r}")
    return value


def strategy_plan(
    args, stderr: Optional[TextIO] = None, strategies: Optional[StrategyRegistry] = None
) -> List[StrategyCall]:
    """The chain the command line asks for, each strategy resolved (files and modules imported)
    and its parameters validated, before any model is loaded. ``--strategy`` s in order, with
    their ``--strategy-args`` over the built-ins' flags (``--top-p-flat`` for every creative,
    ``--find/--replace`` pairs for a replace without a ``find``, ...); banned phrases/patterns
    go to the first antislop, else to one chained first."""
    strategies = strategies or StrategyRegistry()
    chain = [("human", None)] if args.command == "human" else list(args.strategies)
    steps = [(strategies.resolve(spec), spec, _json_object(text, spec)) for spec, text in chain]
    names = [kind.name for kind, _, _ in steps]
    flags: Dict[str, Dict[str, Any]] = {
        "creative": {
            "top_p_flat": getattr(args, "top_p_flat", None),
            "eos_penalty": getattr(args, "eos_penalty", None),
            "top_k_threshold_flat": getattr(args, "top_k_threshold_flat", None),
        },
        "debug": {"top_n": getattr(args, "debug_top_n", None)},
        "human": {"top_k": getattr(args, "human_top_k", None), "min_autopass": getattr(args, "min_autopass", None)},
    }
    pairs = list(zip(getattr(args, "find", []), getattr(args, "replace", [])))
    if (getattr(args, "find", None) or getattr(args, "replace", None)) and "replace" not in names:
        raise UsageError("--find/--replace need --strategy replace")
    if len(getattr(args, "find", [])) != len(getattr(args, "replace", [])):
        raise UsageError("--strategy replace needs one --replace TEXT per --find TEXT")
    antislop = _antislop_params(args)
    if antislop is not None and "slops" not in antislop and "antislop" not in names:
        raise UsageError(
            "--adjustment-strength, --keep-index-buffer, --case-sensitive and --whole-words need --slops, --ban or --regex"
        )
    bans = None  # the flags' bans, when no --strategy antislop takes them
    if antislop is not None and "antislop" not in names:
        kind = strategies.get("antislop")
        bans = StrategyCall(kind, kind.checked({"slops": [], **antislop}, "--strategy antislop"))
    plan: List[StrategyCall] = []
    for kind, spec, given in steps:
        params = {key: value for key, value in flags.get(kind.name, {}).items() if value is not None}
        if kind.name == "antislop" and not any(call.name == "antislop" for call in plan):
            params = {"slops": [], **(antislop or {})}  # the flags' phrases go to the first antislop
        extra = {"file": stderr or sys.stderr} if kind.name == "debug" else None
        if kind.name == "replace" and "find" not in given:
            if not pairs:
                raise UsageError(
                    "--strategy replace needs --find TEXT and --replace TEXT (one --replace per --find), "
                    'or --strategy-args \'{"find": ..., "replace": ...}\''
                )
            plan += [
                StrategyCall(kind, kind.checked({"find": f, "replace": r, **given}, f"--strategy {spec}"))
                for f, r in pairs
            ]
            continue
        plan.append(StrategyCall(kind, kind.checked({**params, **given}, f"--strategy {spec}"), extra))
    named, grammar = _with_grammar(args, plan, strategies)
    return _with_scopes(getattr(args, "scope", []), in_chain_order(bans=bans, strategies=named, grammar=grammar))


def _with_scopes(given: List[str], plan: List[StrategyCall]) -> List[StrategyCall]:
    """``--scope [NAME=]SCOPE`` s applied to the plan (a named one wins over one for every strategy)."""
    from ..strategy.scope import SCOPES

    every, named = None, {}
    for text in given:
        name, _, scope = text.rpartition("=")
        if scope not in SCOPES:
            raise UsageError(f"--scope {text}: the scope must be one of {', '.join(SCOPES)}")
        if not name:
            every = scope
        elif not any(call.name == name for call in plan):
            raise UsageError(
                f"--scope {text}: no strategy named {name!r} in the chain ({', '.join(c.name for c in plan)})"
            )
        else:
            named[name] = scope
    for call in plan:
        call.scope = named.get(call.name, every)
    return plan


def _grammar_params(args) -> Optional[Dict[str, Any]]:
    """The grammar strategy's parameters from --json-schema/--json-object/--grammar/--regex-output
    (files read and the grammar checked now, before the model loads), or None."""
    given = [
        flag
        for flag, value in (
            ("--json-schema", getattr(args, "json_schema", None)),
            ("--json-object", getattr(args, "json_object", False)),
            ("--grammar", getattr(args, "grammar", None)),
            ("--regex-output", getattr(args, "regex_output", None)),
        )
        if value
    ]
    if not given:
        return None
    if len(given) > 1:
        raise UsageError(f"give one of {', '.join(given)}")
    if args.json_schema:
        text = read_text(args.json_schema, "JSON Schema file")
        try:
            params: Dict[str, Any] = {"json_schema": json.loads(text)}
        except json.JSONDecodeError as error:
            raise UsageError(f"{args.json_schema} is not valid JSON: {error}") from None
    elif args.json_object:
        params = {"json_schema": {"type": "object"}}
    elif args.grammar:
        params = {"grammar": read_text(args.grammar, "grammar file")}
    else:
        params = {"regex": args.regex_output}
    from ..strategy.grammar_strategy import GrammarError, check_grammar

    try:
        check_grammar(**params)
    except GrammarError as error:
        raise UsageError(f"{given[0]}: {error}") from None
    except ImportError as error:
        raise UsageError(str(error)) from None
    return params


def _with_grammar(
    args, plan: List[StrategyCall], strategies: StrategyRegistry
) -> Tuple[List[StrategyCall], Optional[StrategyCall]]:
    """``(plan, grammar)``: the structured-output flags given to a ``--strategy grammar`` that has no
    grammar of its own, else a grammar strategy of their own (chained last: its mask has the last word)."""
    params = _grammar_params(args)
    if params is None:
        return plan, None
    kind = strategies.get("grammar")
    for i, call in enumerate(plan):
        if call.name == "grammar" and not any(
            call.kwargs.get(key) is not None for key in ("json_schema", "grammar", "regex")
        ):
            plan[i] = StrategyCall(kind, kind.checked({**call.kwargs, **params}, "--strategy grammar"), call.extra)
            return plan, None
    return plan, StrategyCall(kind, kind.checked(params, "--json-schema/--grammar/--regex-output"))
