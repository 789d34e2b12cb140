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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="See the module docstring for what is measured.")
    parser.add_argument("--prompts", type=int, default=10, help=f"story prompts (default 10, at most {len(PROMPTS)})")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per story (default 200)")
    parser.add_argument("--temperature", type=float, default=1.0, help="(default 1.0, with top_k 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt (default 0)")
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores)")
    parser.add_argument("--model", default=MODEL, help=f"an embedded model's name or a .gguf file (default {MODEL})")
    parser.add_argument("--show", action="store_true", help="print every story")
    parser.add_argument("--data", type=Path, default=DATA, help=f"antislop's data folder (default {DATA})")
    args = parser.parse_args()
    data = args.data
    if not (data / "slop_phrase_prob_adjustments.json").is_file():
        print(f"error: the slop lists are missing: {data} (antislop's data, in the shared/ folder beside the "
              "repository, or give --data DIR) is absent or incomplete; this benchmark needs it", file=sys.stderr)
        return 2

    from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, BaseStrategy
    from backtrack_sampler.chat import chat_prompt_tokens
    from backtrack_sampler.models import load_llamacpp, model_name
    from backtrack_sampler.provider.llamacpp_provider import LlamacppProvider

    small = json.loads((data / "slop_phrase_prob_adjustments.json").read_text())
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
    prompts = PROMPTS[: max(1, min(args.prompts, len(PROMPTS)))]
    print(f"model {model_name(args.model)}: {len(prompts)} prompts x {args.tokens} tokens, temperature "
          f"{args.temperature}, top_k 50, chat template; same seed per prompt in every setting", flush=True)

    list(BacktrackSampler(provider, BaseStrategy()).generate_text("Hello", max_new_tokens=4))  # warm up
    results = {name: [] for name in settings}
    for i, request in enumerate(prompts):
        prompt = chat_prompt_tokens(provider, [{"role": "user", "content": request}])
        line = []
        for name, strategy in settings.items():  # alternate settings, so machine load hits all alike
            provider.reset()  # every run starts from the same (empty) cache
            sampler = BacktrackSampler(provider, strategy)
            out = list(sampler.generate(prompt, max_new_tokens=args.tokens, temperature=args.temperature,
                                        top_k=50, seed=args.seed + i))
            text = provider.decode(out)
            s = sampler.stats
            results[name].append({
                "hits": hits(text, phrases), "words": len(text.split()), "tokens": s.delivered,
                "rewinds": s.rewinds, "rewound": s.rewound, "seconds": s.seconds,
                "nll": mean_nll(scorer, prompt, out) if out else float("nan"),
                "d2": distinct(text, 2), "d3": distinct(text, 3),
            })
            line.append(f"{name}: {results[name][-1]['hits']} hits, {s.rewinds} rewinds")
            if args.show:
                print(f"\n--- prompt {i + 1}, {name} ---\n{text}\n")
        print(f"  prompt {i + 1:2d}: " + " | ".join(line), flush=True)

    print(f"\n== {model_name(args.model)}, {len(prompts)} story prompts x {args.tokens} tokens; hits = 517-list "
          "phrases found (lower-case substring search) ==")
    header = (f"{'setting':24} {'hits':>5} {'/1k words':>9} {'words':>6} {'rewinds':>7} {'rewound':>7} "
              f"{'tok/s':>6} {'ratio':>5} {'NLL':>6} {'dist-2':>6} {'dist-3':>6}")
    print(header)
    base_tps = None
    for name, rows in results.items():
        total = lambda key: sum(r[key] for r in rows)  # noqa: E731
        tps = total("tokens") / total("seconds")
        base_tps = base_tps or tps
        words = total("words")
        print(f"{name:24} {total('hits'):5d} {1000 * total('hits') / max(words, 1):9.2f} {words:6d} "
              f"{total('rewinds'):7d} {total('rewound'):7d} {tps:6.1f} {tps / base_tps:5.2f} "
              f"{np.nanmean([r['nll'] for r in rows]):6.3f} {np.mean([r['d2'] for r in rows]):6.3f} "
              f"{np.mean([r['d3'] for r in rows]):6.3f}")
    print("NLL: mean negative log-likelihood per token under the plain model (nats); dist-n: distinct word n-grams")
    print(f"total time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
