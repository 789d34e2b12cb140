"""Engine benchmark: a serving engine alone vs through backtrack_sampler's engine provider.

(a) the engine alone: its own streaming API, same prompt ids and sampling (temperature 1, top_k 50)
(b) through EngineProvider with a no-op strategy            target: >= 0.85 x (a)
(c) through EngineProvider with AntiSlop, 50,046 phrases     target: >= 0.75 x (a)
(d) `backtrack-sampler serve --engine URL`: 4 concurrent clients vs 1 client (aggregate tokens/s)
                                                            target: >= 2.5 x
Also: engine round trips per delivered token, and the prompt tokens the engine served from its
prefix cache (when it reports them).

    python bench/engine_bench.py                    # starts llama-server (scripts/build_llama_server.sh) with
                                                    # the embedded model and 4 slots on 127.0.0.1
    python bench/engine_bench.py --url http://gpu-box:8000 --engine-type vllm --tokenizer /models/Llama-3.1-8B
    python bench/engine_bench.py --quick            # fewer tokens and runs

The 50,046-phrase list is read from ../shared/data/antislop (beside the repository) or --slop-file;
when it is absent, (c) is skipped and the report says so.
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
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SLOPS = ROOT.parent / "shared" / "data" / "antislop" / "slop_phrase_prob_adjustments_full_list.json"

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, BaseStrategy  # noqa: E402
from backtrack_sampler.engine import EngineProvider  # noqa: E402

PROMPT = "<start_of_turn>user\nWrite a long fantasy story about a young woman who discovers a hidden city." \
         "<end_of_turn>\n<start_of_turn>model\n"
SAMPLING = (1.0, 50, None, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, what: str, path: str = "/health", seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with code {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit(f"{what} did not start within {seconds:.0f} s")


def start_llama_server(slots: int) -> tuple:
    binary = subprocess.run(["bash", str(ROOT / "scripts" / "build_llama_server.sh")], check=True,
                            capture_output=True, text=True).stdout.strip().splitlines()[-1]
    from backtrack_sampler.models import default_model_path

    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([binary, "-m", str(default_model_path()), "--host", "127.0.0.1", "--port", str(port),
                             "-np", str(slots), "-c", str(2048 * slots), "-t", str(os.cpu_count() or 2), "--no-webui", "--swa-full"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, "llama-server")
    return url, proc


def engine_alone(provider: EngineProvider, prompt_ids, tokens: int, seed: int) -> tuple:
    """(tokens, seconds) of one streamed request straight to the engine, no candidates asked for."""
    api, client = provider.client.api, provider.client
    body = api.body(prompt_ids, tokens, SAMPLING, 0, seed, provider.model)
    body.pop("n_probs", None), body.pop("logprobs", None), body.pop("return_logprob", None)
    body.pop("top_logprobs_num", None), body.pop("post_sampling_probs", None)
    got = 0
    started = time.perf_counter()
    with client.http.stream("POST", api.path, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if api.name == "llama-server":
                got += len(event.get("tokens") or []) if not event.get("stop") else 0
            elif api.name == "vllm":
                got += sum(len(c.get("token_ids") or []) for c in event.get("choices") or ())
            else:
                got = event.get("meta_info", {}).get("completion_tokens", got)
    return got, time.perf_counter() - started


def through(provider: EngineProvider, strategy, prompt_ids, tokens: int, seed: int) -> tuple:
    sampler = BacktrackSampler(provider, strategy)
    started = time.perf_counter()
    out = list(sampler.generate(prompt_ids, max_new_tokens=tokens, temperature=SAMPLING[0], top_k=SAMPLING[1], seed=seed))
    return len(out), time.perf_counter() - started, sampler.stats


def serve_concurrency(url: str, engine_type: str, tokenizer, tokens: int, rounds: int) -> tuple:
    """Aggregate tokens/s of 1 client and of 4 concurrent clients through `serve --engine`."""
    port = free_port()
    command = [sys.executable, "-m", "backtrack_sampler.cli", "serve", "--engine", url, "--engine-type", engine_type,
               "--port", str(port)]
    if tokenizer:
        command += ["--tokenizer", str(tokenizer)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, "backtrack-sampler serve", path="/v1/models", seconds=120)

        def client(index: int, counts: list) -> None:
            with httpx.Client(timeout=300) as http:
                for r in range(rounds):
                    answer = http.post(base + "/v1/completions", json={
                        "model": "engine", "prompt": PROMPT, "max_tokens": tokens, "temperature": SAMPLING[0],
                        "top_k": SAMPLING[1], "seed": 1000 * index + r})
                    answer.raise_for_status()
                    counts.append(answer.json()["usage"]["completion_tokens"])

        result = []
        for clients in (1, 4):
            counts: list = []
            threads = [threading.Thread(target=client, args=(i, counts)) for i in range(clients)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            result.append(sum(counts) / (time.perf_counter() - started))
        return tuple(result)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running engine (default: start llama-server here)")
    parser.add_argument("--engine-type", default="llama-server", choices=("llama-server", "vllm", "sglang"))
    parser.add_argument("--tokenizer", help="the served model's tokenizer (.gguf or directory; default: embedded model)")
    parser.add_argument("--tokens", type=int, help="tokens per run (default 200; --quick 80)")
    parser.add_argument("--runs", type=int, help="runs per setting, alternated (default 3; --quick 1)")
    parser.add_argument("--slop-file", default=str(SLOPS), help="the 50,046-phrase list (JSON [[phrase, m], ...])")
    parser.add_argument("--skip-serve", action="store_true", help="skip (d)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    tokens = args.tokens or (80 if args.quick else 200)
    runs = args.runs or (1 if args.quick else 3)

    proc = None
    url = args.url
    if url is None:
        url, proc = start_llama_server(slots=4)
    try:
        provider = EngineProvider(url, args.engine_type, tokenizer=args.tokenizer)
        prompt_ids = provider.encode(PROMPT)
        slops = None
        if Path(args.slop_file).is_file():
            slops = AntiSlopStrategy(provider, json.loads(Path(args.slop_file).read_text()))
        through(provider, BaseStrategy(), prompt_ids, 8, seed=0)  # warm up
        rows = {"engine": [], "noop": [], "antislop": []}
        stats = {"noop": [], "antislop": []}
        for r in range(runs):  # alternated, so machine load hits every setting alike
            got, seconds = engine_alone(provider, prompt_ids, tokens, seed=r)
            rows["engine"].append(got / seconds)
            for name, strategy in (("noop", BaseStrategy()), ("antislop", slops)):
                if strategy is None:
                    continue
                before = (provider.stats.requests, provider.stats.prompt_tokens, provider.stats.cached_tokens)
                got, seconds, st = through(provider, strategy, prompt_ids, tokens, seed=r)
                rows[name].append(got / seconds)
                after = provider.stats
                stats[name].append((got, after.requests - before[0], after.prompt_tokens - before[1],
                                    after.cached_tokens - before[2], st.rewinds))
        engine_tps = statistics.median(rows["engine"])
        print(f"\n== {args.engine_type} at {url}: {runs} run(s) x {tokens} tokens, temperature 1, top_k 50 (median) ==")
        print(f"{'setting':40} {'tok/s':>7} {'ratio':>6} {'target':>7} {'trips/token':>12} {'cache hit':>10} {'rewinds':>8}")
        print(f"{'(a) engine alone':40} {engine_tps:7.2f} {1:6.2f}")
        for name, label, target in (("noop", "(b) provider, no-op strategy", 0.85),
                                    ("antislop", "(c) provider, AntiSlop 50,046 phrases", 0.75)):
            if not rows[name]:
                print(f"{label:40} skipped: {args.slop_file} is absent")
                continue
            tps = statistics.median(rows[name])
            got = sum(s[0] for s in stats[name])
            trips = sum(s[1] for s in stats[name]) / max(got, 1)
            prompt, cached = sum(s[2] for s in stats[name]), sum(s[3] for s in stats[name])
            print(f"{label:40} {tps:7.2f} {tps / engine_tps:6.2f} {target:7.2f} {trips:12.3f} "
                  f"{cached / max(prompt, 1):10.1%} {sum(s[4] for s in stats[name]):8d}")
        print("    trips/token: engine requests per delivered token; cache hit: share of the prompt tokens sent "
              "that the engine served from its prefix cache")
        if not args.skip_serve:
            one, four = serve_concurrency(url, args.engine_type, args.tokenizer, tokens, rounds=1 if args.quick else 2)
            print(f"{'(d) serve --engine, 1 client':40} {one:7.2f}")
            print(f"{'(d) serve --engine, 4 clients':40} {four:7.2f} {four / one:6.2f} {2.5:7.2f}")
        provider.close()
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
