"""Sampler overhead: the bare backend decode loop vs BacktrackSampler with a strategy that changes
nothing, on the same model, prompt and number of tokens, for both backends.

    .venv/bin/python bench/bench.py                 # both backends, 200 tokens, 3 rounds
    .venv/bin/python bench/bench.py --backend llamacpp --tokens 100 --rounds 2

Each round times bare and sampler runs back to back, so the ratio compares like with like on a
noisy machine; the best round of each is reported. It also traces the Python/numpy memory the
sampler allocates during a long generation, which must stay far below n_ctx x vocab x 4 bytes.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from backtrack_sampler import BacktrackSampler, BaseStrategy

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
    parser.add_argument("--backend", choices=["llamacpp", "transformers", "both"], default="both")
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
    print("\n## memory")
    for name, sampler in samplers.items():
        memory_check(name, sampler, args.memory_tokens)


if __name__ == "__main__":
    main()
