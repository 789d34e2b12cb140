"""The ``backtrack-sampler`` command: ``generate`` (stream text to stdout), ``human`` (guide the
model token by token in the terminal), ``batch`` (a JSONL file of prompts to a JSONL file of
completions, resumable; see ``batchfile``) and ``serve`` (an OpenAI-compatible HTTP server).

This module is argument parsing and the commands; models load in ``models``, chat prompts are
built in ``chat``, strategies come from ``registry``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO

from ..errors import UsageError
from ..provider.base_provider import BaseProvider
from ..provider.chat import chat_prompt_tokens
from ..provider.models import BACKENDS, MODELS, default_model, load_provider
from ..strategy import registry
from ..strategy.registry import (
    BUILTINS,
    StrategyCall,
    StrategyRegistry,
    build_strategies,
    check_regexes,
    read_regexes,
    read_slops,
)


# --------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------
def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {value}")
    return value


class _StrategyAction(argparse.Action):
    """``--strategy SPEC``: appends ``[SPEC, None]`` to the chain."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), (value, None)])


class _StrategyArgsAction(argparse.Action):
    """``--strategy-args JSON``: the JSON text of the last ``--strategy`` (parsed in ``strategy_plan``)."""

    def __call__(self, parser, namespace, value, option_string=None):
        chain = list(getattr(namespace, self.dest, None) or [])
        if not chain or chain[-1][1] is not None:
            parser.error("--strategy-args goes right after the --strategy it is for")
        chain[-1] = (chain[-1][0], value)
        setattr(namespace, self.dest, chain)


