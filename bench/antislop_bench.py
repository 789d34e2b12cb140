"""AntiSlopStrategy benchmark on llama.cpp with the embedded Gemma 3 270M.

(a) tokens/s with no strategy (BaseStrategy)
(b) tokens/s with the 50,046-phrase list + the slop regexes (load time, delivered vs rewound tokens)
(c) quality: story prompts with the 517-phrase list as a hard ban: banned phrases left in the
    outputs (plain lower-case substring search) and the model's own perplexity of the outputs.
(d) the 2,000-pair list of issue 19 (``frequent_word_pairs``: pairs of the tokenizer's most frequent
    words) on both embedded models: tokens/s with it vs no strategy, rewinds and rewound tokens per
    delivered token, and banned pairs left in the outputs (substring and whole-word matching).

    .venv/bin/python bench/antislop_bench.py            # full: 3 speed runs x 300 tokens, 20 prompts x 300 tokens
    .venv/bin/python bench/antislop_bench.py --quick    # 1 speed run x 100 tokens, 4 prompts x 100 tokens
    .venv/bin/python bench/antislop_bench.py --pairs-only   # (d) alone (needs no ../shared)

The slop lists are read from ../shared/data/antislop (beside the repository), never copied.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "antislop"

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, BaseStrategy  # noqa: E402
from backtrack_sampler.strategy.registry import read_regexes  # noqa: E402

TOPICS = [
    "a lighthouse keeper who finds a message in a bottle",
    "a dragon who is afraid of heights",
    "a detective solving a mystery on a night train",
    "two rivals stranded on a desert island",
    "a robot learning to bake bread",
    "a girl who can talk to birds",
    "the last day of summer camp",
    "a knight who refuses to fight",
    "a city where it always rains",
    "an old map found in an attic",
    "a musician who loses her hearing",
    "a cat that runs a bookshop",
    "a storm at sea",
    "a young wizard's first spell going wrong",
    "a farmer and a mysterious stranger",
    "a journey across a frozen mountain",
    "a ghost who wants to be remembered",
    "a child's first day at school",
    "a spaceship crew discovering a new planet",
    "a thief who steals only memories",
    "a baker who wins a contest",
    "a forest that moves at night",
]
SPEED_PROMPT = "Write a long fantasy story about a young woman who discovers a hidden city."
PAIRS_SEED = 19  # the seed of the 2,000-pair list (issue 19); tests/test_bans_at_scale.py uses it too


def frequent_words(provider, count: int = 500) -> List[str]:
    """The ``count`` most frequent words of the tokenizer, by its own order: the tokens that decode
    to a space and lower-case letters (two or more, or "a"/"i"), in id order (BPE vocabularies put
    frequent merges first; some are word beginnings, like " con"). Depends on the tokenizer only."""
    context = provider.encode("x", add_special_tokens=False)[:1]
    before = provider.decode(context)
    words: List[str] = []
    for token in range(provider.vocab_size):
        piece = provider.decode(context + [token])[len(before) :]  # with context: SentencePiece keeps the space
        if re.fullmatch(r" [a-z]+", piece) and (len(piece) > 2 or piece in (" a", " i")) and piece[1:] not in words:
            words.append(piece[1:])
            if len(words) == count:
                break
    return words


def frequent_word_pairs(provider, count: int = 2000, words: int = 500, seed: int = PAIRS_SEED) -> List[str]:
    """``count`` distinct pairs "w1 w2" of the tokenizer's ``words`` most frequent words
    (``frequent_words``), each word drawn with weight 1/rank (Zipf), so that a model writes them
    often: about 30 substring hits (8 whole-word ones) per 150 tokens of unconstrained text from
    either embedded model. Reproducible from the tokenizer and ``seed`` alone."""
    vocabulary = frequent_words(provider, words)
    weights = [1 / rank for rank in range(1, len(vocabulary) + 1)]
    rng, pairs = random.Random(seed), {}
    while len(pairs) < count:
        first, second = rng.choices(vocabulary, weights, k=2)
        pairs[f"{first} {second}"] = None
    return list(pairs)


def chat(text: str) -> str:
    return f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"


def check_data() -> None:
    """Exit with a clear message when the third-party slop lists are not beside the repository."""
    files = ["slop_phrase_prob_adjustments_full_list.json", "slop_phrase_prob_adjustments.json", "slop_regexes.txt"]
    missing = [name for name in files if not (DATA / name).is_file()]
    if missing:
        sys.exit(
            f"antislop_bench: the slop lists are absent: {', '.join(missing)} not found in {DATA} "
            "(this benchmark reads the shared/ folder beside the repository; the tests do not need it)"
        )


def run(sampler, prompt, tokens, seed):
    sampler.provider.reset()  # same cache state for every run, so llama.cpp's logits are reproducible
    out = list(sampler.generate(chat(prompt), max_new_tokens=tokens, temperature=1.0, top_k=50, seed=seed))
    return out, sampler.stats


def detection_cost(strategy, tokens) -> float:
    """Seconds per token the strategy spends decoding and matching, replayed on ``tokens``."""
    strategy.reset()
    started = time.perf_counter()
    for n in range(1, len(tokens) + 1):
        strategy.matcher.update(tokens[:n])
        strategy.matcher.hold_token()
    return (time.perf_counter() - started) / len(tokens)


def perplexity(scorer, prompt_tokens, out) -> float:
    """exp(mean negative log-likelihood) of ``out`` after the prompt, in one batched evaluation."""
    scorer.reset()
    scorer.eval(prompt_tokens + out)
    rows = np.asarray(scorer.scores[len(prompt_tokens) - 1 : len(prompt_tokens) + len(out) - 1], dtype=np.float64)
    top = rows.max(axis=1, keepdims=True)
    logz = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
    nll = logz - rows[np.arange(len(out)), out]
    return float(np.exp(nll.mean()))


def banned_pairs_left(text: str, pairs: List[str], whole_words: bool) -> int:
    """Occurrences of the pairs in ``text`` (lower-cased; whole words: not glued to letters/digits)."""
    text = text.lower()
    found = 0
    for pair in pairs:
        start = text.find(pair)
        while start >= 0:
            end = start + len(pair)
            glued = (start > 0 and text[start - 1].isalnum() and text[start].isalnum()) or (
                end < len(text) and text[end - 1].isalnum() and text[end].isalnum()
            )
            found += not (whole_words and glued)
            start = text.find(pair, start + 1)
    return found


def pairs_section(tokens: int, repeats: int) -> None:
    """(d): the 2,000-pair list on both embedded models, llama.cpp in-process."""
    from backtrack_sampler.provider.chat import chat_prompt_tokens
    from backtrack_sampler.provider.models import load_provider

    print(
        f"\n== (d) 2,000 frequent word pairs (seed {PAIRS_SEED}), llama.cpp, {repeats} run(s) x {tokens} tokens "
        "per setting, temperature 1, top_k 50 (tok/s: median) =="
    )
    print(
        f"{'model / setting':46} {'tok/s':>7} {'ratio':>6} {'delivered':>9} {'rewinds':>8} {'rewound':>8} "
        f"{'rewinds/tok':>11} {'rewound/tok':>11} {'left':>5}"
    )
    for name in ("gemma-3-270m", "smollm2-135m-instruct"):
        provider = load_provider("llamacpp", name, 2048, None)
        pairs = frequent_word_pairs(provider)
        if name.startswith("smollm2"):
            prompt = chat_prompt_tokens(provider, [{"role": "user", "content": SPEED_PROMPT}])
        else:
            prompt = provider.encode(chat(SPEED_PROMPT))
        settings = [("no strategy", None), ("AntiSlop, substrings", False), ("AntiSlop, whole words", True)]
        runs = {label: [] for label, _ in settings}
        left = {label: 0 for label, _ in settings}
        list(BacktrackSampler(provider, BaseStrategy()).generate(prompt, max_new_tokens=8, seed=0))  # warm up
        for r in range(repeats):  # alternate, so machine load hits every setting alike
            for label, whole in settings:
                strategy = BaseStrategy() if whole is None else AntiSlopStrategy(provider, pairs, whole_words=whole)
                sampler = BacktrackSampler(provider, strategy)
                provider.reset()
                out = list(sampler.generate(prompt, max_new_tokens=tokens, temperature=1.0, top_k=50, seed=r))
                runs[label].append(sampler.stats)
                left[label] += banned_pairs_left(provider.decode(out), pairs, bool(whole))
        base = statistics.median(s.tokens_per_second for s in runs["no strategy"])
        for label, _ in settings:
            stats = runs[label]
            tps = statistics.median(s.tokens_per_second for s in stats)
            delivered = sum(s.delivered for s in stats)
            rewinds, rewound = sum(s.rewinds for s in stats), sum(s.rewound for s in stats)
            print(
                f"{name + ': ' + label:46} {tps:7.2f} {tps / base:6.2f} {delivered:9d} {rewinds:8d} {rewound:8d} "
                f"{rewinds / max(delivered, 1):11.3f} {rewound / max(delivered, 1):11.3f} {left[label]:5d}",
                flush=True,
            )
    print(
        "    left: banned pairs in the outputs (for 'no strategy': how often the model writes them unconstrained, "
        "substring count)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 speed run x 100 tokens, 4 prompts x 100 tokens")
    parser.add_argument("--tokens", type=int, help="tokens per speed run (default 300)")
    parser.add_argument("--repeats", type=int, help="speed runs per setting, alternated (default 3)")
    parser.add_argument("--prompts", type=int, help="story prompts for the quality part (default 20)")
    parser.add_argument("--story-tokens", type=int, help="tokens per story (default 300)")
    parser.add_argument("--strength", type=float, default=1.0, help="adjustment_strength for the 50k list (default 1)")
    parser.add_argument(
        "--substrings", action="store_true", help="50k list: match inside words too (whole_words=False)"
    )
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--pairs-only", action="store_true", help="only (d), the 2,000-pair list (no ../shared needed)")
    parser.add_argument("--skip-pairs", action="store_true", help="leave out (d)")
    args = parser.parse_args()
    if args.pairs_only:
        pairs_section(args.tokens or (100 if args.quick else 300), args.repeats or (1 if args.quick else 3))
        return
    check_data()
    quick = args.quick
    tokens = args.tokens or (100 if quick else 300)
    repeats = args.repeats or (1 if quick else 3)
    n_prompts = min(args.prompts or (4 if quick else 20), len(TOPICS))
    story_tokens = args.story_tokens or (100 if quick else 300)

    from backtrack_sampler.provider.llamacpp_provider import LlamacppProvider  # (imported here: bench/vllm_bench.py
    from backtrack_sampler.provider.models import load_llamacpp  # imports this file where llama.cpp is absent)

    llm = load_llamacpp(n_ctx=2048)
    provider = LlamacppProvider(llm)

    # (b) setup: load time of the big list
    started = time.perf_counter()
    full = json.loads((DATA / "slop_phrase_prob_adjustments_full_list.json").read_text())
    regexes = read_regexes(str(DATA / "slop_regexes.txt"))
    antislop = AntiSlopStrategy(
        provider, full, regexes=regexes, adjustment_strength=args.strength, whole_words=not args.substrings
    )
    load_seconds = time.perf_counter() - started

    run(BacktrackSampler(provider, BaseStrategy()), SPEED_PROMPT, 8, seed=0)  # warm up llama.cpp
    base_runs, slop_runs = [], []
    for r in range(repeats):  # alternate, so machine load hits both alike
        base_runs.append(run(BacktrackSampler(provider, BaseStrategy()), SPEED_PROMPT, tokens, seed=r)[1])
        out, stats = run(BacktrackSampler(provider, antislop), SPEED_PROMPT, tokens, seed=r)
        slop_runs.append(stats)
    cost = detection_cost(antislop, out)
    small = AntiSlopStrategy(provider, full[:100], regexes=regexes, whole_words=not args.substrings)
    small_cost = detection_cost(small, out)
    base_tps = statistics.median(s.tokens_per_second for s in base_runs)
    slop_tps = statistics.median(s.tokens_per_second for s in slop_runs)
    slop_steps = statistics.median(s.steps / s.seconds for s in slop_runs)
    base_steps = statistics.median(s.steps / s.seconds for s in base_runs)
    reasons = {}
    for s in slop_runs:
        for e in s.events:
            reasons[e.reason] = reasons.get(e.reason, 0) + 1

    print(f"\n== speed: llama.cpp, {repeats} run(s) x {tokens} tokens, temperature 1, top_k 50 (median) ==")
    print(f"{'setting':44} {'tok/s':>7} {'steps/s':>8} {'delivered':>9} {'rewound':>8} {'rewinds':>8} {'ratio':>6}")
    print(
        f"{'(a) no strategy (BaseStrategy)':44} {base_tps:7.2f} {base_steps:8.2f} "
        f"{sum(s.delivered for s in base_runs):9d} {0:8d} {0:8d} {1:6.2f}"
    )
    print(
        f"{'(b) AntiSlop 50,046 phrases + 3 regexes':44} {slop_tps:7.2f} {slop_steps:8.2f} "
        f"{sum(s.delivered for s in slop_runs):9d} {sum(s.rewound for s in slop_runs):8d} "
        f"{sum(s.rewinds for s in slop_runs):8d} {slop_tps / base_tps:6.2f}"
    )
    print(f"    ratio of steps/s (pure strategy overhead, rewound tokens counted): {slop_steps / base_steps:.2f}")
    print(
        f"    load time of the 50,046-phrase list + regexes: {load_seconds:.2f} s "
        f"({len(antislop.matcher.phrases)} phrases active, regexes on RE2); "
        f"whole_words={not args.substrings}, adjustment_strength={args.strength}"
    )
    print(
        f"    detection cost per token (decode + match + hold-back, replayed): {cost * 1e6:.0f} us with 50,046 "
        f"phrases, {small_cost * 1e6:.0f} us with 100; a model step without strategy: {1e6 / base_steps:.0f} us "
        f"({cost * base_steps:.1%} of it)"
    )
    top = sorted(reasons.items(), key=lambda kv: -kv[1])[:8]
    print("    most frequent rewind reasons: " + ", ".join(f"{k} x{v}" for k, v in top))

    if not args.skip_pairs:
        pairs_section(tokens, repeats)
    if args.skip_quality:
        return
    phrases = [p for p, _ in json.loads((DATA / "slop_phrase_prob_adjustments.json").read_text())]
    hard = AntiSlopStrategy(provider, phrases)  # plain strings: hard bans, substring matching
    from backtrack_sampler.provider.models import load_llamacpp

    scorer = load_llamacpp(n_ctx=1024, logits_all=True)
    rows = []
    for i, topic in enumerate(TOPICS[:n_prompts]):
        prompt = f"Write a short story about {topic}."
        prompt_tokens = provider.encode(chat(prompt))
        row = {}
        for name, strategy in (("plain", BaseStrategy()), ("antislop", hard)):
            out, stats = run(BacktrackSampler(provider, strategy), prompt, story_tokens, seed=100 + i)
            text = provider.decode(out).lower()
            row[name] = (
                sum(text.count(p.lower()) for p in phrases),
                perplexity(scorer, prompt_tokens, out),
                stats.delivered,
                stats.rewound,
            )
        rows.append(row)
        print(
            f"  prompt {i + 1:2d}: plain {row['plain'][0]} banned, ppl {row['plain'][1]:.2f} | "
            f"antislop {row['antislop'][0]} banned, ppl {row['antislop'][1]:.2f}, rewound {row['antislop'][3]}",
            flush=True,
        )

    print(f"\n== quality: {n_prompts} story prompts x {story_tokens} tokens, 517-phrase list as a hard ban ==")
    print(f"{'setting':24} {'banned phrases':>15} {'mean ppl':>9} {'median ppl':>11} {'delivered':>10} {'rewound':>8}")
    for name in ("plain", "antislop"):
        col = [r[name] for r in rows]
        print(
            f"{name:24} {sum(c[0] for c in col):15d} {statistics.mean(c[1] for c in col):9.2f} "
            f"{statistics.median(c[1] for c in col):11.2f} {sum(c[2] for c in col):10d} {sum(c[3] for c in col):8d}"
        )


if __name__ == "__main__":
    main()
