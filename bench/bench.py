"""Sampler overhead: the bare backend decode loop vs BacktrackSampler with a strategy that changes
nothing, on the same model, prompt and number of tokens, for both backends.

    .venv/bin/python bench/bench.py                 # both backends, 200 tokens, 3 rounds
    .venv/bin/python bench/bench.py --backend llamacpp --tokens 100 --rounds 2
    .venv/bin/python bench/bench.py --backend mlx   # MLX: vs mlx-lm's stream_generate, and AntiSlop

``--backend mlx`` (the embedded chat model, converted once for MLX) compares the sampler with mlx-lm's
own ``stream_generate`` (greedy), and AntiSlop with the 517-phrase list (read from ../shared when it
is beside the repository) with the sampler alone.

Each round times bare and sampler runs back to back, so the ratio compares like with like on a
noisy machine; the best round of each is reported. It also traces the Python/numpy memory the
sampler allocates during a long generation, which must stay far below n_ctx x vocab x 4 bytes.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, BaseStrategy

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle.\n\nStory:"


def bare_llamacpp(llm, prompt_tokens, n):
    import llama_cpp

    llm.reset()
    llm.eval(prompt_tokens)
    out = []
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        token = int(np.argmax(logits))
        out.append(token)
        llm.eval([token])
    return out


def bare_transformers(model, prompt_tokens, n):
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt_tokens])
    out = []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
            token = int(torch.argmax(logits))
            out.append(token)
            ids = torch.tensor([[token]])
    return out


def stream_generate_mlx(model, tokenizer, prompt_tokens, n):
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    return [r.token for r in stream_generate(model, tokenizer, prompt_tokens, max_tokens=n, sampler=make_sampler(0.0))]


SLOP_517 = Path(__file__).resolve().parents[2] / "shared" / "data" / "antislop" / "slop_phrase_prob_adjustments.json"


def bench_mlx(provider, model, tokenizer, n, rounds):
    """Per round, back to back: mlx-lm's stream_generate, the sampler with no strategy, the sampler
    with AntiSlop (the 517-phrase list as hard bans, when ../shared has it); all greedy."""
    prompt_tokens = provider.encode(PROMPT)
    plain = BacktrackSampler(provider, BaseStrategy())
    runs = {"mlx-lm stream_generate": [], "sampler, no-op": []}
    antislop = None
    if SLOP_517.is_file():
        phrases = [phrase for phrase, _ in json.loads(SLOP_517.read_text())]
        antislop = BacktrackSampler(provider, AntiSlopStrategy(provider, phrases))
        runs[f"sampler, AntiSlop {len(phrases)}"] = []
    for _ in range(rounds):
        theirs, t = timed(lambda: stream_generate_mlx(model, tokenizer, prompt_tokens, n))
        runs["mlx-lm stream_generate"].append(len(theirs) / t)
        provider.reset()
        ours, t = timed(lambda: list(plain.generate(prompt_tokens, max_new_tokens=n, temperature=0)))
        runs["sampler, no-op"].append(len(ours) / t)
        if antislop is not None:
            provider.reset()
            banned, t = timed(lambda: list(antislop.generate(prompt_tokens, max_new_tokens=n, temperature=0)))
            runs[list(runs)[-1]].append(len(banned) / t)
            rewinds = antislop.stats.rewinds
        provider.reset()
    print(
        f"\n## MLX ({provider.device}): {n} tokens, best of {rounds} rounds (greedy tokens = mlx-lm's: {ours == theirs})"
    )
    print(f"{'run':<28}{'tokens/s':>10}{'ratio':>8}   rounds (ratio: to the row above)")
    previous = None
    for label, values in runs.items():
        ratio = f"{max(values) / previous:>8.2f}" if previous else f"{'':>8}"
        print(f"{label:<28}{max(values):>10.1f}{ratio}   " + " ".join(f"{v:.1f}" for v in values))
        previous = max(values)
    if antislop is None:
        print(f"(AntiSlop row skipped: {SLOP_517} is absent)")
    else:
        print(f"(AntiSlop rewound {rewinds} times in its last run)")
    return plain


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_backend(name, provider, bare, n, rounds):
    prompt_tokens = provider.encode(PROMPT)
    sampler = BacktrackSampler(provider, BaseStrategy())
    runs = {"bare loop (greedy)": [], "sampler, greedy": [], "sampler, T=1 top_k=50": []}
    for _ in range(rounds):
        bare_tokens, t = timed(lambda: bare(prompt_tokens, n))
        runs["bare loop (greedy)"].append(n / t)
        provider.reset()
        greedy, t = timed(lambda: list(sampler.generate(prompt_tokens, max_new_tokens=n, temperature=0, top_k=None)))
        runs["sampler, greedy"].append(len(greedy) / t)
        provider.reset()
        sampled, t = timed(lambda: list(sampler.generate(prompt_tokens, max_new_tokens=n, temperature=1, seed=0)))
        runs["sampler, T=1 top_k=50"].append(len(sampled) / t)
        provider.reset()
    same = greedy == bare_tokens[: len(greedy)]
    best_bare = max(runs["bare loop (greedy)"])
    print(f"\n## {name}: {n} tokens, best of {rounds} rounds (greedy outputs identical to bare loop: {same})")
    print(f"{'run':<26}{'tokens/s':>10}{'ratio':>8}   rounds")
    for label, values in runs.items():
        print(
            f"{label:<26}{max(values):>10.1f}{max(values) / best_bare:>8.2f}   " + " ".join(f"{v:.1f}" for v in values)
        )
    return sampler


def memory_check(name, sampler, n):
    provider = sampler.provider
    provider.reset()
    tracemalloc.start()
    tokens = list(sampler.generate(PROMPT, max_new_tokens=n, temperature=1, seed=1))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    provider.reset()
    full = provider.context_length * provider.vocab_size * 4
    print(
        f"{name}: {len(tokens)} tokens sampled; peak Python/numpy memory traced during generate: "
        f"{peak / 2**20:.1f} MiB (n_ctx x vocab x 4 bytes would be {full / 2**20:,.0f} MiB)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["llamacpp", "transformers", "mlx", "both"], default="both")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-tokens", type=int, default=600)
    args = parser.parse_args()
    from backtrack_sampler.provider.models import load_llamacpp, load_transformers

    samplers = {}
    if args.backend in ("llamacpp", "both"):
        from backtrack_sampler.provider.llamacpp_provider import LlamacppProvider

        llm = load_llamacpp(n_ctx=4096)
        provider = LlamacppProvider(llm, None, "cpu")
        samplers["llamacpp"] = bench_backend(
            "llama.cpp", provider, lambda p, n: bare_llamacpp(llm, p, n), args.tokens, args.rounds
        )
    if args.backend in ("transformers", "both"):
        import torch

        from backtrack_sampler.provider.transformers_provider import TransformersProvider

        model, tokenizer = load_transformers()
        provider = TransformersProvider(model, tokenizer, "cpu")
        print(f"(torch threads: {torch.get_num_threads()})")
        samplers["transformers"] = bench_backend(
            "transformers", provider, lambda p, n: bare_transformers(model, p, n), args.tokens, args.rounds
        )
    if args.backend == "mlx":
        from backtrack_sampler.provider.mlx_provider import MlxProvider
        from backtrack_sampler.provider.models import load_mlx

        model, tokenizer = load_mlx("smollm2-135m-instruct")
        provider = MlxProvider(model, tokenizer)
        samplers["mlx"] = bench_mlx(provider, model, tokenizer, args.tokens, args.rounds)
    print("\n## memory")
    for name, sampler in samplers.items():
        memory_check(name, sampler, args.memory_tokens)


if __name__ == "__main__":
    main()
