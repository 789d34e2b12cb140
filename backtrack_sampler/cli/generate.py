"""``backtrack-sampler generate`` (stream the text to stdout) and ``backtrack-sampler human``
(choose the tokens in the terminal: the human strategy): their flags, the prompt (argument or
stdin, plain or as a chat), the generation and its terminal rendering (``RewindDisplay``: the
rewound pieces struck out where they happened, ``--show-backtracking``), the ``--trace`` file and
the exit status (``CONSTRAINT_EXIT`` when a hard constraint could not be held)."""

from __future__ import annotations

import os
from typing import Any, List, Optional, TextIO

from ..errors import UsageError
from ..provider.chat import chat_prompt_tokens
from ..strategy.registry import build_strategies
from .model import load
from .options import add_generation_args, isatty, number, positive_int
from .plan import strategy_plan

CONSTRAINT_EXIT = 3  # generate's exit status when a hard constraint could not be held


def add_parsers(commands) -> None:
    """The ``generate`` and ``human`` subcommands and their flags."""
    generate = commands.add_parser(
        "generate",
        help="generate text from a prompt, streamed to stdout",
        description="Generate text from a prompt and stream it to stdout.",
    )
    _add_args(generate)
    human = commands.add_parser(
        "human",
        help="choose the tokens yourself (HumanGuidanceStrategy)",
        description="Generate with HumanGuidanceStrategy: pick the next token in the terminal.",
    )
    _add_args(human, human=True)


def _add_args(parser, human: bool = False) -> None:
    parser.add_argument("prompt", nargs="?", help="the prompt (default: read from stdin)")
    add_generation_args(parser, human=human)
    group = parser.add_argument_group("human")
    group.add_argument(
        "--human-top-k", type=positive_int, metavar="K", help="choices offered at each step (default: 3)"
    )
    group.add_argument(
        "--min-autopass",
        type=number,
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


def _read_prompt(args, stdin: TextIO) -> str:
    if args.prompt is not None and args.prompt != "-":
        prompt = args.prompt
    elif args.command == "human" and args.prompt is None:
        raise UsageError("give the prompt as an argument: stdin is used for your choices")
    elif stdin is None or (args.prompt is None and isatty(stdin)):
        raise UsageError("no prompt: give it as an argument or on stdin")
    else:
        prompt = stdin.read()
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    return prompt


class RewindDisplay:
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


def run(args, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """``generate`` or ``human``: the text to ``stdout`` (the rewinds and the summary, with
    --show-backtracking, to ``stderr``); returns the exit status."""
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
    if any(call.name == "human" for call in plan) and not (isatty(stdin) and isatty(stdout)):
        raise UsageError("the human strategy needs an interactive terminal (stdin and stdout)")
    trace = _open_trace(args.trace)  # before the model loads: a bad path fails at once
    chat = bool(args.chat or args.system)
    provider = load(args, chat)
    if chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        prompt_input: Any = chat_prompt_tokens(provider, messages)
    else:
        prompt_input = prompt
    strategy = build_strategies(plan, provider, prompt_input if chat else provider.encode(prompt))
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
        color = args.color == "always" or (args.color == "auto" and isatty(stderr) and not os.environ.get("NO_COLOR"))
    display = RewindDisplay(stdout, stderr, color)
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


def _constraint_message(strategy, message: Optional[str]) -> str:
    """``stats.constraint``, naming the strategy when the message does not (a chain names its member)."""
    name = type(strategy).__name__
    message = message or name
    from ..strategy.chain_strategy import ChainStrategy

    if isinstance(strategy, ChainStrategy) or message.startswith(name):
        return message
    return f"{name}: {message}"


def _open_trace(path: Optional[str]) -> Optional[TextIO]:
    if path is None:
        return None
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot write the trace file {path}: {error.strerror or error}") from None
