"""``bench/quality_bench.py --suite mine``: a ban list mined from the model's own stories (issue 28)
against plain sampling and the shared lists, on the embedded chat model (SmolLM2 135M Instruct).

Two held-apart sets of story requests (never the same subject): ``slop mine`` generates from the
mining set (``--mine-samples`` 4 stories per request, other seeds: an entry must recur across
different requests, and counts the requests it is in; 3 rounds, the rounds banning softly with
``--multiplier`` 0.25); every row then generates from the scoring set with ``batch`` (one story per
request, the same seeds in every row) and is scored there:

* plain: no bans;
* the 517-phrase list (antislop's, ../shared/data/antislop; the row is left out, with a note, when
  it is absent) and the package's built-in list (``strategy.slop_phrases``), hard bans;
* mined, 1 round: the entries ``slop mine`` found in the plain mining stories, hard bans (whole words);
* mined, 1 round, soft: the same entries as soft bans (each ``--multiplier`` times as likely where
  it began; a family as its forms), and with ``--multiplier-too`` (0.1) as well;
* mined, 3 rounds, soft: and those found when generating again with the list so far;
* mined 3 soft + repetition: that list chained with ``--strategy repetition``;
* repetition only: ``--strategy repetition`` without bans (what the last row owes to it).

Reported per row, each with its 95% bootstrap interval: the over-represented-phrase rate
(``overrep_phrases_per_1k``: each row's own profile, what ``slop mine`` would ban in it, the scoring
requests' words left out as the miner leaves them out) and its cut against plain (the interval of
the difference, over plain's value), MATTR, loops, early endings, endings at a rewind (from the
trace), the mean NLL per token under the plain model and its change against plain, tokens/s (the
batch run's, 8 generations at once) and rewinds per token.

    .venv/bin/python bench/quality_bench.py --suite mine            # 24 (x4) + 24 prompts x 200 tokens
    .venv/bin/python bench/quality_bench.py --suite mine --quick    # 12 (x2) + 12 prompts x 120 tokens
    .venv/bin/python bench/quality_bench.py --suite mine --short    # 1 mining round; plain, built-in, mined rows
"""

from __future__ import annotations

import io
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

SUBJECTS = [  # written for this benchmark; even ones mine, odd ones score
    "a clockmaker who builds a clock that runs backwards",
    "two sisters who inherit a failing orchard",
    "a mail carrier on the last route before the town is flooded for a dam",
    "an astronaut who hears a knock on the outside of the station",
    "a boy who trains a crow to bring back lost things",
    "a retired opera singer who opens a noodle shop",
    "a village that wakes up to find the sea has gone",
    "a translator who discovers a word no one else can hear",
    "a night-shift nurse and a patient who claims to be from the future",
    "a beekeeper whose bees start building in the shape of letters",
    "a chess player who keeps losing to a stranger in the park",
    "a family moving into a house where the previous owners left a dog",
    "a lighthouse keeper who finds a message in a bottle addressed to her",
    "a baker who can taste people's memories in bread",
    "a girl who swaps voices with her grandmother for a day",
    "a taxi driver who picks up the same passenger every midnight",
    "a robot janitor in an empty museum",
    "a fisherman who catches a key instead of a fish",
    "a school where the teachers are all retired pirates",
    "a mapmaker who draws a town that does not exist yet",
    "a violinist who plays for a choir of whales",
    "a detective who can only solve cases while knitting",
    "an old woman who grows a forest on her balcony",
    "a painter who loses the color blue",
    "a train conductor on a line that runs through the seasons",
    "a librarian who finds a book that writes back",
    "a snowman who wants to see the summer",
    "a thief who steals only shadows",
    "a gardener who plants a seed from the moon",
    "a pair of twins who each remember a different childhood",
    "a radio host who receives calls from the year 1950",
    "a shepherd who counts one sheep too many",
    "a tailor who sews a coat that makes its wearer brave",
    "a cat that runs a small hotel",
    "a firefighter afraid of the dark",
    "a town where it rains upward once a year",
    "a young inventor who builds a machine to catch dreams",
    "an elderly couple who open a roller-skating rink",
    "a soldier who carries a pocketful of seeds home from war",
    "a bus of strangers stuck in a snowstorm",
    "a musician who can hear colors",
    "a scientist who shrinks herself by accident",
    "a king who trades his crown for a bicycle",
    "a ghost who haunts a laundromat",
    "a desert town that finds a whale skeleton",
    "a child who writes letters to the wind",
    "a pianist who plays at a hospital every Sunday",
    "a street sweeper who finds a door in a wall",
]
MEASURES = (
    "overrep_phrases_per_1k",
    "overrep_per_1k",
    "mattr",
    "loops",
    "early_endings",
    "rewind_endings",
)


