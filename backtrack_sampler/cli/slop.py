"""``backtrack-sampler slop score FILE.jsonl``: the slop measures (``backtrack_sampler.quality.slop``)
of a batch output file, as a table or ``--json``, each with its 95% bootstrap interval;
``--compare A.jsonl B.jsonl``: B minus A, with the interval of each difference; ``--trace`` (the
batch trace of the one FILE) adds the endings at a rewind. The prompts' words are left out of the
over-represented phrases, as ``slop mine`` leaves them out: ``--prompts`` (batch's input file), and
a record's own ``prompt`` or ``messages`` when it has them. ``slop mine`` is ``slop_mine``."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Dict, List, Optional, TextIO

from ..errors import UsageError
from ..quality.slop import Estimate, Output, compare, score
from .batchfile import read_prompts
from .options import positive_int

ENDING_SLACK = 2  # an end-of-text this many tokens after a rewind's position counts as at the rewind


def add_parser(commands):
    """The ``slop`` command and its ``score`` subcommand; returns its subcommands (``mine`` joins them)."""
    slop = commands.add_parser("slop", help="measure slop in generated text", description="Measure slop.")
    actions = slop.add_subparsers(dest="slop_command", metavar="ACTION", required=True)
    parser = actions.add_parser(
        "score",
        help="slop measures of a batch output file",
        description="The slop measures of the completions in a JSONL file (batch's output: "
        '{"text", "finish_reason"} a line), each with its 95%% bootstrap interval.',
    )
    parser.add_argument("files", nargs="*", metavar="FILE.jsonl", help="batch output files (each scored on its own)")
    parser.add_argument(
        "--compare", nargs=2, metavar=("A.jsonl", "B.jsonl"), help="B minus A, with the interval of the difference"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    parser.add_argument("--rounds", type=positive_int, default=1000, metavar="N", help="bootstrap rounds (1000)")
    parser.add_argument(
        "--early-words", type=positive_int, default=50, metavar="N", help="a stop before N words is early (50)"
    )
    parser.add_argument(
        "--trace",
        metavar="TRACE.jsonl",
        help="the batch --trace of the one FILE: adds rewind_endings (ends at or just after a rewind)",
    )
    parser.add_argument(
        "--prompts",
        metavar="PROMPTS.jsonl",
        help="the prompts (batch's input): their words are not counted as over-represented, as slop mine "
        'leaves them out (records with a "prompt" or "messages" of their own need no file)',
    )
    return actions


def prompt_text(prompt: Optional[str], messages: object) -> Optional[str]:
    """A request as text: its prompt, or its messages' contents (None when neither is usable)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(messages, list):
        contents = [m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)]
        return " ".join(contents) or None
    return None


def read_prompt_texts(path: str) -> List[str]:
    """The requests of a prompts file (batch's input) as text."""
    try:
        with open(path, encoding="utf-8") as file:
            prompts, bad = read_prompts(file.read().splitlines())
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None
    if bad:
        raise UsageError(f"{path}: {bad[0]}")
    return [text for p in prompts if (text := prompt_text(p.prompt, p.messages))]


def read_outputs(path: str, trace: Optional[str] = None) -> List[Output]:
    """The completions of a batch output file (lines without a "text" are skipped, e.g. errors),
    with their prompt when a record has one (``prompt`` or ``messages``). With its ``trace`` (batch's ``--trace``), each says whether it ended at a rewind
    (``Output.rewind_ending``: end-of-text drawn where a rewind went back to, or 2 tokens after)."""
    rewound = _rewind_positions(trace) if trace else None
    outputs = []
    try:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UsageError(f"{path}:{number}: not JSON ({error.msg})") from None
                if isinstance(record, dict) and isinstance(record.get("text"), str):
                    ending = None
                    if rewound is not None:
                        end = record.get("delivered", 0) - ENDING_SLACK
                        positions = rewound.get(json.dumps(record.get("id")), [])
                        ending = record.get("finish_reason") == "stop" and any(p >= end for p in positions)
                    prompt = prompt_text(record.get("prompt"), record.get("messages"))
                    outputs.append(Output(record["text"], record.get("finish_reason"), ending, prompt))
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None
    if not outputs:
        raise UsageError(f'{path}: no completion (a JSON line with a "text")')
    return outputs


def _rewind_positions(path: str) -> Dict[str, List[int]]:
    """id (as JSON) -> the positions its rewinds went back to, from a batch trace."""
    positions: Dict[str, List[int]] = {}
    try:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                record = json.loads(line) if line.strip() else {}
                if record.get("type") == "rewind":
                    positions.setdefault(json.dumps(record["id"]), []).append(record["position"])
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None
    except (ValueError, KeyError):
        raise UsageError(f"{path}: not a batch trace (JSON lines with id, type and position)") from None
    return positions


def table(title: str, estimates: Dict[str, Estimate]) -> str:
    """The measures as an aligned table: value and [low, high]."""
    lines = [title, f"{'measure':<22}{'value':>10}  95% interval"]
    for name, e in estimates.items():
        lines.append(f"{name:<22}{e.value:>10.3f}  [{e.low:.3f}, {e.high:.3f}]")
    return "\n".join(lines)


def run(args: argparse.Namespace, stdout: TextIO) -> int:
    """Score each file (or compare two); print a table or JSON."""
    if not args.files and not args.compare:
        raise UsageError("slop score: give FILE.jsonl or --compare A.jsonl B.jsonl")
    if args.trace and len(args.files) != 1:
        raise UsageError("slop score: --trace goes with one FILE (its batch --trace)")
    prompts = read_prompt_texts(args.prompts) if args.prompts else []
    results: Dict[str, Dict[str, Estimate]] = {}
    for path in args.files:
        outputs = read_outputs(path, args.trace)
        results[path] = score(outputs, rounds=args.rounds, prompts=prompts, early_words=args.early_words)
    if args.compare:
        a, b = read_outputs(args.compare[0]), read_outputs(args.compare[1])
        results[f"{args.compare[1]} - {args.compare[0]}"] = compare(
            a, b, rounds=args.rounds, prompts=prompts, early_words=args.early_words
        )
    if args.json:
        json.dump({k: {m: asdict(e) for m, e in v.items()} for k, v in results.items()}, stdout, indent=1)
        stdout.write("\n")
    else:
        stdout.write("\n\n".join(table(k, v) for k, v in results.items()) + "\n")
    return 0
