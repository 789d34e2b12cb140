"""vLLM in process: ``VllmProvider`` (``--backend vllm``) vs vLLM alone in the same process (its
``LLMEngine``, the same token-id prompts and sampling: temperature 1, top_k 50), side by side in one
run, on the embedded chat model (SmolLM2 135M Instruct, converted by scripts/build_vllm.sh).

(a) single stream, no-op strategy                                      target: >= 0.95 x vLLM alone
(b) --batch-prompts chat prompts, 8 and 32 sequences at once, no-op    target: >= 0.95 x vLLM alone
(c) AntiSlop with the 2,000 frequent word pairs (bench/antislop_bench.py), single stream, as
    substrings and as whole words (the issue's trial: ~0.06 rewinds/token)
                                                                       target: >= 0.85 x vLLM alone
(d) AntiSlop with the 50,046 phrases, single stream                    target: >= 0.9 x (d0)
(d0) its ceiling: the same list, prompt and sampling with llama.cpp in process, vs llama.cpp alone
    (run first, in the main .venv, as bench/engine_bench.py's (c0))
Also: rewinds per delivered token, engine steps per rewind (steps beyond one per delivered token,
divided by the rewinds), ms per step, banned hits (must be 0).

    python bench/vllm_bench.py --quick      # any Python: re-runs itself in the vLLM venv
    python bench/vllm_bench.py --runs 3 --tokens 200 --batch-prompts 200

The 50,046-phrase list is read from ../shared/data/antislop (beside the repository) or --slop-file;
when it is absent, (d) and (d0) are skipped and the report says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))
SLOPS = ROOT.parent / "shared" / "data" / "antislop" / "slop_phrase_prob_adjustments_full_list.json"
CACHE = Path(os.environ.get("BACKTRACK_SAMPLER_CACHE", Path.home() / ".cache" / "backtrack_sampler"))
MODEL = CACHE / "smollm2-135m-instruct-hf"
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
ENV.update(VLLM_LOGGING_STREAM="ext://sys.stderr", VLLM_LOGGING_LEVEL="WARNING")  # the report is stdout
STORY = [{"role": "user", "content": "Write a long fantasy story about a young woman who discovers a hidden city."}]
TOP_K = 50


def in_vllm_venv() -> None:
    """Run this script again with the vLLM venv's python (scripts/build_vllm.sh) when vLLM is missing."""
    if importlib.util.find_spec("vllm") is not None:
        return
    built = subprocess.run(["bash", str(ROOT / "scripts" / "build_vllm.sh")], capture_output=True, text=True)
    python = dict(line.split("=", 1) for line in built.stdout.splitlines() if "=" in line).get("python")
    if built.returncode != 0 or not python:
        sys.exit(f"scripts/build_vllm.sh failed:\n{built.stderr[-2000:]}")
    os.execv(python, [python, *sys.argv])


