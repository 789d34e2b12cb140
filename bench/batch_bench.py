"""Serving many at once: 1, 4 and 8 concurrent streaming clients through the real server
(``backtrack-sampler serve --parallel 8`` in a subprocess) with the official ``openai`` client,
each with banned strings and its own seed; against a raw llama.cpp loop that decodes the same
number of sequences in one ``llama_decode`` per step (the limit). Also: the first-token time of a
request that arrives while 7 others decode vs on an idle server, the server's memory, and how much
a request's logits differ alone and in a batch (llama.cpp's numbers depend on batch composition).

    .venv/bin/python bench/batch_bench.py                  # 64 tokens per client
    .venv/bin/python bench/batch_bench.py --tokens 128

Targets on a 2-core machine: 8 clients >= 3x one client's aggregate tokens/s and >= 0.85 of the
raw batched loop; the late request's first token within 2x of the idle server's.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle.\n\nStory:"
BANS = [
    ["tapestry", "a testament to"],
    ["shiver down", "barely above a whisper"],
    ["delve", "in the heart of"],
    ["unwavering", "palpable"],
    ["ministrations", "a dance of"],
    ["symphony", "resonate"],
    ["kaleidoscope", "labyrinthine"],
    ["camaraderie", "whispered secrets"],
]
N_CTX = 2048
# --frequent-bans: every client bans the 2,000 frequent word pairs of bench/antislop_bench.py
# ("of the", "it was"... drawn from the tokenizer's most frequent words): a pair is two or more
# tokens, so each hit is a rewind to where it began (issue 25's "bans firing" load; single words
# such as "the" are mostly masked before they are drawn and rarely rewind)


def frequent_bans() -> list:
    sys.path.insert(0, str(ROOT / "bench"))
    from antislop_bench import frequent_word_pairs

    from backtrack_sampler.provider.llamacpp_provider import LlamacppProvider
    from backtrack_sampler.provider.models import load_llamacpp

    provider = LlamacppProvider(load_llamacpp(n_ctx=256), None, "cpu")
    return [frequent_word_pairs(provider)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """``backtrack-sampler serve`` in a subprocess on a free 127.0.0.1 port."""

    def __init__(self, parallel: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "backtrack_sampler.cli",
            "serve",
            "--port",
            str(self.port),
            "--parallel",
            str(parallel),
            "--n-ctx",
            str(N_CTX),
            "--max-queue",
            "64",
            "--model",
            "gemma-3-270m",
        ]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.log = tempfile.TemporaryFile()  # not a pipe: a full pipe would block the server
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=self.log)

    def __enter__(self):
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"the server exited: {self.log.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def stream_one(client, seed: int, tokens: int, out: dict, start_gate: threading.Event) -> None:
    start_gate.wait()
    started = time.perf_counter()
    first, delivered, rewinds = None, 0, 0
    stream = client.completions.create(
        model="m",
        prompt=PROMPT,
        max_tokens=tokens,
        temperature=1.0,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"banned_strings": BANS[seed % len(BANS)]},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            delivered = chunk.usage.completion_tokens
            rewinds = (chunk.model_extra or {}).get("backtrack", {}).get("rewinds", 0)
    out[seed] = (first, delivered, time.perf_counter() - started, rewinds)


def clients_round(url: str, n: int, tokens: int, seed0: int) -> dict:
    import openai

    results: dict = {}
    gate = threading.Event()
    with openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=600, max_retries=0) as client:
        workers = [
            threading.Thread(target=stream_one, args=(client, seed0 + i, tokens, results, gate)) for i in range(n)
        ]
        for worker in workers:
            worker.start()
        start = time.perf_counter()
        gate.set()
        for worker in workers:
            worker.join()
        wall = time.perf_counter() - start
    firsts = sorted(r[0] for r in results.values())
    delivered = sum(r[1] for r in results.values())
    return {
        "rewinds": sum(r[3] for r in results.values()),
        "clients": n,
        "tokens": delivered,
        "seconds": wall,
        "tps": delivered / wall,
        "ttft_p50": statistics.median(firsts),
        "ttft_p95": firsts[min(len(firsts) - 1, int(0.95 * len(firsts)))],
    }


def late_arrival(url: str, tokens: int) -> tuple:
    """First-token time of a request on an idle server, and of one that arrives while 7 decode."""
    import openai

    with openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=600, max_retries=0) as client:
        idle: dict = {}
        gate = threading.Event()
        gate.set()
        stream_one(client, 100, 8, idle, gate)
        busy: dict = {}
        workers = [
            threading.Thread(target=stream_one, args=(client, 200 + i, tokens * 4, busy, gate)) for i in range(7)
        ]
        for worker in workers:
            worker.start()
        import httpx

        deadline = time.monotonic() + 120
        while httpx.get(url + "/health", timeout=5).json()["running"] < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # they are decoding now
        late: dict = {}
        stream_one(client, 300, 8, late, gate)
        for worker in workers:
            worker.join()
    return idle[100][0], late[300][0]


def raw_batched(n: int, steps: int, threads: int) -> float:
    """Tokens/s of a bare llama.cpp loop: n sequences, their prompts in one llama_decode, then one
    llama_decode per step, greedy argmax (timed from the prompts, like the clients' rounds)."""
    import llama_cpp
    from llama_cpp._internals import LlamaContext

    from backtrack_sampler.provider.models import load_llamacpp

    llm = load_llamacpp(n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads)
    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_seq_max, params.n_ctx, params.kv_unified = n, N_CTX * n, False
    ctx = LlamaContext(model=llm._model, params=params, verbose=False)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True)
    n_vocab = llm.n_vocab()

    def decode(items):
        batch.n_tokens = 0
        rows = []
        for seq, pos, tokens in items:
            for j, token in enumerate(tokens):
                i = batch.n_tokens
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos + j, 1
                batch.seq_id[i][0], batch.logits[i] = seq, j == len(tokens) - 1
                batch.n_tokens += 1
            rows.append(batch.n_tokens - 1)
        assert llama_cpp.llama_decode(ctx.ctx, batch) == 0
        return [
            int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, r), shape=(n_vocab,))))
            for r in rows
        ]

    start = time.perf_counter()  # the prompts too: the server's clock runs from the requests
    next_tokens = decode([(s, 0, prompt) for s in range(n)])
    for step in range(steps):
        next_tokens = decode([(s, len(prompt) + step, [t]) for s, t in enumerate(next_tokens)])
    seconds = time.perf_counter() - start
    llama_cpp.llama_batch_free(batch)
    ctx.close()
    return n * steps / seconds


