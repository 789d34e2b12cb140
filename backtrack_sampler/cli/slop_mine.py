"""``backtrack-sampler slop mine PROMPTS.jsonl -o DIR``: generate from a prompt set with the batch
command (``batch.run``: in process or through ``--engine``, resumable, its progress bar and
preference pairs), profile the outputs (``quality.mine.profile``: over-represented words, phrases
and word families against wordfreq's human baseline) and write a ranked ban list.

Round k writes ``DIR/round-k.jsonl`` (the completions), ``round-k.trace.jsonl`` and
``round-k.pairs.jsonl`` (every rewind, and as DPO pairs in TRL's format), and once it is mined the
list so far, ``round-k.slops.json`` and ``round-k.regexes.json`` (what round k+1 bans). When the run
ends the list is ``DIR/slops.json`` (phrases, for ``--slops``) and ``DIR/regexes.json`` (for
``--regex-file``), the evidence of every entry and the measures of every round ``DIR/evidence.json``.
Every list file is written whole (a temporary file, then renamed) and only after a round is mined,
so a run that fails (or a rerun that fails) leaves the last complete list, never an empty or partial
one. With ``--iterations N`` round k+1 generates again with the list so far (whole words) and mines
what the model writes instead; it stops early when a round's over-represented-phrase rate is not at
least ``--min-gain`` (10%) below the round before (that round is not mined). The same command again
resumes: finished rounds are read back, not generated again, and mining them gives the same list.

Outputs of one prompt (the same request on several lines, under other ids) are one document:
``--min-docs`` counts different prompts. ``--multiplier X`` writes soft bans (``[phrase, X]``
pairs, a family as its forms) and the rounds ban that way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Dict, List, Optional, TextIO, Tuple

from ..errors import UsageError
from ..quality.mine import Entry, family_forms, profile
from ..quality.slop import Estimate, score
from . import batch
from .batchfile import id_key, read_prompts
from .options import add_generation_args, number, positive_int
from .slop import prompt_text, read_outputs

MEASURE = "overrep_phrases_per_1k"  # the one the stop rule reads


def add_parser(actions) -> None:
    """The ``slop mine`` subcommand: batch's flags and the miner's."""
    parser = actions.add_parser(
        "mine",
        help="generate from a prompt set and mine the model's own slop into a ban list",
        description="Generate a completion for every prompt of a JSONL file (batch's input), find the words, "
        "phrases and word families the outputs use far more often than human text (wordfreq), and write them "
        "as a ranked ban list with their evidence. --iterations N generates again with the list so far and "
        "mines what the model writes instead. Rerunning the same command resumes.",
    )
    parser.add_argument("input", metavar="PROMPTS.jsonl", help="batch's input: one JSON object a line (- reads stdin)")
    parser.add_argument("-o", "--output", metavar="DIR", required=True, help="folder for the rounds and the list")
    parser.add_argument("--iterations", type=positive_int, default=1, metavar="N", help="rounds (default: 1)")
    group = parser.add_argument_group("mining (see docs/repetition.md)")
    group.add_argument("--min-count", type=positive_int, default=3, metavar="N", help="occurrences (default: 3)")
    group.add_argument("--min-docs", type=positive_int, default=3, metavar="N", help="outputs holding it (default: 3)")
    group.add_argument(
        "--min-ratio", type=number, default=20.0, metavar="X", help="times its human frequency (default: 20)"
    )
    group.add_argument("--max-words", type=positive_int, default=4, metavar="N", help="longest phrase (default: 4)")
    group.add_argument(
        "--max-entries", type=positive_int, default=100, metavar="N", help="entries added per round (default: 100)"
    )
    group.add_argument(
        "--multiplier",
        type=_multiplier,
        metavar="X",
        help="soft bans: write each entry as [phrase, X] (a family as its forms), so a banned phrase is X times as "
        "likely where it began instead of impossible, and ban softly in the rounds (default: hard bans)",
    )
    group.add_argument(
        "--min-gain",
        type=number,
        default=0.1,
        metavar="X",
        help="stop when a round's over-represented-phrase rate is not this much (relative) below the last (0.1)",
    )
    parser.add_argument("--parallel", type=positive_int, metavar="N", help="generations at once (as batch)")
    parser.add_argument("--skip-bad-lines", action="store_true", help="report bad input lines and go on")
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no summaries")
    add_generation_args(parser, batch=True)


def _multiplier(text: str) -> float:
    """An argument type: a soft ban's multiplier, a number in [0, 1)."""
    value = number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 and < 1, got {text!r}")
    return value


