"""The command line's building blocks: argument types (``positive_int``, ``number``, ``port`` ...),
the parser class (one-line errors, exit status 2), the model flags every command has
(``add_model_args``; what they load is ``model.load``) and the flags ``generate``, ``human`` and
``batch`` share (``add_generation_args``: prompt format, model, sampling, strategies, antislop,
structured output; what the strategy flags become is ``plan.strategy_plan``)."""

from __future__ import annotations

import argparse
from typing import Callable

from ..provider.models import BACKENDS, MODELS, default_model
from ..strategy.registry import BUILTINS


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argument type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def number(text: str) -> float:
    """An argument type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_number(text: str) -> float:
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def port(text: str) -> int:
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {value}")
    return value


class StrategyAction(argparse.Action):
    """``--strategy SPEC``: appends ``[SPEC, None]`` to the chain."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), (value, None)])


class StrategyArgsAction(argparse.Action):
    """``--strategy-args JSON``: the JSON text of the last ``--strategy`` (parsed in ``strategy_plan``)."""

    def __call__(self, parser, namespace, value, option_string=None):
        chain = list(getattr(namespace, self.dest, None) or [])
        if not chain or chain[-1][1] is not None:
            parser.error("--strategy-args goes right after the --strategy it is for")
        chain[-1] = (chain[-1][0], value)
        setattr(namespace, self.dest, chain)


class Parser(argparse.ArgumentParser):
    """argparse with errors as one line ``error: ...`` (plus a hint) and exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def isatty(stream) -> bool:
    """Whether ``stream`` is a terminal (False for anything without a working ``isatty``)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def add_model_args(parser, default: str) -> None:
    """--backend, --model, --n-ctx, --threads and the serving engine's flags (``default``: the
    default model, for the help)."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--backend",
        choices=(*BACKENDS, "vllm"),
        default="llamacpp",
        help="model backend (default: llamacpp); vllm: vLLM in this process, --model a Hugging Face folder",
    )
    group.add_argument(
        "--model",
        metavar="NAME|PATH",
        help=f"an embedded model ({', '.join(MODELS)}), a .gguf file (llamacpp, transformers or mlx) "
        f"or a local transformers or MLX model folder (default: {default})",
    )
    group.add_argument("--n-ctx", type=positive_int, metavar="N", help="context size for llamacpp (default: 8192)")
    group.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads (default: all cores)")
    group.add_argument(
        "--vllm-arg",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="a vLLM engine argument for --backend vllm, e.g. tensor_parallel_size=2, "
        "gpu_memory_utilization=0.8, distributed_executor_backend=ray (repeatable; values read as JSON)",
    )
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
        "--engine-timeout", type=number, metavar="S", default=60.0, help="seconds to wait for the engine (default: 60)"
    )


def add_generation_args(parser, human: bool = False, batch: bool = False) -> None:
    """The flags of ``generate`` (and of ``human``: no strategy, creative, replace, debug or
    structured-output flags; and of ``batch``: its own --seed help), after the command's own
    positional arguments and before its own groups."""
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    parser.add_argument("--system", metavar="TEXT", help="system message (implies --chat)")
    add_model_args(parser, f"{default_model(chat=True)} with --chat/--system, else {default_model()}")

    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=number, default=1.0, help="0 is greedy (default: 1.0)")
    group.add_argument("--top-k", type=non_negative_int, default=50, help="0 turns it off (default: 50)")
    group.add_argument("--top-p", type=number, help="nucleus sampling, in (0, 1] (default: off)")
    group.add_argument("--min-p", type=number, help="in [0, 1] (default: off)")
    group.add_argument(
        "--seed",
        type=int,
        help="random seed, for reproducible output"
        + (" (line N without a seed of its own gets SEED + N)" if batch else ""),
    )
    group.add_argument("--max-new-tokens", type=non_negative_int, default=256, help="(default: 256)")
    group.add_argument("--max-length", type=positive_int, help="limit on prompt + generated tokens")
    group.add_argument(
        "--max-rewound-tokens",
        type=non_negative_int,
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
            action=StrategyAction,
            default=[],
            help=f"a built-in ({', '.join(BUILTINS)}), package.module:Class or path/to/file.py:Class "
            "(default: none; antislop, chained first, when --slops/--ban/--regex is given)",
        )
        group.add_argument(
            "--strategy-args",
            metavar="JSON",
            dest="strategies",
            action=StrategyArgsAction,
            help="the parameters of the --strategy before it, a JSON object, e.g. '{\"max_bans\": 3}' "
            "(they win over the flags below)",
        )
        group.add_argument(
            "--scope",
            metavar="[NAME=]SCOPE",
            action="append",
            default=[],
            help="where a reasoning model's strategies act: reasoning (inside <think>...</think>), answer or both; "
            "NAME=SCOPE for one strategy (antislop: the bans, grammar: structured output), SCOPE for every one "
            "(repeatable; default: both, structured output only on the answer of a model with reasoning markers)",
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
    group.add_argument("--adjustment-strength", type=number, metavar="X", help="how strongly slop multipliers apply")
    group.add_argument(
        "--keep-index-buffer",
        type=non_negative_int,
        metavar="N",
        help="extra tokens held back before they are final (default: 0)",
    )
    group.add_argument("--case-sensitive", action="store_true", help="match phrases case-sensitively")
    group.add_argument("--whole-words", action="store_true", help="match phrases only as whole words")
    if human:
        return
    group = parser.add_argument_group("creative")
    group.add_argument("--top-p-flat", type=number, metavar="P", help="(default: 0.65)")
    group.add_argument("--top-k-threshold-flat", type=positive_int, metavar="K", help="(default: 9)")
    group.add_argument("--eos-penalty", type=number, metavar="X", help="(default: 0.8)")
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
    group.add_argument("--debug-top-n", type=positive_int, metavar="N", help="candidates shown per step (default: 2)")
    group = parser.add_argument_group("structured output (the grammar strategy, chained last; combines with the bans)")
    group.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid for this JSON Schema file")
    group.add_argument("--json-object", action="store_true", help="the output is a JSON object (any)")
    group.add_argument("--grammar", metavar="FILE", help="the output follows this Lark or GBNF grammar file")
    group.add_argument("--regex-output", metavar="PATTERN", help="the whole output matches this regex")