def numerics(steps: int) -> dict:
    """Logits of one sequence alone vs in a batch of 8 (fresh providers, teacher-forced on the
    alone run's greedy tokens): max |logit difference|, KL(alone || batch), top-token agreement."""
    from backtrack_sampler.provider.llamacpp_provider import LlamacppProvider
    from backtrack_sampler.provider.models import load_llamacpp

    llm = load_llamacpp(n_ctx=512)
    others = [
        "Once upon a time",
        "The recipe calls for",
        "def main():",
        "Dear Sir,",
        "In 1492,",
        "The weather today",
        "Chapter 1",
    ]
    alone_p, batch_p = LlamacppProvider(llm, slots=8), LlamacppProvider(llm, slots=8)
    prompt = alone_p.encode(PROMPT)
    rest = {i + 1: alone_p.encode(t) for i, t in enumerate(others)}
    diffs, kls, agree, tokens = [], [], 0, list(prompt)
    for _ in range(steps):
        a = alone_p.next_logits_batch({0: tokens})[0]
        out = batch_p.next_logits_batch({0: tokens, **rest})
        b = out[0]
        rest = {k: v + [int(np.argmax(out[k]))] for k, v in rest.items()}  # the others go on greedily
        pa, pb = np.exp(a - a.max()), np.exp(b - b.max())
        pa, pb = pa / pa.sum(), pb / pb.sum()
        diffs.append(float(np.abs(a - b).max()))
        kls.append(float(np.sum(pa * (np.log(pa + 1e-30) - np.log(pb + 1e-30)))))
        agree += int(np.argmax(a) == np.argmax(b))
        tokens.append(int(np.argmax(a)))
    return {
        "steps": steps,
        "max_logit_diff": max(diffs),
        "mean_max_logit_diff": float(np.mean(diffs)),
        "max_kl": max(kls),
        "mean_kl": float(np.mean(kls)),
        "top1_agree": agree / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per client (default: 64)")
    parser.add_argument(
        "--frequent-bans", action="store_true", help="every client bans the 2,000 frequent word pairs (rewinds often)"
    )
    args = parser.parse_args()
    if args.frequent_bans:
        BANS[:] = frequent_bans()
    threads = os.cpu_count() or 1

    print(
        f"# batch_bench: {args.tokens} tokens per streaming client, banned strings, own seeds; "
        f"{threads} CPU threads, n_ctx {N_CTX} per slot"
    )
    with Server(1) as one:
        idle_rss = rss_mb(one.process.pid, "VmRSS")
        one_slot_peak = rss_mb(one.process.pid, "VmHWM")
    with Server(8) as server:
        pid = server.process.pid
        eight_idle = rss_mb(pid, "VmRSS")
        clients_round(server.url, 1, 8, 900)  # warm-up
        rounds = {n: clients_round(server.url, n, args.tokens, 10 * n) for n in (1, 4, 8)}
        idle_ttft, late_ttft = late_arrival(server.url, args.tokens)
        peak = rss_mb(pid, "VmHWM")
    raw = {n: raw_batched(n, args.tokens, threads) for n in (1, 4, 8)}

    print("\n## aggregate delivered tokens/s through the server (--parallel 8) vs a raw llama.cpp batched loop")
    print(
        f"{'clients':>7} {'tokens':>6} {'seconds':>7} {'tok/s':>7} {'raw tok/s':>9} {'of raw':>6} {'TTFT p50':>8} "
        f"{'TTFT p95':>8} {'rewinds/tok':>11}"
    )
    for n, r in rounds.items():
        print(
            f"{n:>7} {r['tokens']:>6} {r['seconds']:>7.2f} {r['tps']:>7.1f} {raw[n]:>9.1f} {r['tps'] / raw[n]:>6.2f} "
            f"{r['ttft_p50']:>7.2f}s {r['ttft_p95']:>7.2f}s {r['rewinds'] / max(r['tokens'], 1):>11.3f}"
        )
    scale = rounds[8]["tps"] / rounds[1]["tps"]
    print(
        f"\n8 clients / 1 client: {scale:.2f}x (target >= 3); 8 clients / raw 8-sequence loop: "
        f"{rounds[8]['tps'] / raw[8]:.2f} (target >= 0.85)"
    )
    print(
        f"first token: idle server {idle_ttft:.3f}s, arriving while 7 decode {late_ttft:.3f}s "
        f"({late_ttft / idle_ttft:.2f}x, target <= 2)"
    )
    print(
        f"\n## memory (server process RSS): --parallel 1 idle {idle_rss:.0f} MB (peak {one_slot_peak:.0f}); "
        f"--parallel 8 idle {eight_idle:.0f} MB, peak under load {peak:.0f} MB"
    )

    stats = numerics(32)
    print(
        f"\n## numerics: one sequence alone vs in a batch of 8 (llama.cpp, teacher-forced, {stats['steps']} positions)"
    )
    print(
        f"max |logit diff| {stats['max_logit_diff']:.3f} (mean per position {stats['mean_max_logit_diff']:.3f}); "
        f"KL(alone||batch) max {stats['max_kl']:.2e}, mean {stats['mean_kl']:.2e}; top-1 agreement "
        f"{stats['top1_agree']:.0%}"
    )


if __name__ == "__main__":
    main()