class _Parser(argparse.ArgumentParser):
    """argparse with errors as one line ``error: ...`` (plus a hint) and exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _add_model_args(parser, default: str):
    group = parser.add_argument_group("model")
    group.add_argument("--backend", choices=BACKENDS, default="llamacpp", help="model backend (default: llamacpp)")
    group.add_argument(
        "--model",
        metavar="NAME|PATH",
        help=f"an embedded model ({', '.join(MODELS)}), a .gguf file (llamacpp or transformers) "
        f"or a local transformers model folder (default: {default})",
    )
    group.add_argument("--n-ctx", type=_positive_int, metavar="N", help="context size for llamacpp (default: 8192)")
    group.add_argument("--threads", type=_positive_int, metavar="N", help="CPU threads (default: all cores)")
    group = parser.add_argument_group("serving engine (the model runs there; see README 'Serving engines')")
    group.add_argument(
        "--engine", metavar="URL", help="a running llama-server, vLLM or SGLang, e.g. http://127.0.0.1:8080"
    )
    group.add_argument(
        "--engine-type",
        choices=("llama-server", "vllm", "sglang"),
        default="llama-server",
        help="its API (default: llama-server)",
    )
    group.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="the served model's tokenizer: a .gguf file or a tokenizer "
        "folder, or an embedded model name (default: --model, else gemma-3-270m)",
    )
    group.add_argument(
        "--engine-timeout", type=_number, metavar="S", default=60.0, help="seconds to wait for the engine (default: 60)"
    )


def _add_generation_args(parser, human: bool = False, batch: bool = False):
    if batch:
        parser.add_argument(
            "input",
            metavar="PROMPTS.jsonl",
            help='one JSON object a line: {"prompt": text} or '
            '{"messages": [...]}, optionally "id" and sampling fields (- reads stdin)',
        )
        parser.add_argument(
            "-o",
            "--output",
            metavar="FILE",
            required=True,
            help="completions, one JSON line each; ids already in it are skipped (resume)",
        )
        parser.add_argument(
            "--parallel",
            type=_positive_int,
            metavar="N",
            help="generations at once (default: 4 per CPU core, at most 8; with --engine: 8)",
        )
        parser.add_argument(
            "--skip-bad-lines",
            action="store_true",
            help="report bad input lines and go on (default: stop before generating anything)",
        )
        parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    else:
        parser.add_argument("prompt", nargs="?", help="the prompt (default: read from stdin)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    parser.add_argument("--system", metavar="TEXT", help="system message (implies --chat)")
    _add_model_args(parser, f"{default_model(chat=True)} with --chat/--system, else {default_model()}")

    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=_number, default=1.0, help="0 is greedy (default: 1.0)")
    group.add_argument("--top-k", type=_non_negative_int, default=50, help="0 turns it off (default: 50)")
    group.add_argument("--top-p", type=_number, help="nucleus sampling, in (0, 1] (default: off)")
    group.add_argument("--min-p", type=_number, help="in [0, 1] (default: off)")
    group.add_argument(
        "--seed",
        type=int,
        help="random seed, for reproducible output"
        + (" (line N without a seed of its own gets SEED + N)" if batch else ""),
    )
    group.add_argument("--max-new-tokens", type=_non_negative_int, default=256, help="(default: 256)")
    group.add_argument("--max-length", type=_positive_int, help="limit on prompt + generated tokens")
    group.add_argument(
        "--max-rewound-tokens",
        type=_non_negative_int,
        metavar="N",
        help="rewound tokens after which rewinding stops; a hard constraint then ends the generation "
        "(exit status 3) (default: 10 x --max-new-tokens + 1000)",
    )

    if not human:
        group = parser.add_argument_group("strategy (repeat --strategy to chain them, in order)")
        group.add_argument(
            "--strategy",
            metavar="SPEC",
            dest="strategies",
            action=_StrategyAction,
            default=[],
            help=f"a built-in ({', '.join(BUILTINS)}), package.module:Class or path/to/file.py:Class "
            "(default: none; antislop, chained first, when --slops/--ban/--regex is given)",
        )
        group.add_argument(
            "--strategy-args",
            metavar="JSON",
            dest="strategies",
            action=_StrategyArgsAction,
            help="the parameters of the --strategy before it, a JSON object, e.g. '{\"max_bans\": 3}' "
            "(they win over the flags below)",
        )
    group = parser.add_argument_group("antislop (bans phrases and patterns; combines with any --strategy)")
    group.add_argument(
        "--slops",
        metavar="FILE",
        action="append",
        default=[],
        help="JSON list of phrases or of [phrase, multiplier] pairs, or a text file with one phrase per line",
    )
    group.add_argument("--ban", metavar="PHRASE", action="append", default=[], help="a phrase to ban (repeatable)")
    group.add_argument(
        "--regex-file", metavar="FILE", action="append", default=[], help="regular expressions to ban, one per line"
    )
    group.add_argument(
        "--regex", metavar="PATTERN", action="append", default=[], help="a regular expression to ban (repeatable)"
    )
    group.add_argument("--adjustment-strength", type=_number, metavar="X", help="how strongly slop multipliers apply")
    group.add_argument(
        "--keep-index-buffer",
        type=_non_negative_int,
        metavar="N",
        help="extra tokens held back before they are final (default: 0)",
    )
    group.add_argument("--case-sensitive", action="store_true", help="match phrases case-sensitively")
    group.add_argument("--whole-words", action="store_true", help="match phrases only as whole words")
    if not human:
        group = parser.add_argument_group("creative")
        group.add_argument("--top-p-flat", type=_number, metavar="P", help="(default: 0.65)")
        group.add_argument("--top-k-threshold-flat", type=_positive_int, metavar="K", help="(default: 9)")
        group.add_argument("--eos-penalty", type=_number, metavar="X", help="(default: 0.8)")
        group = parser.add_argument_group("replace")
        group.add_argument(
            "--find",
            metavar="TEXT",
            action="append",
            default=[],
            help="text to replace (repeatable, pairs with --replace)",
        )
        group.add_argument("--replace", metavar="TEXT", action="append", default=[], help="its replacement")
        group = parser.add_argument_group("debug")
        group.add_argument(
            "--debug-top-n", type=_positive_int, metavar="N", help="candidates shown per step (default: 2)"
        )
    if not human:
        group = parser.add_argument_group(
            "structured output (the grammar strategy, chained last; combines with the bans)"
        )
        group.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid for this JSON Schema file")
        group.add_argument("--json-object", action="store_true", help="the output is a JSON object (any)")
        group.add_argument("--grammar", metavar="FILE", help="the output follows this Lark or GBNF grammar file")
        group.add_argument("--regex-output", metavar="PATTERN", help="the whole output matches this regex")
    if batch:
        group = parser.add_argument_group("preference pairs (see the README: Traces for preference tuning)")
        group.add_argument(
            "--trace",
            metavar="FILE",
            help="every rewind as a JSON line (the generate --trace records, with the prompt's id)",
        )
        group.add_argument(
            "--pairs",
            metavar="FILE",
            help="the rewinds as DPO pairs in TRL's format ({prompt, chosen, rejected}, with the id)",
        )
        return
    group = parser.add_argument_group("human")
    group.add_argument(
        "--human-top-k", type=_positive_int, metavar="K", help="choices offered at each step (default: 3)"
    )
    group.add_argument(
        "--min-autopass",
        type=_number,
        metavar="P",
        help="accept a token without asking when its probability is at least P (default: 1.0)",
    )

    group = parser.add_argument_group("output")
    group.add_argument(
        "--show-backtracking",
        action="store_true",
        help="show rewound text (struck out, on stderr) and a summary at the end",
    )
    group.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="colour the rewinds (default: auto)"
    )
    group.add_argument(
        "--trace",
        metavar="FILE",
        help="write every rewind as a JSON line: the text before it, the rejected and the chosen "
        "continuation, and the reason (see the README)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="backtrack-sampler",
        description="Generate text with sampling strategies that can rewind (backtrack) what they wrote, "
        "or serve them over an OpenAI-compatible API.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    generate = commands.add_parser(
        "generate",
        help="generate text from a prompt, streamed to stdout",
        description="Generate text from a prompt and stream it to stdout.",
    )
    _add_generation_args(generate)

    human = commands.add_parser(
        "human",
        help="choose the tokens yourself (HumanGuidanceStrategy)",
        description="Generate with HumanGuidanceStrategy: pick the next token in the terminal.",
    )
    _add_generation_args(human, human=True)

    batch = commands.add_parser(
        "batch",
        help="generate completions for a JSONL file of prompts (resumable)",
        description="Generate a completion for every prompt of a JSONL file, many at once "
        "(in process or through --engine), appending them to --output as JSON lines. "
        "Rerunning the same command skips the ids already written.",
    )
    _add_generation_args(batch, batch=True)

    serve = commands.add_parser(
        "serve",
        help="start the OpenAI-compatible HTTP server",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models and /health.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="(default: 8000)")
    serve.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' (default: $BACKTRACK_SAMPLER_API_KEY, else no key)"
    )
    serve.add_argument("--model-name", help="the model id the API reports (default: the model file's name)")
    serve.add_argument(
        "--parallel",
        type=_positive_int,
        metavar="N",
        help="generations run at once, batched (default: 4 per CPU core, at most 8)",
    )
    serve.add_argument(
        "--max-queue",
        type=_non_negative_int,
        metavar="N",
        help="requests that may wait for a slot; beyond: 429 (default: 4 x --parallel)",
    )
    serve.add_argument(
        "--load-strategy",
        metavar="SPEC",
        action="append",
        default=[],
        help="offer this strategy to requests under its name (its `name` attribute, else its class "
        "name): package.module:Class or path/to/file.py:Class (repeatable)",
    )
    _add_model_args(serve, default_model(chat=True))
    _add_limit_args(serve)
    return parser


def _add_limit_args(parser) -> None:
    """One option per field of the server's ``Limits`` (``--max-body-bytes`` ...)."""
    try:
        from ..server.schemas import Limits
    except ImportError:  # no pydantic: `serve` says what to install when it runs
        return
    group = parser.add_argument_group("limits (a request beyond one gets a 400, or 413 for the body, at once)")
    for name, field in Limits.model_fields.items():
        parse = _positive_number if field.annotation is float else _positive_int
        default = "" if field.default is None else f" (default: {field.default})"
        group.add_argument("--" + name.replace("_", "-"), type=parse, metavar="N", help=f"{field.description}{default}")


