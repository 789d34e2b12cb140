"""The prompt cache across requests (a chat resends its whole history with every message).

(a) Time to first token for a ~1k-token chat history (the embedded chat model, SmolLM2 135M
Instruct, in its chat template), on both providers and both drivers (``BacktrackSampler``, the
single-sequence driver, and ``BatchScheduler``, the server's): cold (an empty cache), then the
same history plus the answer and one more user turn (warm: the cache holds the history), against
the time to evaluate only the new tokens on top of the cached history (``provider.next_logits``
alone: the floor). Target: warm within 2x of the floor.

(b) ``--chat``: a 20-turn scripted chat (greedy, streamed) against llama-server (``cache_prompt``
on, one slot) and ``backtrack-sampler serve --parallel 1`` on the same GGUF: total time and time
to first token per turn. Target: ours within 1.2x of llama-server's total.

    .venv/bin/python bench/prompt_cache_bench.py               # (a) on both providers
    .venv/bin/python bench/prompt_cache_bench.py --chat        # (a) and (b) (builds llama-server once)
    .venv/bin/python bench/prompt_cache_bench.py --backend llamacpp --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
CARD = (
    "You are Mira, the keeper of an old lighthouse on a rocky northern island. You speak warmly but "
    "briefly, you love the sea, storms, ships and the birds that nest on the cliffs, and you keep a "
    "logbook of every ship that passes. You never break character. "
)
QUESTIONS = [
    "Good evening! How long have you kept this lighthouse?",
    "What was the worst storm you remember?",
    "Which birds nest on the cliffs in spring?",
    "Do many ships pass by in winter?",
    "What do you write in your logbook?",
    "Have you ever rescued a sailor?",
    "What do you eat out here?",
    "How do you light the lamp each night?",
    "Do you ever feel lonely?",
    "What is your favourite season on the island?",
    "Tell me about the oldest ship in your logbook.",
    "What sounds do you hear at night?",
    "How do supplies reach the island?",
    "Have you seen whales near the rocks?",
    "What would you tell a new keeper?",
    "What do the fishermen say about the island?",
    "Do you keep any animals?",
    "What was the lighthouse like when you arrived?",
    "What is the strangest thing the sea has washed up?",
    "Good night, Mira. Will you tell me one last story?",
]
ANSWER = (
    "The sea was grey and restless that day, and the gulls kept low over the water. I climbed the "
    "stairs at dusk, trimmed the wick, wound the clockwork and watched the beam sweep the rocks. "
)


def history(target_tokens: int, provider) -> list:
    """Chat messages (a character card, then scripted turns) of about ``target_tokens`` tokens."""
    from backtrack_sampler.provider.chat import chat_prompt_tokens

    messages = [{"role": "system", "content": CARD * 2}]
    for question in QUESTIONS * 3:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": ANSWER}]
        if len(chat_prompt_tokens(provider, messages + [{"role": "user", "content": "?"}])) >= target_tokens:
            break
    return messages + [{"role": "user", "content": "Tell me about the lighthouse's lamp."}]


def first_token(provider, prompt: list, batched: bool, tokens: int = 24) -> tuple:
    """``(seconds to the first token, stats, the answer's token ids)`` of a greedy generation."""
    from backtrack_sampler import BacktrackSampler, BaseStrategy
    from backtrack_sampler.core.batch import BatchScheduler

    start = time.perf_counter()
    first = None
    if batched:
        scheduler = BatchScheduler(provider, parallel=1)
        job = scheduler.submit(prompt, BaseStrategy(), max_new_tokens=tokens, temperature=0)
        for update in scheduler.run():
            if update.tokens and first is None:
                first = time.perf_counter() - start
        return first, job.stats, job.tokens
    sampler = BacktrackSampler(provider, BaseStrategy())
    out = []
    for token in sampler.generate(prompt, max_new_tokens=tokens, temperature=0):
        if first is None:
            first = time.perf_counter() - start
        out.append(token)
    return first, sampler.stats, out


def bench_provider(name: str, provider, rounds: int, target: int) -> list:
    """(a) for one provider: a row per driver."""
    from backtrack_sampler.provider.chat import chat_prompt_tokens

    messages = history(target, provider)
    cold_prompt = chat_prompt_tokens(provider, messages)
    rows = []
    for batched in (False, True):
        cold, warm, floor, cached, new = [], [], [], 0, 0
        for _ in range(rounds):
            provider.reset()
            seconds, _, answer = first_token(provider, cold_prompt, batched)
            cold.append(seconds)
            follow = messages + [
                {"role": "assistant", "content": provider.decode(answer)},
                {"role": "user", "content": "And what happens when the lamp fails?"},
            ]
            warm_prompt = chat_prompt_tokens(provider, follow)
            seconds, stats, _ = first_token(provider, warm_prompt, batched)
            warm.append(seconds)
            cached, new = stats.cached_tokens, len(warm_prompt) - stats.cached_tokens
            provider.reset()  # the floor: only the new tokens, on top of the cached history
            provider.next_logits(warm_prompt[:cached])
            start = time.perf_counter()
            provider.next_logits(warm_prompt)
            floor.append(time.perf_counter() - start)
        best = min(warm) / min(floor)
        driver = "BatchScheduler" if batched else "BacktrackSampler"
        rows.append((name, driver, len(cold_prompt), len(warm_prompt), cached, new, cold, warm, floor, best))
    provider.reset()
    return rows


def print_rows(rows: list) -> None:
    print(
        f"{'provider':<13}{'driver':<17}{'history':>8}{'+turn':>7}{'cached':>7}{'new':>5}"
        f"{'cold TTFT':>11}{'warm TTFT':>11}{'new only':>10}{'warm/new':>10}"
    )
    for name, driver, history_n, warm_n, cached, new, cold, warm, floor, ratio in rows:
        print(
            f"{name:<13}{driver:<17}{history_n:>8}{warm_n:>7}{cached:>7}{new:>5}"
            f"{min(cold):>10.3f}s{min(warm):>10.3f}s{min(floor):>9.3f}s{ratio:>9.2f}x"
        )
    print("(best of the rounds; target: warm/new <= 2x)")


# --- (b) a 20-turn chat against llama-server -------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list, url: str, what: str) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(command, stdout=tempfile.TemporaryFile(), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit(f"{what} did not start")


def chat(url: str, tokens: int, extra: dict) -> tuple:
    """The scripted chat, streamed: ``(total seconds, [TTFT per turn], completion tokens, cached tokens)``."""
    import httpx

    messages = [{"role": "system", "content": CARD * 2}]
    ttfts, completion, cached = [], 0, 0
    begin = time.perf_counter()
    with httpx.Client(
        timeout=300, headers={"Connection": "close"}
    ) as client:  # (llama-server drops kept-alive streams)
        for question in QUESTIONS:
            messages.append({"role": "user", "content": question})
            body = {
                "model": MODEL,
                "messages": messages,
                "max_tokens": tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                **extra,
            }
            start, first, text = time.perf_counter(), None, []
            with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            first = first or time.perf_counter() - start
                            text.append(piece)
                    usage = chunk.get("usage")
                    if usage:
                        completion += usage["completion_tokens"]
                        cached += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            ttfts.append(first or time.perf_counter() - start)
            messages.append({"role": "assistant", "content": "".join(text)})
    return time.perf_counter() - begin, ttfts, completion, cached


def bench_chat(tokens: int) -> None:
    from backtrack_sampler.provider.models import resolve_model

    binary = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_llama_server.sh")], check=True, capture_output=True, text=True
    ).stdout.splitlines()[-1]
    gguf, threads = str(resolve_model(MODEL)), str(os.cpu_count() or 2)
    servers = {
        "llama-server": [binary, "-m", gguf, "--host", "127.0.0.1", "-np", "1", "-c", "4096", "-t", threads]
        + ["--no-webui", "-fa", "on", "--port"],
        "backtrack-sampler serve": [str(ROOT / ".venv" / "bin" / "backtrack-sampler"), "serve", "--model", MODEL]
        + ["--parallel", "1", "--n-ctx", "4096", "--threads", threads, "--port"],
    }
    totals = {}
    print(f"\n## (b) a {len(QUESTIONS)}-turn chat, {tokens} tokens per answer at most, greedy, streamed, one slot")
    print(f"{'server':<25}{'total':>9}{'TTFT mean':>11}{'TTFT max':>10}{'completion':>12}{'cached':>8}")
    for name, command in servers.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start(command + [str(port)], url, name)
        try:
            extra = {"cache_prompt": True} if name == "llama-server" else {}
            chat(url, 4, extra)  # warm-up (a chat of its own, then cleared by the next one's prefix)
            total, ttfts, completion, cached = chat(url, tokens, extra)
        finally:
            proc.terminate()
            proc.wait(30)
        totals[name] = total
        print(f"{name:<25}{total:>8.2f}s{statistics.mean(ttfts):>10.3f}s{max(ttfts):>9.3f}s{completion:>12}{cached:>8}")
    ratio = totals["backtrack-sampler serve"] / totals["llama-server"]
    print(f"serve / llama-server total time: {ratio:.2f}x (target <= 1.2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["llamacpp", "transformers", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--history", type=int, default=1000, help="tokens of chat history (about)")
    parser.add_argument("--chat", action="store_true", help="also (b), the 20-turn chat against llama-server")
    parser.add_argument("--chat-tokens", type=int, default=48)
    args = parser.parse_args()
    from backtrack_sampler.provider.models import load_provider

    rows = []
    print(f"## (a) time to first token, {MODEL}, a ~{args.history}-token chat history, best of {args.rounds}")
    for backend in ("llamacpp", "transformers") if args.backend == "both" else (args.backend,):
        options = {"n_ctx": 4096} if backend == "llamacpp" else {}
        rows += bench_provider(backend, load_provider(backend, MODEL, **options), args.rounds, args.history)
    print_rows(rows)
    if args.chat:
        bench_chat(args.chat_tokens)


if __name__ == "__main__":
    main()
