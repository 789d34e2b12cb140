"""``backtrack-sampler batch``: a JSONL file of prompts to a JSONL file of completions, many
generations at once (in process, or through ``--engine``), resumable (the ids already written are
skipped). This module is the command: its flags, the checks before the model loads, the progress
bar and the summary; reading, running and writing the files is ``batchfile``."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ..errors import UsageError
from ..strategy.registry import build_strategies
from .model import load
from .options import add_generation_args, isatty, positive_int
from .plan import strategy_plan


def add_parser(commands) -> None:
    """The ``batch`` subcommand and its flags."""
    parser = commands.add_parser(
        "batch",
        help="generate completions for a JSONL file of prompts (resumable)",
        description="Generate a completion for every prompt of a JSONL file, many at once "
        "(in process or through --engine), appending them to --output as JSON lines. "
        "Rerunning the same command skips the ids already written.",
    )
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
        type=positive_int,
        metavar="N",
        help="generations at once (default: 4 per CPU core, at most 8; with --engine: 8)",
    )
    parser.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="report bad input lines and go on (default: stop before generating anything)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    add_generation_args(parser, batch=True)
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


def run(args, stdin: TextIO, stderr: TextIO) -> int:
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
    else:
        from ..core.batch import default_parallel

        parallel = args.parallel or default_parallel()
    provider = load(args, chat, slots=parallel)  # slots: sequences of a local model (not for --engine)
    if parallel > provider.max_sequences:
        raise UsageError(
            f"--parallel {parallel} is more than the {provider.max_sequences} generations this provider runs at once"
        )
    fatal: tuple = ()
    if args.engine:
        from ..engine import EngineError

        fatal = (EngineError,)
    bar = _progress_bar(todo, stderr, args.quiet)

    def say(text: str) -> None:
        if bar is not None:
            bar.write(text, file=stderr)
        else:
            stderr.write(text + "\n")

    started = time.perf_counter()

    def progress(summary, tokens: int) -> None:
        if bar is not None:
            elapsed = time.perf_counter() - started
            bar.set_postfix_str(f"{tokens / elapsed:.1f} tok/s, {summary.rewinds} rewinds", refresh=False)
            bar.update(1)

    def on_bad(line: BadLine) -> None:
        say(f"warning: {name} {line} (skipped)")

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
            lambda prompt: build_strategies(plan, provider, prompt),
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
            on_bad=on_bad if args.skip_bad_lines else None,
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
        for jsonl in (output, trace, pairs):
            if jsonl is not None:
                jsonl.close()
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
    if quiet or not isatty(stderr):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        stderr.write("note: pip install tqdm for a progress bar\n")
        return None
    return tqdm(total=total, unit="prompt", file=stderr, dynamic_ncols=True, smoothing=0.05)
