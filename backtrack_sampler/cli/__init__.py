"""The ``backtrack-sampler`` command (``main``): ``generate`` (stream text to stdout), ``human``
(guide the model token by token in the terminal), ``batch`` (a JSONL file of prompts to a JSONL
file of completions, resumable), ``serve`` (an OpenAI-compatible HTTP server) and ``slop``
(``score``: slop measures of outputs; ``mine``: a model's own slop as a ban list).

One module a command (``generate``, ``batch``, ``serve``) with its flags and its run; the shared
argument types and flags are in ``options``, the flags' strategy chain in ``plan``
(``strategy_plan``), the model in ``model`` (``load``), the batch files in ``batchfile``. This
module builds the parser, dispatches and turns errors into exit statuses.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence, TextIO

from ..errors import UsageError
from . import batch, generate, serve, slop, slop_mine
from .generate import CONSTRAINT_EXIT
from .options import Parser
from .plan import strategy_plan

__all__ = ["CONSTRAINT_EXIT", "build_parser", "main", "strategy_plan"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="backtrack-sampler",
        description="Generate text with sampling strategies that can rewind (backtrack) what they wrote, "
        "or serve them over an OpenAI-compatible API.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    generate.add_parsers(commands)  # generate, human
    batch.add_parser(commands)
    serve.add_parser(commands)
    slop_mine.add_parser(slop.add_parser(commands))  # slop score, slop mine
    return parser


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
            return serve.run(args)
        if args.command == "slop":
            return slop_mine.run(args, stdin, stdout, stderr) if args.slop_command == "mine" else slop.run(args, stdout)
        if args.command == "batch":
            return batch.run(args, stdin, stderr)
        return generate.run(args, stdin, stdout, stderr)
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
