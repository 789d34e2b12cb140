"""What AntiSlop does to the stories of the embedded instruct model (SmolLM2 135M Instruct, llama.cpp).

Held-out story prompts (written for this benchmark), each generated three ways with the same seed:

* plain: no strategy;
* AntiSlop with antislop's 517-phrase list as hard bans (case-insensitive substring matching);
* AntiSlop with antislop's 50,046-phrase list as soft bans (its multipliers, adjustment_strength 1,
  whole_words=True, as the README recommends for that list).

Reported per setting: hits of the 517 list per 1,000 words (plain lower-case substring search of each
phrase, counted the same way for every run), rewinds and rewound tokens, tokens/s and its ratio to
plain, and two text-quality signals: the mean negative log-likelihood per token of the output under
the plain model (llama.cpp evaluates prompt + output in one batch; lower = more what the model
itself would write, so more fluent, but also more predictable) and distinct-2/3 (unique word
n-grams / all n-grams, per story, averaged; higher = less repetitive).

    .venv/bin/python bench/quality_bench.py                      # 10 prompts x 200 tokens (a few minutes)
    .venv/bin/python bench/quality_bench.py --prompts 3 --tokens 100 --show

``--suite repetition`` (issue 17) compares, on the same prompts (x ``--seeds`` seeds each):

* plain: no strategy;
* repetition: ``RepetitionStrategy`` with its defaults;
* bans: AntiSlop with one half of the 517-phrase list as hard bans (the phrases in sorted order,
  every other one: half A), the other half (B) only counted, so the table shows whether bans
  just move slop to near-synonyms (B goes up) or not;
* both: the bans, then repetition, chained.

Reported per setting: degenerate outputs (``backtrack_sampler.quality.is_degenerate``: the same
repeat rules the strategy uses), hits of half A and half B per 1,000 words, rewinds and rewound
tokens, tokens/s and its ratio to plain, the decode steps per delivered token (rewound tokens are
decoded again: the intrinsic cost, which machine load does not blur), the time the strategy's hooks
take per decode step (microseconds, measured around each hook as the sampler calls it), mean NLL under
the plain model, distinct-2/3, rep-4 (share of word 4-grams that repeat an earlier one) and the
share of words inside a repeated 8-gram.

``--suite confidence`` measures ``ConfidenceStrategy`` (confidence-triggered revision) on short
questions with known answers (capitals, one-step arithmetic, common facts): an answer counts when
its expected word is among the first 30 words of the reply. Plain vs revised, sampled (temperature 1,
top_k 50, ``--seeds`` seeds) and greedy; plain with min_p 0.1 as a reference (revision acts like a
post-hoc truncation of unlikely draws).

    .venv/bin/python bench/quality_bench.py --suite repetition --prompts 12 --seeds 2 --tokens 300 \
        --temperature 0.8 --min-p 0.05 --top-k 0 --threads 1          # the demo's sampling
    .venv/bin/python bench/quality_bench.py --suite confidence --seeds 3

``--suite mine`` (issue 28): a ban list mined from the model's own stories (``slop mine``) against
plain sampling, the 517 list and the built-in list, on held-apart prompt sets; see bench/quality_mine.py.

    .venv/bin/python bench/quality_bench.py --suite mine [--quick] [--mine-samples N] [--multiplier X]

The slop lists are third-party data read from ../shared/data/antislop (beside the repository),
never copied; without them the benchmark stops with an error (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "antislop"
MODEL = "smollm2-135m-instruct"

# Written for this benchmark (not the demo's prompt, nor bench/antislop_bench.py's topics).
PROMPTS = [
    "Write a short story about a clockmaker who builds a clock that runs backwards.",
    "Write a short story about two sisters who inherit a failing orchard.",
    "Write a short story about a mail carrier on the last route before the town is flooded for a dam.",
    "Write a short story about an astronaut who hears a knock on the outside of the station.",
    "Write a short story about a boy who trains a crow to bring back lost things.",
    "Write a short story about a retired opera singer who opens a noodle shop.",
    "Write a short story about a village that wakes up to find the sea has gone.",
    "Write a short story about a translator who discovers a word no one else can hear.",
    "Write a short story about a night-shift nurse and a patient who claims to be from the future.",
    "Write a short story about a beekeeper whose bees start building in the shape of letters.",
    "Write a short story about a chess player who keeps losing to a stranger in the park.",
    "Write a short story about a family moving into a house where the previous owners left a dog.",
]


def hits(text: str, phrases: list) -> int:
    """Occurrences of the phrases in ``text`` (lower-case substring search)."""
    low = text.lower()
    return sum(low.count(p) for p in phrases)


def distinct(text: str, n: int) -> float:
    """Unique word n-grams / all word n-grams (lower-cased words)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_nll(scorer, prompt_tokens: list, out: list) -> float:
    """Mean negative log-likelihood (nats per token) of ``out`` after the prompt under the plain
    model: one batched llama.cpp evaluation, log-softmax of each position's logits."""
    scorer.reset()
    scorer.eval(prompt_tokens + out)
    start = len(prompt_tokens) - 1
    rows = np.asarray(scorer.scores[start : start + len(out)], dtype=np.float64)
    top = rows.max(axis=1)
    logz = np.log(np.exp(rows - top[:, None]).sum(axis=1)) + top
    return float((logz - rows[np.arange(len(out)), out]).mean())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="See the module docstring for what is measured."
    )
    parser.add_argument(
        "--prompts", type=int, help=f"story prompts (default 10, at most {len(PROMPTS)}; mine suite: per set, 24)"
    )
    parser.add_argument("--tokens", type=int, default=200, help="tokens per story (default 200)")
    parser.add_argument("--temperature", type=float, default=1.0, help="(default 1.0, with top_k 50)")
    parser.add_argument("--top-k", type=int, default=50, help="(default 50; 0: off) (repetition suite)")
    parser.add_argument("--min-p", type=float, help="(default off) (repetition suite)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt (default 0)")
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores)")
    parser.add_argument("--model", default=MODEL, help=f"an embedded model's name or a .gguf file (default {MODEL})")
    parser.add_argument("--show", action="store_true", help="print every story")
    parser.add_argument("--data", type=Path, default=DATA, help=f"antislop's data folder (default {DATA})")
    parser.add_argument(
        "--suite",
        choices=("antislop", "repetition", "confidence", "mine"),
        default="antislop",
        help="antislop: plain vs the 517 / 50,046 lists (default); repetition: plain vs "
        "RepetitionStrategy vs half the 517 list banned vs both; confidence: revision on Q&A; mine: mined lists",
    )
    parser.add_argument("--quick", action="store_true", help="mine suite: 12 (x2) + 12 prompts x 120 tokens")
    parser.add_argument("--work", help="mine suite: folder for its files (default: a new temporary one)")
    parser.add_argument(
        "--short",
        action="store_true",
        help="mine suite: 1 mining round; no 517-list, second-multiplier or repetition-only row, no endings check",
    )
    parser.add_argument(
        "--mine-samples", type=int, help="mine suite: stories per mining request, other seeds (default 4; --quick 2)"
    )
    parser.add_argument(
        "--multiplier", type=float, default=0.25, help="mine suite: the soft bans' multiplier (default 0.25)"
    )
    parser.add_argument(
        "--multiplier-too", type=float, default=0.1, help="mine suite: a row of the 1-round list with this one (0.1)"
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds per prompt (repetition and confidence suites)")
    args = parser.parse_args()
    if args.suite == "confidence":
        return confidence_suite(args)
    if args.suite == "mine":
        from quality_mine import mine_suite

        if args.temperature == 1.0 and args.min_p is None and args.top_k == 50:  # the demo's sampling by default
            args.temperature, args.min_p, args.top_k = 0.8, 0.05, 0
        return mine_suite(args)
    data = args.data
    if not (data / "slop_phrase_prob_adjustments.json").is_file():
        print(
            f"error: the slop lists are missing: {data} (antislop's data, in the shared/ folder beside the "
            "repository, or give --data DIR) is absent or incomplete; this benchmark needs it",
            file=sys.stderr,
        )
        return 2

    from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, BaseStrategy
    from backtrack_sampler.provider.chat import chat_prompt_tokens
    from backtrack_sampler.provider.llamacpp_provider import LlamacppProvider
    from backtrack_sampler.provider.models import load_llamacpp, model_name

    small = json.loads((data / "slop_phrase_prob_adjustments.json").read_text())
    if args.suite == "repetition":
        return repetition_suite(args, [p.lower() for p, _ in small])
    full = json.loads((data / "slop_phrase_prob_adjustments_full_list.json").read_text())
    phrases = [p.lower() for p, _ in small]
    threads = {} if args.threads is None else {"n_threads": args.threads, "n_threads_batch": args.threads}
    n_ctx = 512 + args.tokens
    provider = LlamacppProvider(load_llamacpp(args.model, n_ctx=n_ctx, **threads))
    scorer = load_llamacpp(args.model, n_ctx=n_ctx, logits_all=True, **threads)
    started = time.perf_counter()
    settings = {
        "plain": BaseStrategy(),
        "antislop 517 (hard)": AntiSlopStrategy(provider, [p for p, _ in small]),
        "antislop 50,046 (soft)": AntiSlopStrategy(provider, full, whole_words=True),
    }
    print(f"lists loaded in {time.perf_counter() - started:.2f} s: {len(small)} and {len(full):,} phrases")
    prompts = PROMPTS[: max(1, min(args.prompts or 10, len(PROMPTS)))]
    print(
        f"model {model_name(args.model)}: {len(prompts)} prompts x {args.tokens} tokens, temperature "
        f"{args.temperature}, top_k 50, chat template; same seed per prompt in every setting",
        flush=True,
    )

    list(BacktrackSampler(provider, BaseStrategy()).generate_text("Hello", max_new_tokens=4))  # warm up
    results = {name: [] for name in settings}
    for i, request in enumerate(prompts):
        prompt = chat_prompt_tokens(provider, [{"role": "user", "content": request}])
        line = []
        for name, strategy in settings.items():  # alternate settings, so machine load hits all alike
            provider.reset()  # every run starts from the same (empty) cache
            sampler = BacktrackSampler(provider, strategy)
            out = list(
                sampler.generate(
                    prompt, max_new_tokens=args.tokens, temperature=args.temperature, top_k=50, seed=args.seed + i
                )
            )
            text = provider.decode(out)
            s = sampler.stats
            results[name].append(
                {
                    "hits": hits(text, phrases),
                    "words": len(text.split()),
                    "tokens": s.delivered,
                    "rewinds": s.rewinds,
                    "rewound": s.rewound,
                    "seconds": s.seconds,
                    "nll": mean_nll(scorer, prompt, out) if out else float("nan"),
                    "d2": distinct(text, 2),
                    "d3": distinct(text, 3),
                }
            )
            line.append(f"{name}: {results[name][-1]['hits']} hits, {s.rewinds} rewinds")
            if args.show:
                print(f"\n--- prompt {i + 1}, {name} ---\n{text}\n")
        print(f"  prompt {i + 1:2d}: " + " | ".join(line), flush=True)

    print(
        f"\n== {model_name(args.model)}, {len(prompts)} story prompts x {args.tokens} tokens; hits = 517-list "
        "phrases found (lower-case substring search) =="
    )
    header = (
        f"{'setting':24} {'hits':>5} {'/1k words':>9} {'words':>6} {'rewinds':>7} {'rewound':>7} "
        f"{'tok/s':>6} {'ratio':>5} {'NLL':>6} {'dist-2':>6} {'dist-3':>6}"
    )
    print(header)
    base_tps = None
    for name, rows in results.items():
        total = lambda key: sum(r[key] for r in rows)  # noqa: E731
        tps = total("tokens") / total("seconds")
        base_tps = base_tps or tps
        words = total("words")
        print(
            f"{name:24} {total('hits'):5d} {1000 * total('hits') / max(words, 1):9.2f} {words:6d} "
            f"{total('rewinds'):7d} {total('rewound'):7d} {tps:6.1f} {tps / base_tps:5.2f} "
            f"{np.nanmean([r['nll'] for r in rows]):6.3f} {np.mean([r['d2'] for r in rows]):6.3f} "
            f"{np.mean([r['d3'] for r in rows]):6.3f}"
        )
    print("NLL: mean negative log-likelihood per token under the plain model (nats); dist-n: distinct word n-grams")
    print(f"total time {time.perf_counter() - started:.0f} s")
    return 0


def load(args):
    from backtrack_sampler.provider.llamacpp_provider import LlamacppProvider
    from backtrack_sampler.provider.models import load_llamacpp

    threads = {} if args.threads is None else {"n_threads": args.threads, "n_threads_batch": args.threads}
    n_ctx = 512 + args.tokens
    provider = LlamacppProvider(load_llamacpp(args.model, n_ctx=n_ctx, **threads))
    scorer = load_llamacpp(args.model, n_ctx=n_ctx, logits_all=True, **threads)
    return provider, scorer


class Timed:
    """Wraps a strategy and adds up the time its hooks take (``seconds``), as the sampler calls them."""

    def __new__(cls, strategy):
        from backtrack_sampler import BaseStrategy

        class _Timed(BaseStrategy):
            def __init__(self, inner):
                self.inner, self.seconds = inner, 0.0

            capabilities = property(lambda self: self.inner.capabilities)
            hard_constraint = property(lambda self: self.inner.capabilities.hard)
            rewind_reason = property(lambda self: self.inner.rewind_reason)

            def _time(self, hook, *args):
                started = time.perf_counter()
                try:
                    return getattr(self.inner, hook)(*args)
                finally:
                    self.seconds += time.perf_counter() - started

            def get_keep_index(self):
                return self._time("get_keep_index")

            def on_logits(self, logits, tokens):
                return self._time("on_logits", logits, tokens)

            def on_probs(self, probs, tokens):
                return self._time("on_probs", probs, tokens)

            def on_next_token(self, tokens, probs):
                return self._time("on_next_token", tokens, probs)

            def backtrack(self, tokens):
                return self._time("backtrack", tokens)

            def on_end(self, tokens):
                return self._time("on_end", tokens)

            def on_rewind(self, position):
                return self._time("on_rewind", position)

            def reset(self):
                return self._time("reset")

        return _Timed(strategy)


def repetition_suite(args, phrases: list) -> int:
    """plain / repetition / bans (half A of the 517 list) / both; half B counted only."""
    from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, BaseStrategy, ChainStrategy
    from backtrack_sampler.provider.chat import chat_prompt_tokens
    from backtrack_sampler.provider.models import model_name
    from backtrack_sampler.quality import distinct_n, is_degenerate, rep_n, repeated_fraction
    from backtrack_sampler.strategy.repetition_strategy import RepetitionStrategy

    ordered = sorted(set(phrases))
    half_a, half_b = ordered[0::2], ordered[1::2]
    started = time.perf_counter()
    provider, scorer = load(args)
    settings = {
        "plain": lambda: BaseStrategy(),
        "repetition": lambda: RepetitionStrategy(provider),
        "bans (half A)": lambda: AntiSlopStrategy(provider, half_a),
        "both": lambda: ChainStrategy([AntiSlopStrategy(provider, half_a), RepetitionStrategy(provider)]),
    }
    prompts = PROMPTS[: max(1, min(args.prompts or 10, len(PROMPTS)))]
    seeds = list(range(args.seed, args.seed + max(1, args.seeds)))
    sampling = f"temperature {args.temperature}, top_k {args.top_k or 'off'}, min_p {args.min_p or 'off'}"
    print(
        f"model {model_name(args.model)}: {len(prompts)} held-out story prompts x {len(seeds)} seeds x {args.tokens} "
        f"tokens, {sampling}, chat template; 517 list split in two halves of "
        f"{len(half_a)} and {len(half_b)} phrases (A banned, B counted)",
        flush=True,
    )
    list(BacktrackSampler(provider, BaseStrategy()).generate_text("Hello", max_new_tokens=4))  # warm up
    results = {name: [] for name in settings}
    for i, request in enumerate(prompts):
        prompt = chat_prompt_tokens(provider, [{"role": "user", "content": request}])
        for seed in seeds:
            line = []
            for name, make in settings.items():  # alternate settings, so machine load hits all alike
                provider.reset()
                strategy = Timed(make())
                sampler = BacktrackSampler(provider, strategy)
                out = list(
                    sampler.generate(
                        prompt,
                        max_new_tokens=args.tokens,
                        temperature=args.temperature,
                        top_k=args.top_k or None,
                        min_p=args.min_p,
                        seed=seed,
                    )
                )
                text = provider.decode(out)
                s = sampler.stats
                row = {
                    "degenerate": is_degenerate(text),
                    "a": hits(text, half_a),
                    "b": hits(text, half_b),
                    "words": len(text.split()),
                    "tokens": s.delivered,
                    "steps": s.steps,
                    "rewinds": s.rewinds,
                    "rewound": s.rewound,
                    "seconds": s.seconds,
                    "hooks": strategy.seconds,
                    "nll": mean_nll(scorer, prompt, out) if out else float("nan"),
                    "d2": distinct_n(text, 2),
                    "d3": distinct_n(text, 3),
                    "rep4": rep_n(text, 4),
                    "repeated": repeated_fraction(text),
                }
                results[name].append(row)
                line.append(f"{name}: {'LOOP' if row['degenerate'] else 'ok'} {row['a']}/{row['b']} {s.rewinds}rw")
                if args.show:
                    print(f"\n--- prompt {i + 1} seed {seed}, {name} ---\n{text}\n")
            print(f"  prompt {i + 1:2d} seed {seed}: " + " | ".join(line), flush=True)

    runs = len(prompts) * len(seeds)
    print(
        f"\n== {model_name(args.model)}, {runs} stories ({len(prompts)} held-out prompts x {len(seeds)} seeds) x "
        f"{args.tokens} tokens, {sampling} =="
    )
    print(
        f"{'setting':14} {'degen.':>6} {'A/1k':>5} {'B/1k':>5} {'rewinds':>7} {'rewound':>7} {'tok/s':>6} {'ratio':>5} "
        f"{'steps/tok':>9} {'us/tok':>6} {'NLL':>6} {'dist-2':>6} {'dist-3':>6} {'rep-4':>6} {'rep.8g':>6}"
    )
    base = None
    for name, rows in results.items():
        total = lambda key: sum(r[key] for r in rows)  # noqa: E731
        tps = total("tokens") / total("seconds")
        base = base or tps
        words = max(total("words"), 1)
        print(
            f"{name:14} {total('degenerate'):3d}/{len(rows):<2d} {1000 * total('a') / words:5.2f} "
            f"{1000 * total('b') / words:5.2f} {total('rewinds'):7d} {total('rewound'):7d} {tps:6.1f} {tps / base:5.2f} "
            f"{total('steps') / max(total('tokens'), 1):9.3f} {1e6 * total('hooks') / max(total('steps'), 1):6.1f} {np.nanmean([r['nll'] for r in rows]):6.3f} "
            f"{np.mean([r['d2'] for r in rows]):6.3f} {np.mean([r['d3'] for r in rows]):6.3f} "
            f"{np.mean([r['rep4'] for r in rows]):6.3f} {np.mean([r['repeated'] for r in rows]):6.3f}"
        )
    print(
        "degen.: outputs with a repeat (quality.is_degenerate); A/1k, B/1k: hits of the banned / the counted half per "
        "1,000 words;\nsteps/tok: decode steps per delivered token; us/tok: time in the strategy's hooks per step; NLL: under the "
        "plain model (nats/token);\nrep-4: share of word 4-grams repeating an earlier one; rep.8g: share of words in a "
        "repeated 8-gram"
    )
    print(f"total time {time.perf_counter() - started:.0f} s")
    return 0


# Short questions with known answers (written for this benchmark): (question, accepted answer words)
QUESTIONS = [
    ("What is the capital of France?", ["paris"]),
    ("What is the capital of Japan?", ["tokyo"]),
    ("What is the capital of Italy?", ["rome"]),
    ("What is the capital of Germany?", ["berlin"]),
    ("What is the capital of Spain?", ["madrid"]),
    ("What is the capital of the United Kingdom?", ["london"]),
    ("What is the capital of Russia?", ["moscow"]),
    ("What is the capital of China?", ["beijing"]),
    ("What is the capital of Egypt?", ["cairo"]),
    ("What is the capital of Greece?", ["athens"]),
    ("What is 2 + 2?", ["4", "four"]),
    ("What is 3 + 5?", ["8", "eight"]),
    ("What is 10 - 3?", ["7", "seven"]),
    ("What is 6 times 7?", ["42", "forty-two"]),
    ("What is 5 times 5?", ["25", "twenty-five"]),
    ("What is 9 + 10?", ["19", "nineteen"]),
    ("What is 12 + 15?", ["27", "twenty-seven"]),
    ("What is 100 divided by 4?", ["25", "twenty-five"]),
    ("What is 7 times 8?", ["56", "fifty-six"]),
    ("What is 15 - 6?", ["9", "nine"]),
    ("How many days are there in a week?", ["7", "seven"]),
    ("How many legs does a spider have?", ["8", "eight"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("What is the largest planet in our solar system?", ["jupiter"]),
    ("At what temperature in Celsius does water freeze?", ["0", "zero"]),
    ("How many continents are there?", ["7", "seven"]),
    ("Who wrote Romeo and Juliet?", ["shakespeare"]),
    ("Which planet is known as the Red Planet?", ["mars"]),
    ("How many hours are there in a day?", ["24", "twenty-four"]),
    ("How many months are there in a year?", ["12", "twelve"]),
    ("What is the chemical symbol for gold?", ["au"]),
    ("What is the fastest land animal?", ["cheetah"]),
    ("What is the boiling point of water in Celsius?", ["100"]),
    ("What do bees make?", ["honey"]),
    ("What is frozen water called?", ["ice"]),
    ("Which ocean is the largest?", ["pacific"]),
]


def answered(text: str, answers: list) -> bool:
    """An expected answer word among the reply's first 30 words (lower case, punctuation aside)."""
    import re

    words = re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", text.lower())[:30]
    return any(answer in words for answer in answers)


def confidence_suite(args) -> int:
    from backtrack_sampler import BacktrackSampler, BaseStrategy
    from backtrack_sampler.provider.chat import chat_prompt_tokens
    from backtrack_sampler.provider.models import model_name
    from backtrack_sampler.strategy.confidence_strategy import ConfidenceStrategy

    args.tokens = min(args.tokens, 48)
    started = time.perf_counter()
    provider, _ = load(args)
    seeds = list(range(args.seed, args.seed + max(1, args.seeds)))
    runs = [("sampled", 1.0, None, seeds), ("sampled, min_p 0.1", 1.0, 0.1, seeds), ("greedy", 0.0, None, [0])]
    print(
        f"model {model_name(args.model)}: {len(QUESTIONS)} questions, {args.tokens} tokens each; sampled: temperature 1, "
        f"top_k 50, seeds {seeds[0]}..{seeds[-1]}",
        flush=True,
    )
    list(BacktrackSampler(provider, BaseStrategy()).generate_text("Hello", max_new_tokens=4))
    table = []
    for label, temperature, min_p, run_seeds in runs:
        scores = {"plain": [], "revised": []}
        revisions = seconds = tokens = 0
        for question, answers in QUESTIONS:
            prompt = chat_prompt_tokens(provider, [{"role": "user", "content": question}])
            for seed in run_seeds:
                for name in scores:
                    provider.reset()
                    strategy = ConfidenceStrategy(provider) if name == "revised" else BaseStrategy()
                    sampler = BacktrackSampler(provider, strategy)
                    out = list(
                        sampler.generate(
                            prompt,
                            max_new_tokens=args.tokens,
                            temperature=temperature,
                            top_k=50,
                            min_p=min_p,
                            seed=seed,
                        )
                    )
                    text = provider.decode(out)
                    scores[name].append(answered(text, answers))
                    if name == "revised":
                        revisions += sampler.stats.rewinds
                        seconds, tokens = seconds + sampler.stats.seconds, tokens + sampler.stats.delivered
                    if args.show:
                        print(
                            f"--- {label} {name} seed {seed}: {question} -> {text!r} {'OK' if scores[name][-1] else ''}"
                        )
        n = len(scores["plain"])
        table.append((label, n, sum(scores["plain"]), sum(scores["revised"]), revisions, tokens / max(seconds, 1e-9)))
        print(
            f"  {label}: plain {sum(scores['plain'])}/{n}, revised {sum(scores['revised'])}/{n}, {revisions} revisions",
            flush=True,
        )
    print(
        f"\n== {model_name(args.model)}: {len(QUESTIONS)} questions with known answers (answer word in the first 30 words) =="
    )
    print(f"{'decoding':20} {'runs':>5} {'plain':>7} {'revised':>8} {'revisions':>9}")
    for label, n, plain, revised, revisions, _ in table:
        print(f"{label:20} {n:5d} {plain / n:7.1%} {revised / n:8.1%} {revisions:9d}")
    print(f"total time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