def ceiling(slop_file: str, tokens: int, runs: int) -> float:
    """(d0): the list's speed ratio with llama.cpp in process (bench/engine_bench.py's (c0)), in .venv."""
    python = ROOT / ".venv" / "bin" / "python"
    code = (
        "import json, sys; sys.path[:0] = ['bench']; import engine_bench as e; "
        f"print('CEILING', json.dumps(e.in_process_ceilings('smollm2-135m-instruct', "
        f"json.load(open({slop_file!r})), {tokens}, {runs})))"
    )
    done = subprocess.run([str(python), "-c", code], cwd=ROOT, capture_output=True, text=True)
    print(done.stdout.rsplit("CEILING", 1)[0].rstrip(), flush=True)
    if done.returncode != 0:
        sys.exit(f"the llama.cpp ceiling failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.rsplit("CEILING", 1)[1])["antislop"]


class Alone:
    """vLLM alone: its own ``LLMEngine.add_request``/``step`` (its output processor; no
    detokenizing, as ours), at most ``parallel`` requests at once."""

    def __init__(self, provider):
        self.engine = provider.client.engine
        self.ids = 0

    def run(self, prompts, tokens: int, parallel: int, seed0: int) -> tuple:
        from vllm import SamplingParams

        engine, todo, running, got = self.engine, list(enumerate(prompts)), 0, 0
        started = time.perf_counter()
        while todo or running:
            while todo and running < parallel:
                i, prompt = todo.pop(0)
                params = SamplingParams(
                    max_tokens=tokens, temperature=1.0, top_k=TOP_K, seed=seed0 + i, detokenize=False
                )
                self.ids += 1
                engine.add_request(f"alone-{self.ids}", {"prompt_token_ids": prompt}, params)
                running += 1
            for output in engine.step():
                if output.finished:
                    got += len(output.outputs[0].token_ids)
                    running -= 1
        return got, time.perf_counter() - started


def through(provider, make_strategy, prompts, tokens: int, parallel: int, seed0: int) -> tuple:
    """Our scheduler on the same prompts: (delivered tokens, seconds, rewinds, texts, engine steps)."""
    from backtrack_sampler.core.batch import BatchScheduler

    scheduler = BatchScheduler(provider, parallel=parallel)
    jobs = [
        scheduler.submit(p, make_strategy(), max_new_tokens=tokens, seed=seed0 + i, top_k=TOP_K)
        for i, p in enumerate(prompts)
    ]
    steps = provider.client.steps
    started = time.perf_counter()
    list(scheduler.run())
    seconds = time.perf_counter() - started
    errors = [job.error for job in jobs if job.error is not None]
    if errors:
        raise errors[0]
    ended = [job.generation.stats for job in jobs if job.generation.stats.finish_reason not in ("stop", "length")]
    if ended:  # a row measured on generations that never ran would report a cost per nothing
        raise SystemExit(
            f"{len(ended)} of {len(jobs)} generations ended {ended[0].finish_reason}: {ended[0].constraint}"
        )
    got = sum(len(job.tokens) for job in jobs)
    rewinds = sum(job.generation.stats.rewinds for job in jobs)
    texts = [provider.decode(job.tokens) for job in jobs]
    return got, seconds, rewinds, texts, provider.client.steps - steps


def hits(texts, phrases, whole_words: bool = False) -> int:
    lowered = [t.lower() for t in texts]
    if whole_words:  # not glued to letters or digits on either side, as AntiSlop's whole_words
        return sum(
            len(re.findall(rf"(?<![^\W_]){re.escape(p.lower())}(?![^\W_])", t)) for t in lowered for p in phrases
        )
    return sum(t.count(p.lower()) for t in lowered for p in phrases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, help="tokens per generation (default 200; --quick 80)")
    parser.add_argument("--runs", type=int, help="single-stream runs per row, alternated (default 3; --quick 2)")
    parser.add_argument("--batch-prompts", type=int, help="prompts of (b) (default 200; --quick 64)")
    parser.add_argument("--slop-file", default=str(SLOPS), help="the 50,046-phrase list (JSON)")
    parser.add_argument(
        "--block-size", type=int, default=32, help="vLLM's KV block size (a rewind re-reads its partial block)"
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    in_vllm_venv()
    tokens = args.tokens or (80 if args.quick else 200)
    runs = args.runs or (2 if args.quick else 3)
    batch_prompts = args.batch_prompts if args.batch_prompts is not None else (64 if args.quick else 200)
    slop_list = json.loads(Path(args.slop_file).read_text()) if Path(args.slop_file).is_file() else None
    ceil = ceiling(args.slop_file, tokens, runs) if slop_list is not None else None  # before vLLM starts
    os.environ.update(ENV)
    os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    from antislop_bench import frequent_word_pairs
    from engine_bench import SUBJECTS

    from backtrack_sampler import AntiSlopStrategy, BaseStrategy
    from backtrack_sampler.engine.vllm_provider import VllmProvider
    from backtrack_sampler.provider.chat import chat_prompt_tokens

    provider = VllmProvider(
        str(MODEL), enforce_eager=True, max_model_len=4096, block_size=args.block_size, max_num_seqs=32
    )
    alone = Alone(provider)
    story = chat_prompt_tokens(provider, STORY)
    pairs = frequent_word_pairs(provider)
    rows = {
        "no-op": lambda: BaseStrategy(),
        "2,000 word pairs": lambda: AntiSlopStrategy(provider, pairs),
        "2,000 pairs, whole words": lambda: AntiSlopStrategy(provider, pairs, whole_words=True),
    }
    if slop_list is not None:
        rows[f"{len(slop_list):,} phrases"] = lambda: AntiSlopStrategy(provider, slop_list)
    alone.run([story], 8, 1, 0)  # warm up
    print(f"\n== single stream: {tokens} tokens, {runs} run(s) each, alternated ==", flush=True)
    speed = {"alone": []}
    detail = {name: [0, 0.0, 0, 0, [], 0.0] for name in rows}  # tokens, seconds, rewinds, steps, texts, in steps
    for r in range(runs):
        got, seconds = alone.run([story], tokens, 1, r)
        speed["alone"].append(got / seconds)
        for name, make in rows.items():
            in_steps = provider.engine.step_seconds
            got, seconds, rewinds, texts, steps = through(provider, make, [story], tokens, 1, r)
            speed.setdefault(name, []).append(got / seconds)
            d = detail[name]
            d[0], d[1], d[2], d[3] = d[0] + got, d[1] + seconds, d[2] + rewinds, d[3] + steps
            d[4].extend(texts)
            d[5] += provider.engine.step_seconds - in_steps
    base = statistics.median(speed["alone"])
    print(
        f"{'setting':30} {'tok/s':>7} {'ratio':>6} {'rewinds/tok':>12} {'steps/rewind':>13} {'ms/step':>8} "
        f"{'ours ms/tok':>12} {'hard hits':>10}"
    )
    print(f"{'vLLM alone':30} {base:7.2f} {1:6.2f}")
    phrases = {
        "2,000 word pairs": pairs,
        "2,000 pairs, whole words": pairs,
    }  # hard bans (the 50,046-phrase list's are soft: multipliers)
    if slop_list is not None:
        phrases[f"{len(slop_list):,} phrases"] = [p[0] for p in slop_list if not isinstance(p, list) or p[1] == 0]
    for name in rows:
        tps = statistics.median(speed[name])
        got, seconds, rewinds, steps, texts, in_steps = detail[name]
        extra = (steps - got) / rewinds if rewinds else 0.0
        found = hits(texts, phrases[name], "whole words" in name) if name in phrases else 0
        print(
            f"{'VllmProvider, ' + name:30} {tps:7.2f} {tps / base:6.2f} {rewinds / max(got, 1):12.3f} "
            f"{extra:13.2f} {1000 * in_steps / max(steps, 1):8.1f} {1000 * (seconds - in_steps) / max(got, 1):12.1f} "
            f"{found:10d}"
        )
    if ceil is not None:
        name = f"{len(slop_list):,} phrases"
        ratio = statistics.median(speed[name]) / base
        print(f"(d) {name}: {ratio:.2f} of vLLM alone; llama.cpp's own ratio (d0) {ceil:.2f}: {ratio / ceil:.2f} of it")
    else:
        print(f"(d) skipped: no {args.slop_file}")
    print("    steps/rewind: engine steps beyond one per delivered token, per rewind (rewound tokens included);")
    print("    ms/step: time in vLLM's engine step; ours ms/tok: the rest (strategy, acceptance, scheduler) per token")

    prompts = [
        chat_prompt_tokens(provider, [{"role": "user", "content": f"Write a story about {s}."}]) for s in SUBJECTS
    ]
    prompts = [prompts[i % len(prompts)] for i in range(batch_prompts)]
    if prompts:
        print(f"\n== {len(prompts)} prompts x {tokens} tokens, no-op ==", flush=True)
        print(f"{'sequences at once':18} {'alone tok/s':>12} {'ours tok/s':>11} {'ratio':>6} {'steps (ours)':>13}")
        for parallel in (8, 32):
            got_a, sec_a = alone.run(prompts, tokens, parallel, 1000)
            got, seconds, _, _, steps = through(provider, rows["no-op"], prompts, tokens, parallel, 1000)
            print(
                f"{parallel:18d} {got_a / sec_a:12.2f} {got / seconds:11.2f} {got / seconds / (got_a / sec_a):6.2f} {steps:13d}"
            )
    cost_table(provider, prompts[:8] or [story] * 8, tokens)
    provider.close()


def cost_table(provider, prompts, tokens: int) -> None:
    """Microseconds of this library's Python per token per sequence (everything but the engine's
    steps: acceptance, strategies, scheduler), 8 sequences at once, and the largest batch whose
    strategy time fits beside a 15 ms GPU step."""
    import json as json_

    from engine_bench import SUBJECTS

    from backtrack_sampler import AntiSlopStrategy, BaseStrategy
    from backtrack_sampler.provider.chat import chat_prompt_tokens
    from backtrack_sampler.strategy.grammar_strategy import GrammarStrategy
    from backtrack_sampler.strategy.repetition_strategy import RepetitionStrategy

    lists = {}
    for name, path in (("517", SLOPS.with_name("slop_phrase_prob_adjustments.json")), ("50,046", SLOPS)):
        if path.is_file():
            lists[name] = json_.loads(path.read_text())
    schema = {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}}}
    rows = {"no-op": lambda: BaseStrategy()}
    for name, phrases in lists.items():
        rows[f"AntiSlop, {name} phrases"] = lambda phrases=phrases: AntiSlopStrategy(provider, phrases)
    rows["JSON Schema (GrammarStrategy)"] = lambda: GrammarStrategy(provider, json_schema=schema)
    rows["RepetitionStrategy"] = lambda: RepetitionStrategy(provider)
    json_prompts = [
        chat_prompt_tokens(provider, [{"role": "user", "content": f"Describe a book about {s} as a JSON object."}])
        for s in SUBJECTS[: len(prompts)]
    ]
    print(f"\n== this library's time per token per sequence: {len(prompts)} sequences x {tokens} tokens ==")
    print(f"{'strategy':32} {'us/token':>9} {'rewinds/tok':>12} {'batch in 15 ms':>15}")
    engine = provider.engine
    for name, make in rows.items():
        before = engine.step_seconds
        asked = json_prompts if name.startswith("JSON") else prompts  # the grammar's first token is "{"
        got, seconds, rewinds, _, _ = through(provider, make, asked, tokens, len(prompts), 7)
        ours = (seconds - (engine.step_seconds - before)) / max(got, 1) * 1e6
        print(f"{name:32} {ours:9.0f} {rewinds / max(got, 1):12.3f} {int(15000 / max(ours, 1)):15d}", flush=True)
    skipped = {"517", "50,046"} - set(lists)
    if skipped:
        print(f"    (no {', '.join(sorted(skipped))}-phrase list beside the repository: those rows skipped)")


if __name__ == "__main__":
    main()