def run(args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """Mine ``args.iterations`` rounds (see the module docstring); 0 when done, else batch's status."""
    folder = args.output
    try:
        os.makedirs(folder, exist_ok=True)
        prompts_path = _prompts_file(args.input, folder, stdin)
        with open(prompts_path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except OSError as error:
        raise UsageError(f"cannot use {error.filename}: {error.strerror}") from None
    prompts, _ = read_prompts(lines)
    requests = {id_key(p.id): prompt_text(p.prompt, p.messages) or "" for p in prompts}
    asked = [text for text in requests.values() if text]
    entries: List[Entry] = []
    found: Dict[str, int] = {}  # pattern -> the round that found it
    rounds: List[Dict[str, Any]] = []
    stopped = f"{args.iterations} round{'s' * (args.iterations > 1)} done"
    for k in range(1, args.iterations + 1):
        if not args.quiet:
            stderr.write(f"round {k}/{args.iterations}: {_list_size(entries)} mined so far\n")
        status = batch.run(_round_args(args, prompts_path, folder, k, bool(entries)), stdin, stderr)
        if status:
            return status
        base = os.path.join(folder, f"round-{k}")
        measures = score(read_outputs(base + ".jsonl", base + ".trace.jsonl"), rounds=200, prompts=asked)
        rounds.append({"round": k, "bans": _list_size(entries), "measures": _plain(measures)})
        if not args.quiet:
            stderr.write(f"round {k}: {_measures_line(measures)}\n")
        if k > 1 and not _improved(rounds[-2]["measures"], measures, args.min_gain):
            stopped = f"round {k} did not cut {MEASURE} by {args.min_gain:.0%}: stopped, the list so far kept"
            break
        texts, groups = _texts_by_prompt(base + ".jsonl", requests)
        mined = profile(texts, asked, args.min_count, args.min_docs, args.min_ratio, args.max_words, groups=groups)
        new = [e for e in mined if e.pattern not in found][: args.max_entries]
        if not new:
            stopped = f"round {k} found nothing new to ban: stopped"
            break
        for entry in new:
            found[entry.pattern] = k
        entries = sorted([*entries, *new], key=lambda e: (-e.score, e.pattern))
        _write_list(folder, entries, args.multiplier, f"round-{k}.")  # what round k+1 bans
    _write_list(folder, entries, args.multiplier)
    _write_evidence(folder, entries, found, rounds, stopped)
    stdout.write(_report(folder, entries, found, stopped))
    return 0


def _prompts_file(source: str, folder: str, stdin: TextIO) -> str:
    """The prompts as a file (stdin is read once into DIR/prompts.jsonl: every round reads it)."""
    if source != "-":
        return source
    path = os.path.join(folder, "prompts.jsonl")
    text = stdin.read()
    if text.strip() or not os.path.exists(path):  # a resumed run with an empty stdin reads the copy
        with open(path, "w", encoding="utf-8") as file:
            file.write(text)
    return path


def _round_args(args: argparse.Namespace, prompts: str, folder: str, k: int, banning: bool) -> argparse.Namespace:
    """Batch's arguments for round ``k``: its files, and the list so far on top of the user's bans."""
    base = os.path.join(folder, f"round-{k}")
    extra: Dict[str, Any] = {}
    if banning:  # the list after round k-1
        extra = dict(
            slops=[*args.slops, os.path.join(folder, f"round-{k - 1}.slops.json")],
            regex_file=[*args.regex_file, os.path.join(folder, f"round-{k - 1}.regexes.json")],
            whole_words=True,
        )
    values = {**vars(args), "command": "batch", "input": prompts, "output": base + ".jsonl"}
    return argparse.Namespace(**{**values, "trace": base + ".trace.jsonl", "pairs": base + ".pairs.jsonl", **extra})


def _texts_by_prompt(path: str, requests: Dict[str, str]) -> Tuple[List[str], List[str]]:
    """The completions of a round and, for each, its prompt's text (outputs of one prompt, under
    other ids, are one document to ``profile``: an entry must recur across different prompts)."""
    texts, groups = [], []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line) if line.strip() else None
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                key = json.dumps(record.get("id"))  # (id_key)
                texts.append(record["text"])
                groups.append(requests.get(key) or key)
    return texts, groups


def _write_list(folder: str, entries: List[Entry], multiplier: Optional[float] = None, prefix: str = "") -> None:
    """PREFIXslops.json and PREFIXregexes.json: JSON lists that --slops and --regex-file read,
    ranked, each written whole (``_write_json``). With a ``multiplier`` (soft bans) slops.json holds
    [phrase, multiplier] pairs, a family as its forms (``family_forms``: a regex is always a hard
    ban), and regexes.json is empty."""
    if multiplier is None:
        phrases: List[Any] = [e.pattern for e in entries if e.kind == "phrase"]
        regexes = [e.pattern for e in entries if e.kind == "regex"]
    else:
        forms = (family_forms(e) if e.kind == "regex" else [e.pattern] for e in entries)
        phrases, regexes = [[form, multiplier] for group in forms for form in group], []
    _write_json(os.path.join(folder, prefix + "slops.json"), phrases)
    _write_json(os.path.join(folder, prefix + "regexes.json"), regexes)


def _write_evidence(folder: str, entries: List[Entry], found: Dict[str, int], rounds: list, stopped: str) -> None:
    listed = [
        {
            "pattern": e.pattern,
            "kind": e.kind,
            "count": e.count,
            "docs": e.docs,
            "ratio": round(e.ratio, 1),
            "score": round(e.score, 2),
            "round": found[e.pattern],
            **({"members": list(e.members)} if e.members else {}),
        }
        for e in entries
    ]
    _write_json(os.path.join(folder, "evidence.json"), {"entries": listed, "rounds": rounds, "stopped": stopped})


def _write_json(path: str, value: Any) -> None:
    """``value`` as JSON in ``path``, whole or not at all: written to a temporary file beside it, then
    renamed over it (a failure leaves the old file as it was)."""
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(value, file, ensure_ascii=False, indent=1)
            file.write("\n")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _plain(measures: Dict[str, Estimate]) -> Dict[str, Dict[str, float]]:
    return {name: {"value": e.value, "low": e.low, "high": e.high} for name, e in measures.items()}


def _improved(before: Dict[str, Dict[str, float]], after: Dict[str, Estimate], gain: float) -> bool:
    """Whether the rate fell by at least ``gain`` (relative) from ``before``."""
    old = before[MEASURE]["value"]
    return old > 0 and after[MEASURE].value <= old * (1 - gain)


def _list_size(entries: List[Entry]) -> str:
    regexes = sum(e.kind == "regex" for e in entries)
    return f"{len(entries) - regexes} phrases and {regexes} regexes"


def _measures_line(measures: Dict[str, Estimate]) -> str:
    shown = (MEASURE, "overrep_per_1k", "mattr", "loops", "early_endings", "rewind_endings")
    return ", ".join(
        f"{name} {measures[name].value:.3g} [{measures[name].low:.3g}, {measures[name].high:.3g}]"
        for name in shown
        if name in measures
    )


def _report(folder: str, entries: List[Entry], found: Dict[str, int], stopped: str, top: Optional[int] = 25) -> str:
    lines = [f"{'rank':>4}  {'pattern':<32} {'kind':<6} {'count':>5} {'docs':>4} {'ratio':>9} {'round':>5}"]
    for rank, e in enumerate(entries[:top], 1):
        ratio = f"{e.ratio:9.0f}" if math.isfinite(e.ratio) else f"{'inf':>9}"
        lines.append(f"{rank:4d}  {e.pattern:<32} {e.kind:<6} {e.count:5d} {e.docs:4d} {ratio} {found[e.pattern]:5d}")
    if len(entries) > (top or 0):
        lines.append(f"  ... {len(entries) - (top or 0)} more in {os.path.join(folder, 'evidence.json')}")
    slops, regexes = os.path.join(folder, "slops.json"), os.path.join(folder, "regexes.json")
    lines.append(
        f"[{_list_size(entries)} in {slops} and {regexes}; {stopped}. "
        f"Use them: --slops {slops} --regex-file {regexes} --whole-words]"
    )
    return "\n".join(lines) + "\n"