def run_cli(argv: List[str]) -> Tuple[float, str]:
    """``backtrack-sampler ARGV`` in this process: (wall seconds, stderr); exits on an error."""
    from backtrack_sampler.cli import main

    err = io.StringIO()
    started = time.perf_counter()
    status = main(argv, stdout=io.StringIO(), stderr=err)
    if status:
        sys.exit(f"backtrack-sampler {' '.join(argv[:2])} failed ({status}):\n{err.getvalue()[-3000:]}")
    return time.perf_counter() - started, err.getvalue()


def write_prompts(path: Path, subjects: List[str], samples: int = 1) -> None:
    """The story requests, each ``samples`` times (ids i, i + n, i + 2n...: other lines, other seeds)."""
    lines = [
        json.dumps(
            {"id": k * len(subjects) + i, "messages": [{"role": "user", "content": f"Write a short story about {s}."}]}
        )
        for k in range(samples)
        for i, s in enumerate(subjects)
    ]
    path.write_text("\n".join(lines) + "\n")


def mine_suite(args) -> int:
    from backtrack_sampler.quality.mine import Entry, family_forms
    from backtrack_sampler.quality.slop import bootstrap, compare, score
    from backtrack_sampler.strategy.slop_phrases import SLOP_PHRASES

    quick = args.quick
    count = min(args.prompts or (12 if quick else 24), len(SUBJECTS) // 2)
    tokens = args.tokens if args.tokens != 200 or not quick else 120
    samples = args.mine_samples or (2 if quick else 4)
    soft = args.multiplier
    work = Path(args.work or tempfile.mkdtemp(prefix="quality-mine-"))
    work.mkdir(parents=True, exist_ok=True)
    mining, scoring = work / "mining.jsonl", work / "scoring.jsonl"
    write_prompts(mining, SUBJECTS[0::2][:count], samples)
    write_prompts(scoring, SUBJECTS[1::2][:count])
    sampling = ["--max-new-tokens", str(tokens), "--seed", str(args.seed)]
    sampling += ["--temperature", str(args.temperature), "--top-k", str(args.top_k)]
    sampling += ["--min-p", str(args.min_p)] if args.min_p is not None else []
    sampling += ["--threads", str(args.threads)] if args.threads else []
    sampling += ["--model", args.model, "--n-ctx", str(256 + 2 * tokens)]  # per sequence: prompt + story
    print(
        f"model {args.model}: mining {count} prompts x {samples} stories, scoring {count} others, {tokens} tokens, "
        f"{' '.join(sampling[4:])}; soft bans x{soft}; files in {work}",
        flush=True,
    )
    started = time.perf_counter()
    iterations = str(1 if args.short else 3)
    mine = [
        "slop",
        "mine",
        str(mining),
        "-o",
        str(work / "mine"),
        "--iterations",
        iterations,
        "--multiplier",
        str(soft),
    ]
    seconds, log = run_cli([*mine, *sampling])
    evidence = json.loads((work / "mine" / "evidence.json").read_text())
    print(f"mined in {seconds:.0f} s: {evidence['stopped']}", flush=True)
    for line in log.splitlines():
        if line.startswith("round ") and ":" in line and "mined so far" not in line:
            print("  " + line)
    first = [e for e in evidence["entries"] if e["round"] == 1]
    rows: Dict[str, Tuple[List[str], int]] = {"plain": ([], 0)}  # name -> (flags, bans)
    shared = args.data / "slop_phrase_prob_adjustments.json"
    if args.short:
        pass  # (the 517-list row is left out)
    elif shared.is_file():
        phrases = [p for p, _ in json.loads(shared.read_text())]
        rows["517 list"] = (["--slops", str(write_list(work / "517.json", phrases))], len(phrases))
    else:
        print(f"note: {shared} is absent (../shared): the 517-list row is left out")
    rows["built-in list"] = (["--slops", str(write_list(work / "builtin.json", list(SLOP_PHRASES)))], len(SLOP_PHRASES))
    phrases = write_list(work / "1-round.slops.json", [e["pattern"] for e in first if e["kind"] == "phrase"])
    regexes = write_list(work / "1-round.regexes.json", [e["pattern"] for e in first if e["kind"] == "regex"])
    rows["mined, 1 round"] = (["--slops", str(phrases), "--regex-file", str(regexes), "--whole-words"], len(first))
    rows[f"mined, 1 round, soft x{soft}"] = (
        ["--slops", str(work / "mine" / "round-1.slops.json"), "--whole-words"],
        len(first),
    )
    if args.multiplier_too is not None and not args.short:  # the same list with another multiplier
        other = args.multiplier_too
        forms = [
            f
            for e in first
            for f in family_forms(Entry(e["pattern"], e["kind"], 0, 0, 0.0, tuple(e.get("members", ()))))
        ]
        path = write_list(work / f"1-round.x{other}.slops.json", [[f, other] for f in forms])
        rows[f"mined, 1 round, soft x{other}"] = (["--slops", str(path), "--whole-words"], len(first))
    everything = ["--slops", str(work / "mine" / "slops.json"), "--whole-words"]
    rounds = len(evidence["rounds"])
    if rounds > 1:
        rows[f"mined, {rounds} rounds, soft x{soft}"] = (everything, len(evidence["entries"]))
    rows[f"mined {rounds} soft + repetition"] = ([*everything, "--strategy", "repetition"], len(evidence["entries"]))
    if not args.short:
        rows["repetition only"] = (["--strategy", "repetition"], 0)  # what the repetition strategy alone does

    scorer = NllScorer(args.model, tokens, args.threads)
    results = {}
    for name, (flags, bans) in rows.items():
        out = work / f"score-{name.replace(' ', '_').replace(',', '')}.jsonl"
        trace = out.with_suffix(".trace.jsonl")
        _, log = run_cli(["batch", str(scoring), "-o", str(out), "--trace", str(trace), *sampling, *flags])
        found = re.search(r"at ([\d.]+) tokens/s", log)
        tps = float(found.group(1)) if found else float("nan")  # batch's own: tokens / its run's wall time
        results[name] = {**measure(out, trace, scoring, scorer, score), "bans": bans, "tps": tps}
        print(f"  {name}: {results[name]['line']}", flush=True)

    plain = results["plain"]
    print(
        f"\n== {args.model}: {count} scoring prompts x {tokens} tokens (mined on {count} others x {samples} stories), "
        f"{' '.join(sampling[4:])}; 95% bootstrap intervals =="
    )
    print(
        f"{'setting':28} {'bans':>5} {'over-rep. phrases/1k':>21} {'cut vs plain':>17} {'MATTR':>17} "
        f"{'loops':>5} {'early':>5} {'rw-end':>6} {'NLL':>17} {'NLL +':>5} {'tok/s':>6} {'rw/tok':>6}"
    )
    asked = [m["content"] for r in map(json.loads, scoring.read_text().splitlines()) for m in r["messages"]]
    plain_nll = bootstrap(plain["nll"], 1.0, rounds=10).value
    for name, r in results.items():
        diff = compare(plain["outputs"], r["outputs"], rounds=1000, prompts=asked)["overrep_phrases_per_1k"]
        base = plain["scores"]["overrep_phrases_per_1k"].value or 1.0
        cut = f"{-diff.value / base:4.0%} [{-diff.high / base:.0%},{-diff.low / base:.0%}]" if name != "plain" else ""
        s, nll = r["scores"], bootstrap(r["nll"], 1.0)
        print(
            f"{name:28} {r['bans']:>5} {fmt(s['overrep_phrases_per_1k'], 1):>21} {cut:>17} {fmt(s['mattr'], 3):>17} "
            f"{count_of(s['loops'], r):>5} {count_of(s['early_endings'], r):>5} {count_of(s['rewind_endings'], r):>6} "
            f"{fmt(nll, 3):>17} {nll.value / plain_nll - 1:5.1%} {r['tps']:6.1f} {r['rewinds_per_token']:6.3f}"
        )
    print(
        "bans: entries (phrases, word families); over-rep. phrases/1k: each row's own profile (quality.mine.profile: "
        "over-represented words,\nphrases and word families, the requests' words left out); cut vs plain: its fall, "
        "with the interval of the difference;\nloops, early (stopped before 50 words), rw-end (ended at a rewind): "
        "outputs; NLL: nats/token under the plain model, NLL +: against plain;\ntok/s: the batch run's (8 at once); "
        "rw/tok: rewinds per delivered token"
    )
    if not args.short:
        endings_check(args, work, evidence["entries"])
    print(f"total time {time.perf_counter() - started:.0f} s")
    return 0


def endings_check(args, work: Path, entries: list) -> None:
    """Endings at a rewind, before and after AntiSlopStrategy excludes end-of-text where a ban holds:
    two-sentence stories (they end by themselves), the mined list and the built-in one banned."""
    from backtrack_sampler import AntiSlopStrategy
    from backtrack_sampler.cli.batchfile import JsonlOutput, read_prompts, run_batch
    from backtrack_sampler.cli.slop import read_outputs
    from backtrack_sampler.provider.models import load_provider
    from backtrack_sampler.strategy.slop_phrases import SLOP_PHRASES

    class Before(AntiSlopStrategy):
        end_at_rewind = True

    count = args.prompts or (12 if args.quick else 24)
    lines = [
        json.dumps({"id": i, "messages": [{"role": "user", "content": f"Write a two-sentence story about {s}."}]})
        for i, s in enumerate(SUBJECTS[: 2 * count])
    ]
    prompts, _ = read_prompts(lines, {})
    phrases = [e["pattern"] for e in entries if e["kind"] == "phrase"] + list(SLOP_PHRASES)
    regexes = [e["pattern"] for e in entries if e["kind"] == "regex"]
    provider = load_provider("llamacpp", args.model, 512, args.threads, 8)
    sampling = dict(max_new_tokens=100, temperature=args.temperature, top_k=args.top_k or None, min_p=args.min_p)
    print(
        f"\n== endings at a rewind: {len(prompts)} two-sentence stories x 100 tokens, {len(phrases)} phrases "
        f"+ {len(regexes)} regexes banned (the mined 3-round list and the built-in one) =="
    )
    for name, kind in (
        ("end-of-text allowed where a ban holds (before)", Before),
        ("excluded there (now)", AntiSlopStrategy),
    ):
        path, trace = work / f"endings-{kind.__name__}.jsonl", work / f"endings-{kind.__name__}.trace.jsonl"
        with JsonlOutput(str(path)) as output, JsonlOutput(str(trace)) as traced:
            summary = run_batch(
                provider,
                prompts,
                lambda: kind(provider, phrases, regexes=regexes, whole_words=True),
                output,
                defaults=sampling,
                base_seed=args.seed,
                trace=traced,
            )
        outputs = read_outputs(str(path), str(trace))
        stops = sum(o.finish_reason == "stop" for o in outputs)
        at_rewind = sum(bool(o.rewind_ending) for o in outputs)
        words = np.mean([len(o.text.split()) for o in outputs])
        print(
            f"  {name:48} {stops:3d} ended, {at_rewind:3d} of them at a rewind; {summary.rewinds} rewinds; "
            f"{words:.0f} words a story"
        )


def write_list(path: Path, items: list) -> Path:
    path.write_text(json.dumps(items, ensure_ascii=False))
    return path


def fmt(e, digits: int) -> str:
    return f"{e.value:.{digits}f} [{e.low:.{digits}f},{e.high:.{digits}f}]"


def count_of(e, r) -> str:
    return f"{round(e.value * len(r['outputs']))}"


class NllScorer:
    """The mean negative log-likelihood of a text after its prompt under the plain model (llama.cpp,
    one batched evaluation of prompt + text, the text as the tokenizer encodes it)."""

    def __init__(self, model: str, tokens: int, threads=None):
        from backtrack_sampler.provider.llamacpp_provider import LlamacppProvider
        from backtrack_sampler.provider.models import load_llamacpp

        more = {} if threads is None else {"n_threads": threads, "n_threads_batch": threads}  # --threads too
        self.provider = LlamacppProvider(load_llamacpp(model, n_ctx=512 + 2 * tokens, **more))
        self.llama = load_llamacpp(model, n_ctx=512 + 2 * tokens, logits_all=True, **more)

    def __call__(self, messages: list, text: str) -> Tuple[float, float]:
        """(sum of the NLL, tokens)."""
        from backtrack_sampler.provider.chat import chat_prompt_tokens

        prompt = chat_prompt_tokens(self.provider, messages)
        out = self.provider.encode(text, add_special_tokens=False)
        if not out:
            return 0.0, 0.0
        self.llama.reset()
        self.llama.eval(prompt + out)
        rows = np.asarray(self.llama.scores[len(prompt) - 1 : len(prompt) - 1 + len(out)], dtype=np.float64)
        top = rows.max(axis=1)
        logz = np.log(np.exp(rows - top[:, None]).sum(axis=1)) + top
        return float((logz - rows[np.arange(len(out)), out]).sum()), float(len(out))


def measure(out: Path, trace: Path, prompts: Path, scorer: NllScorer, score) -> dict:
    from backtrack_sampler.cli.slop import read_outputs

    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    asked = {r["id"]: r["messages"] for r in map(json.loads, prompts.read_text().splitlines())}
    outputs = read_outputs(str(out), str(trace))
    scores = score(outputs, rounds=1000, prompts=[m["content"] for messages in asked.values() for m in messages])
    delivered = sum(r["delivered"] for r in records.values())
    rewinds = sum(r["rewinds"] for r in records.values())
    nll = [scorer(asked[i], r["text"]) for i, r in records.items()]
    line = ", ".join(f"{m} {scores[m].value:.3g}" for m in MEASURES if m in scores)
    return {
        "outputs": outputs,
        "scores": scores,
        "nll": nll,
        "rewinds_per_token": rewinds / max(delivered, 1),
        "line": f"{line}, {rewinds} rewinds in {delivered} tokens",
    }