def _positive_number(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


# --------------------------------------------------------------------------------------------
# generate / human
# --------------------------------------------------------------------------------------------
def _read_prompt(args, stdin: TextIO) -> str:
    if args.prompt is not None and args.prompt != "-":
        prompt = args.prompt
    elif args.command == "human" and args.prompt is None:
        raise UsageError("give the prompt as an argument: stdin is used for your choices")
    elif stdin is None or (args.prompt is None and _isatty(stdin)):
        raise UsageError("no prompt: give it as an argument or on stdin")
    else:
        prompt = stdin.read()
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    return prompt


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
    if antislop is not None and "antislop" not in names:
        steps.insert(0, (strategies.get("antislop"), "antislop", {}))
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
    return _with_grammar(args, plan, strategies)


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
        text = registry.read_text(args.json_schema, "JSON Schema file")
        try:
            params: Dict[str, Any] = {"json_schema": json.loads(text)}
        except json.JSONDecodeError as error:
            raise UsageError(f"{args.json_schema} is not valid JSON: {error}") from None
    elif args.json_object:
        params = {"json_schema": {"type": "object"}}
    elif args.grammar:
        params = {"grammar": registry.read_text(args.grammar, "grammar file")}
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


def _with_grammar(args, plan: List[StrategyCall], strategies: StrategyRegistry) -> List[StrategyCall]:
    """``plan`` with the structured-output flags: given to a ``--strategy grammar`` that has no
    grammar of its own, else a grammar strategy chained last (its mask has the last word)."""
    params = _grammar_params(args)
    if params is None:
        return plan
    kind = strategies.get("grammar")
    for i, call in enumerate(plan):
        if call.name == "grammar" and not any(
            call.kwargs.get(key) is not None for key in ("json_schema", "grammar", "regex")
        ):
            plan[i] = StrategyCall(kind, kind.checked({**call.kwargs, **params}, "--strategy grammar"), call.extra)
            return plan
    return plan + [StrategyCall(kind, kind.checked(params, "--json-schema/--grammar/--regex-output"))]


class _RewindDisplay:
    """Writes the final text and, at the exact place where they happened, the rewound pieces
    (struck out in red on a colour terminal, else as ``[-rewound-]``), from the generation's events."""

    def __init__(self, out: TextIO, err: TextIO, color: Optional[bool]):
        self.out, self.err, self.color = out, err, color  # color None: rewinds are not shown
        self.pending: List = []  # Rewind events after the text written so far
        self.written = 0  # characters of final text written

    def event(self, event) -> None:
        from ..core.events import Done, Final, Rewind

        if isinstance(event, Rewind) and self.color is not None:
            # a rewind to an earlier position replaces the text in which later rewinds happened
            self.pending = [e for e in self.pending if e.at <= event.at] + [event]
        elif isinstance(event, Final):
            text, start = event.text, self.written
            self.written += len(text)
            while self.pending and self.pending[0].at <= self.written:
                rewind = self.pending.pop(0)
                self._write(text[: rewind.at - start])
                text, start = text[rewind.at - start :], rewind.at
                self._strike(rewind.text)
            self._write(text)
        elif isinstance(event, Done):
            for rewind in self.pending:
                self._strike(rewind.text)
            self.pending = []

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def _strike(self, text: str) -> None:
        if text:
            self.out.flush()
            self.err.write(f"\x1b[9;31m{text}\x1b[0m" if self.color else f"[-{text}-]")
            self.err.flush()


def _generate(args, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    from ..core.events import TraceWriter, stream_events
    from ..core.sampler import BacktrackSampler
    from ..strategy.sampling import check_sampling_args

    prompt = _read_prompt(args, stdin)
    top_p = args.top_p
    try:
        check_sampling_args(args.temperature, args.top_k, top_p, args.min_p)
    except ValueError as error:
        raise UsageError(
            str(error)
            .replace("top_k", "--top-k")
            .replace("top_p", "--top-p")
            .replace("min_p", "--min-p")
            .replace("temperature", "--temperature", 1)
        ) from None
    plan = strategy_plan(args, stderr)
    if any(call.name == "human" for call in plan) and not (_isatty(stdin) and _isatty(stdout)):
        raise UsageError("the human strategy needs an interactive terminal (stdin and stdout)")
    trace = _open_trace(args.trace)  # before the model loads: a bad path fails at once
    chat = bool(args.chat or args.system)
    provider = _load(args, chat)
    strategy = build_strategies(plan, provider)
    if chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        prompt_input: Any = chat_prompt_tokens(provider, messages)
    else:
        prompt_input = prompt
    sampler = BacktrackSampler(provider, strategy)
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=top_p,
        min_p=args.min_p,
        seed=args.seed,
        max_rewound_tokens=args.max_rewound_tokens,
    )
    engine_errors: tuple = ()
    if getattr(args, "engine", None):
        from ..engine import EngineError

        engine_errors = (EngineError,)
    color = None
    if args.show_backtracking:
        color = args.color == "always" or (args.color == "auto" and _isatty(stderr) and not os.environ.get("NO_COLOR"))
    display = _RewindDisplay(stdout, stderr, color)
    try:
        writer = TraceWriter(trace, messages if chat else prompt) if trace else None
        for event in stream_events(sampler, prompt_input, **kwargs):
            display.event(event)
            if writer is not None:
                writer.write(event)
    except ValueError as error:  # over-long prompt, max_length too small, ...
        raise UsageError(str(error)) from None
    except engine_errors as error:  # the engine failed or went away
        raise UsageError(str(error)) from None
    finally:
        if trace is not None:
            trace.close()
    stdout.write("\n")
    stdout.flush()
    s = sampler.stats
    if args.show_backtracking:
        stderr.write(
            f"[{s.delivered} tokens delivered, {s.rewound} rewound in {s.rewinds} rewind{'s' * (s.rewinds != 1)}, "
            f"{s.tokens_per_second:.1f} tokens/s, {s.seconds:.1f} s, finish: {s.finish_reason}]\n"
        )
        stderr.flush()
    if s.finish_reason == "constraint":
        stderr.write(
            f"error: the generation stopped: a hard constraint could not be held "
            f"({_constraint_message(strategy, s.constraint)}); the text above ends before it\n"
        )
        stderr.flush()
        return CONSTRAINT_EXIT
    return 0


CONSTRAINT_EXIT = 3  # generate's exit status when a hard constraint could not be held


def _constraint_message(strategy, message: Optional[str]) -> str:
    """``stats.constraint``, naming the strategy when the message does not (a chain names its member)."""
    name = type(strategy).__name__
    message = message or name
    from ..strategy.chain_strategy import ChainStrategy

    if isinstance(strategy, ChainStrategy) or message.startswith(name):
        return message
    return f"{name}: {message}"


def _load(args, chat: bool) -> BaseProvider:
    """The model: loaded here (``--backend``, ``--model``; the embedded instruct model for chat), or
    served by an engine (``--engine``; the tokenizer from ``--tokenizer`` or ``--model``)."""
    if not getattr(args, "engine", None):
        model = args.model if args.model is not None else default_model(chat)  # chat -> the instruct model
        return load_provider(args.backend, model, args.n_ctx, args.threads)
    from ..engine import load_engine_provider

    return load_engine_provider(
        args.engine, args.engine_type, args.tokenizer or args.model, args.n_ctx, args.engine_timeout
    )


def _open_trace(path: Optional[str]) -> Optional[TextIO]:
    if path is None:
        return None
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot write the trace file {path}: {error.strerror or error}") from None


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _batch(args, stdin: TextIO, stderr: TextIO) -> int:
    """``backtrack-sampler batch``: see ``batchfile.run_batch``."""
    from ..strategy.sampling import check_sampling_args
    from .batchfile import BadLine, JsonlOutput, id_key, read_prompts, run_batch

    name = "stdin" if args.input == "-" else args.input
    try:
        if args.input == "-":
            lines = (stdin or sys.stdin).read().splitlines()
        else:
            with open(args.input, encoding="utf-8") as file:
                lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {name}: {getattr(error, 'strerror', None) or error}") from None
    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p, args.min_p)
    except ValueError as error:
        raise UsageError(str(error)) from None
    defaults = dict(
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        max_rewound_tokens=args.max_rewound_tokens,
    )
    prompts, bad = read_prompts(lines, defaults)
    for line in bad[:20]:
        stderr.write(
            f"{'warning' if args.skip_bad_lines else 'error'}: {name} {line}"
            f"{' (skipped)' if args.skip_bad_lines else ''}\n"
        )
    if bad and not args.skip_bad_lines:
        more = f"{len(bad) - 20} more bad lines; " if len(bad) > 20 else ""
        raise UsageError(
            f"{more}{len(bad)} bad line{'s' * (len(bad) > 1)} in {name}: fix them, or pass "
            "--skip-bad-lines to leave them out"
        )
    plan = strategy_plan(args, stderr)
    if any(call.name == "human" for call in plan):
        raise UsageError("the human strategy needs a terminal: it cannot run in batch")
    try:
        output = JsonlOutput(args.output)
        keep = set(output.ids)
        trace = JsonlOutput(args.trace, keep) if args.trace else None
        pairs = JsonlOutput(args.pairs, keep) if args.pairs else None
    except OSError as error:
        raise UsageError(f"cannot write {error.filename}: {error.strerror}") from None
    except ValueError as error:
        raise UsageError(str(error)) from None
    todo = sum(id_key(p.id) not in output.ids for p in prompts)
    if output.dropped:
        stderr.write(f"note: {args.output} ended in a cut-off line (an interrupted run): it was removed\n")
    if len(prompts) > todo and not args.quiet:
        stderr.write(f"resuming: {len(prompts) - todo} of {len(prompts)} prompts are done in {args.output}\n")
    if not todo:
        return 0
    chat = bool(args.chat or args.system is not None or any(p.messages for p in prompts))
    if args.engine:
        parallel = args.parallel or 8
        provider = _load(args, chat)
    else:
        from ..core.batch import default_parallel

        parallel = args.parallel or default_parallel()
        model = args.model if args.model is not None else default_model(chat)
        provider = load_provider(args.backend, model, args.n_ctx, args.threads, slots=parallel)
    if parallel > provider.max_sequences:
        raise UsageError(
            f"--parallel {parallel} is more than the {provider.max_sequences} generations this provider runs at once"
        )
    fatal: tuple = ()
    if args.engine:
        from ..engine import EngineError

        fatal = (EngineError,)
    bar = _progress_bar(todo, stderr, args.quiet)
    say = (lambda text: bar.write(text, file=stderr)) if bar is not None else (lambda text: stderr.write(text + "\n"))
    started = time.perf_counter()

    def progress(summary, tokens: int) -> None:
        if bar is not None:
            elapsed = time.perf_counter() - started
            bar.set_postfix_str(f"{tokens / elapsed:.1f} tok/s, {summary.rewinds} rewinds", refresh=False)
            bar.update(1)

    def on_error(item, error) -> None:
        say(
            f"error: id {item.id!r} (line {item.line}) failed: {type(error).__name__}: {error} (not written; "
            "a rerun tries it again)"
        )

    summary = None
    try:
        summary = run_batch(
            provider,
            prompts,
            lambda: build_strategies(plan, provider),
            output,
            defaults=defaults,
            parallel=parallel,
            chat=bool(args.chat),
            system=args.system,
            base_seed=args.seed,
            trace=trace,
            pairs=pairs,
            progress=progress,
            on_error=on_error,
            on_bad=(lambda line: say(f"warning: {name} {line} (skipped)")) if args.skip_bad_lines else None,
            fatal=fatal,
        )
    except BadLine as error:
        raise UsageError(f"{name} {error} (fix it or pass --skip-bad-lines; rerun to go on)") from None
    except fatal as error:
        raise UsageError(
            f"{error} (completions so far are in {args.output}: run the same command again to go on)"
        ) from None
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        stderr.write(
            f"\ninterrupted: {len(output.ids)} completions are in {args.output}; run the same command again to go on\n"
        )
        return 130
    finally:
        if bar is not None:
            bar.close()
        for file in (output, trace, pairs):
            if file is not None:
                file.close()
    if not args.quiet:
        s = summary
        stderr.write(
            f"[{s.completions} completions written to {args.output}"
            f"{f', {s.failed} failed' if s.failed else ''}{f', {s.bad} bad prompts skipped' if s.bad else ''}; "
            f"{s.delivered} tokens at {s.tokens_per_second:.1f} tokens/s in {s.seconds:.1f} s; {s.rewound} rewound in "
            f"{s.rewinds} rewinds, {s.banned} of them at banned phrases or patterns"
            f"{f'; {s.pairs} preference pairs' if args.pairs else ''}]\n"
        )
        if s.reasons:
            top = ", ".join(f"{reason} x{count}" for reason, count in s.reasons.most_common(5))
            stderr.write(f"[most rewound: {top}]\n")
    return 1 if summary.failed else 0


def _progress_bar(total: int, stderr: TextIO, quiet: bool):
    """A tqdm bar on ``stderr`` (None with --quiet, when it is not a terminal, or without tqdm)."""
    if quiet or not _isatty(stderr):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        stderr.write("note: pip install tqdm for a progress bar\n")
        return None
    return tqdm(total=total, unit="prompt", file=stderr, dynamic_ncols=True, smoothing=0.05)


def _serve(args) -> int:
    try:
        from ..server.app import Limits, serve
    except ImportError as error:
        raise UsageError(
            f"the server needs starlette, uvicorn and pydantic: pip install 'backtrack-sampler[server]' ({error})"
        ) from None
    api_key = args.api_key if args.api_key is not None else os.environ.get("BACKTRACK_SAMPLER_API_KEY") or None
    limits = Limits(**{name: getattr(args, name) for name in Limits.model_fields if getattr(args, name) is not None})
    strategies = StrategyRegistry()
    for spec in args.load_strategy:  # imported and described now: a bad one fails before the model loads
        strategies.load(spec).schema()
    provider = _load(args, chat=True) if args.engine else None  # --engine: a proxy in front of a serving engine
    serve(
        host=args.host,
        port=args.port,
        api_key=api_key,
        backend=args.backend,
        model=args.model,
        n_ctx=args.n_ctx,
        threads=args.threads,
        model_name=args.model_name,
        limits=limits,
        parallel=args.parallel,
        max_queue=args.max_queue,
        provider=provider,
        strategies=strategies,
    )
    return 0


def main(
    argv: Optional[Sequence[str]] = None,
    stdin: Optional[TextIO] = None,
    stdout: Optional[TextIO] = None,
    stderr: Optional[TextIO] = None,
) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage error, 3 a hard
    constraint could not be held (``generate``: the text written is what was final before it),
    130 interrupted)."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    if args.command is None:
        parser.print_help(stderr)
        return 2
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "batch":
            return _batch(args, stdin, stderr)
        return _generate(args, stdin, stdout, stderr)
    except UsageError as error:
        stdout.flush()
        stderr.write(f"error: {error}\n")
        return 1
    except KeyboardInterrupt:
        stdout.flush()
        stderr.write("\ninterrupted\n")
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
