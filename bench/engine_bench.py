"""Engine benchmark: a serving engine alone vs through backtrack_sampler's engine provider.

Single stream, the same chat prompt and sampling (temperature 1, top_k 50):
(a) the engine alone: its own streaming API, no candidates asked for
(b) through EngineProvider with a no-op strategy                       target: >= 0.9 x (a)
(c) through EngineProvider with AntiSlop, 50,046 phrases (substring)   target: >= 0.85 x (a)
(c') the same list with whole_words=True (what the README recommends for it)
(c0) the ceiling of (c) and (c'): the same model in process (llama.cpp), the same prompt, sampling
    and list, vs the same model in process with no strategy (run once, before any engine starts)
(d) `backtrack-sampler serve --engine URL`: 4 concurrent clients vs 1 client (aggregate tokens/s)
                                                                       target: >= 2.5 x
(d0) the ceiling of (d): the engine alone, 4 concurrent clients vs 1
Many prompts (200 chat prompts, 4 at a time by default):
(e) the engine alone, 4 concurrent clients over the same prompts
(f) `backtrack-sampler batch --engine URL --parallel 4`, no strategy   target: >= 0.9 x (e)
(g) the same with --slops (the 50,046 phrases) --whole-words           target: >= 0.85 x (e)
    (over the first --batch-slop-prompts prompts: it is far slower)
Also: engine round trips per delivered token, the mean time a request took to give its first
token (what each rewind that changes the text costs through an engine), rewinds per delivered
token, completions per minute, and the prompt tokens the engine served from its prefix cache
(when it reports them).

    python bench/engine_bench.py --quick                     # starts llama-server (scripts/build_llama_server.sh)
                                                             # with SmolLM2 135M Instruct, 4 slots, on 127.0.0.1
    python bench/engine_bench.py --engine-type vllm --quick  # starts vLLM's CPU build (scripts/build_vllm.sh)
                                                             # with SmolLM2 converted to a Hugging Face folder
    python bench/engine_bench.py --engine-type both --quick  # one, then the other: the same model, like for like
    python bench/engine_bench.py --model gemma-3-270m        # llama-server with another embedded model
    python bench/engine_bench.py --url http://gpu-box:8000 --engine-type vllm --tokenizer /models/Llama-3.1-8B

The 50,046-phrase list is read from ../shared/data/antislop (beside the repository) or --slop-file;
when it is absent, (c), (c') and (g) are skipped and the report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
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
sys.path.insert(1, str(ROOT / "tests"))
SLOPS = ROOT.parent / "shared" / "data" / "antislop" / "slop_phrase_prob_adjustments_full_list.json"

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, BaseStrategy  # noqa: E402
from backtrack_sampler.engine import EngineProvider  # noqa: E402
from backtrack_sampler.provider.chat import chat_prompt_tokens  # noqa: E402
from backtrack_sampler.strategy.sampling import Sampling  # noqa: E402

STORY = [{"role": "user", "content": "Write a long fantasy story about a young woman who discovers a hidden city."}]
SAMPLING = Sampling(1.0, 50)
SUBJECTS = [
    "a fox",
    "a lighthouse keeper",
    "a baker",
    "a robot",
    "a violinist",
    "a gardener",
    "a dragon",
    "a sailor",
    "an old clockmaker",
    "a detective",
    "a little girl",
    "a wizard",
    "a stray dog",
    "an astronaut",
    "a teacher",
    "a knight",
    "a painter",
    "a fisherman",
    "a librarian",
    "a ghost",
]
PLACES = [
    "in a small village",
    "at sea",
    "in a big city",
    "in the mountains",
    "in a desert",
    "on the moon",
    "in a forest",
    "in a castle",
    "under the ground",
    "on a train",
]


def batch_prompts(n: int) -> list:
    """n distinct chat prompts (20 subjects x 10 places, then again)."""
    pairs = [(s, p) for p in PLACES for s in SUBJECTS]
    return [
        [
            {
                "role": "user",
                "content": f"Write a short story about {pairs[i % len(pairs)][0]} "
                f"{pairs[i % len(pairs)][1]}." + (f" Part {i // len(pairs) + 1}." if i >= len(pairs) else ""),
            }
        ]
        for i in range(n)
    ]


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


class Started:
    """An engine this script started: ``url``, ``tokenizer`` (for EngineProvider), ``label``,
    ``seconds`` (until it answered); ``stop()`` ends it."""

    def __init__(self, proc: subprocess.Popen, url: str, tokenizer: str, label: str, seconds: float, group: bool):
        self.proc, self.url, self.tokenizer, self.label, self.seconds, self.group = (
            proc,
            url,
            tokenizer,
            label,
            seconds,
            group,
        )

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        if self.group:  # vLLM: its engine core is a child process
            os.killpg(self.proc.pid, signal.SIGTERM)
        else:
            self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL) if self.group else self.proc.kill()
            self.proc.wait(10)


def start_llama_server(slots: int, model: str) -> Started:
    binary = (
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "build_llama_server.sh")], check=True, capture_output=True, text=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    from backtrack_sampler.provider.models import resolve_model

    path = str(resolve_model(model))
    port = free_port()
    log = tempfile.TemporaryFile()
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            binary,
            "-m",
            path,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-np",
            str(slots),
            "-c",
            str(2048 * slots),
            "-t",
            str(os.cpu_count() or 2),
            "--no-webui",
            "--swa-full",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, "llama-server")
    return Started(
        proc,
        url,
        path,
        f"llama-server -np {slots} --swa-full, {Path(path).name}",
        time.monotonic() - started,
        group=False,
    )


def start_vllm() -> Started:
    """vLLM's CPU build serving the converted SmolLM2 folder (scripts/build_vllm.sh), started the way
    tests/test_engine_vllm.py starts it (tests/serving.py: vllm_command, vllm_env)."""
    from serving import vllm_command, vllm_env

    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_vllm.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    if done.returncode != 0:
        sys.exit(f"scripts/build_vllm.sh failed:\n{done.stderr[-3000:]}")
    build = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()
    started = time.monotonic()
    proc = subprocess.Popen(
        vllm_command(build["python"], build["model"], port),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=vllm_env(),
        start_new_session=True,
    )
    server = Started(
        proc,
        url,
        build["model"],
        f"vLLM CPU 0.32.0 --block-size 32 --enforce-eager, {Path(build['model']).name}",
        0.0,
        group=True,
    )
    deadline = started + 300
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            server.stop()
            sys.exit(f"vLLM {'exited' if proc.returncode is not None else 'did not answer within 300 s'}:\n{tail}")
        try:
            answer = httpx.post(
                url + "/v1/completions",
                timeout=60,
                json={"prompt": [1, 504], "max_tokens": 2, "temperature": 0, "model": build["model"]},
            )
            if answer.status_code == 200:
                server.seconds = time.monotonic() - started
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def engine_alone(provider: EngineProvider, prompt_ids, tokens: int, seed: int) -> tuple:
    """(tokens, seconds) of one streamed request straight to the engine, no candidates asked for."""
    api, client = provider.client.api, provider.client
    body = api.body(prompt_ids, tokens, SAMPLING, 0, seed, provider.model)
    body.pop("n_probs", None), body.pop("logprobs", None), body.pop("return_logprob", None)
    body.pop("top_logprobs_num", None), body.pop("post_sampling_probs", None)
    for attempt in range(3):
        try:
            return _stream_alone(client, api, body)
        except httpx.RemoteProtocolError:  # a kept-alive connection the engine had closed while idle
            if attempt == 2:
                raise


def _stream_alone(client, api, body) -> tuple:
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


def engine_alone_many(provider: EngineProvider, prompts: list, tokens: int, parallel: int, seed0: int) -> tuple:
    """(tokens, seconds) of ``parallel`` clients straight to the engine, taking the prompts in turn
    (prompt i with seed seed0 + i, as `batch --seed seed0` gives them)."""
    lock, todo, got, errors = threading.Lock(), list(enumerate(prompts)), [], []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i, ids = todo.pop(0)
            try:
                got.append(engine_alone(provider, ids, tokens, seed0 + i)[0])
            except Exception as error:  # reported below
                errors.append(error)
                return

    threads = [threading.Thread(target=client) for _ in range(parallel)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(got), time.perf_counter() - started


def through(provider: EngineProvider, strategy, prompt_ids, tokens: int, seed: int) -> tuple:
    sampler = BacktrackSampler(provider, strategy)
    started = time.perf_counter()
    out = list(
        sampler.generate(
            prompt_ids, max_new_tokens=tokens, temperature=SAMPLING.temperature, top_k=SAMPLING.top_k, seed=seed
        )
    )
    return len(out), time.perf_counter() - started, sampler.stats


def serve_concurrency(url: str, engine_type: str, tokenizer, tokens: int, rounds: int) -> tuple:
    """Aggregate tokens/s of 1 client and of 4 concurrent clients through `serve --engine`."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "backtrack_sampler.cli",
        "serve",
        "--engine",
        url,
        "--engine-type",
        engine_type,
        "--port",
        str(port),
        "--engine-timeout",
        "300",
    ]
    if tokenizer:
        command += ["--tokenizer", str(tokenizer)]
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, "backtrack-sampler serve", path="/v1/models", seconds=120)

        def client(index: int, counts: list) -> None:
            with httpx.Client(timeout=300) as http:
                for r in range(rounds):
                    answer = http.post(
                        base + "/v1/chat/completions",
                        json={
                            "model": "engine",
                            "messages": STORY,
                            "max_tokens": tokens,
                            "temperature": SAMPLING[0],
                            "top_k": SAMPLING[1],
                            "seed": 1000 * index + r,
                        },
                    )
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
            if len(counts) < clients * rounds:
                sys.exit("a request through serve --engine failed")
            result.append(sum(counts) / (time.perf_counter() - started))
        return tuple(result)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


SUMMARY = re.compile(
    r"\[(\d+) completions written to .*?; (\d+) tokens at [\d.]+ tokens/s in ([\d.]+) s; "
    r"(\d+) rewound in (\d+) rewinds"
)


def run_batch_cli(
    url: str,
    engine_type: str,
    tokenizer,
    prompts: list,
    tokens: int,
    parallel: int,
    seed: int,
    extra: list,
    folder: Path,
    name: str,
) -> dict:
    """`backtrack-sampler batch` (a subprocess) over ``prompts``: its summary line's completions,
    tokens, generation seconds and rewinds, and the whole command's wall time (with its start)."""
    source, out = folder / f"{name}.prompts.jsonl", folder / f"{name}.out.jsonl"
    source.write_text("".join(json.dumps({"id": i, "messages": m}) + "\n" for i, m in enumerate(prompts)))
    command = [
        sys.executable,
        "-m",
        "backtrack_sampler.cli",
        "batch",
        str(source),
        "-o",
        str(out),
        "--engine",
        url,
        "--engine-type",
        engine_type,
        "--parallel",
        str(parallel),
        "--max-new-tokens",
        str(tokens),
        "--temperature",
        str(SAMPLING[0]),
        "--top-k",
        str(SAMPLING[1]),
        "--seed",
        str(seed),
        "--engine-timeout",
        "300",
        *extra,
    ]
    if tokenizer:
        command += ["--tokenizer", str(tokenizer)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - started
    found = SUMMARY.search(done.stderr)
    if done.returncode != 0 or not found:
        sys.exit(f"backtrack-sampler batch failed ({done.returncode}):\n{done.stderr[-3000:]}")
    completions, delivered, seconds, rewound, rewinds = found.groups()
    return {
        "completions": int(completions),
        "tokens": int(delivered),
        "seconds": float(seconds),
        "rewinds": int(rewinds),
        "rewound": int(rewound),
        "wall": wall,
    }


def in_process_ceilings(model: str, slop_list, tokens: int, runs: int) -> dict:
    """(c0): {"antislop": ratio, "words": ratio} of the same settings with the same model in
    process (llama.cpp), each vs no strategy in process: what the list costs with no engine."""
    from backtrack_sampler.provider.models import load_provider

    provider = load_provider("llamacpp", model)
    prompt_ids = chat_prompt_tokens(provider, STORY)
    strategies = {
        "noop": BaseStrategy(),
        "antislop": AntiSlopStrategy(provider, slop_list),
        "words": AntiSlopStrategy(provider, slop_list, whole_words=True),
    }
    rows = {name: [] for name in strategies}
    steps = {name: [0, 0, 0] for name in strategies}
    through(provider, BaseStrategy(), prompt_ids, 8, seed=0)  # warm up
    for r in range(runs):
        for name, strategy in strategies.items():
            got, seconds, st = through(provider, strategy, prompt_ids, tokens, seed=r)
            rows[name].append(got / seconds)
            steps[name] = [a + b for a, b in zip(steps[name], (got, st.rewinds, st.rewound))]
    base = statistics.median(rows["noop"])
    print(f"\n== (c0) in process: llama.cpp, {model}, the same prompt, sampling and list ==")
    print(f"{'setting':44} {'tok/s':>7} {'ratio':>6} {'rewinds/tok':>12} {'rewound/tok':>12}")
    ceilings = {}
    for name, label_ in (
        ("noop", "in process, no strategy"),
        ("antislop", f"in process, AntiSlop {len(slop_list):,} phrases"),
        ("words", "in process, the same, whole_words=True"),
    ):
        tps = statistics.median(rows[name])
        got, rewinds, rewound = steps[name]
        ceilings[name] = tps / base
        print(f"{label_:44} {tps:7.2f} {tps / base:6.2f} {rewinds / max(got, 1):12.2f} {rewound / max(got, 1):12.2f}")
    print("    rewound/tok: generated tokens taken back per delivered token (work a rewind throws away)", flush=True)
    ceilings.pop("noop")
    return ceilings  # (the model is freed on return, before an engine starts)


def bench_engine(
    args, engine_type: str, url: str, tokenizer, label: str, tokens: int, runs: int, slop_list, ceilings: dict
) -> None:
    provider = EngineProvider(url, engine_type, tokenizer=tokenizer, timeout=300)
    prompt_ids = chat_prompt_tokens(provider, STORY)
    print(f"\n== {engine_type} at {url} ({label}) ==", flush=True)
    strategies = {"noop": BaseStrategy()}
    if slop_list is not None:
        began = time.perf_counter()
        strategies["antislop"] = AntiSlopStrategy(provider, slop_list)
        strategies["words"] = AntiSlopStrategy(provider, slop_list, whole_words=True)
        print(f"   (AntiSlop with {len(slop_list):,} phrases built twice in {time.perf_counter() - began:.1f} s)")
    through(provider, BaseStrategy(), prompt_ids, 8, seed=0)  # warm up
    engine_alone(provider, prompt_ids, 8, seed=0)
    rows = {"engine": [], "noop": [], "antislop": [], "words": []}
    stats = {"noop": [], "antislop": [], "words": []}
    for r in range(runs):  # alternated, so machine load hits every setting alike
        got, seconds = engine_alone(provider, prompt_ids, tokens, seed=r)
        rows["engine"].append(got / seconds)
        for name, strategy in strategies.items():
            b = provider.stats
            before = (b.requests, b.prompt_tokens, b.cached_tokens, b.first_tokens, b.first_token_seconds)
            got, seconds, st = through(provider, strategy, prompt_ids, tokens, seed=r)
            rows[name].append(got / seconds)
            after = provider.stats
            stats[name].append(
                (
                    got,
                    after.requests - before[0],
                    after.prompt_tokens - before[1],
                    after.cached_tokens - before[2],
                    st.rewinds,
                    after.first_tokens - before[3],
                    after.first_token_seconds - before[4],
                )
            )
    engine_tps = statistics.median(rows["engine"])
    print(f"single stream: {runs} run(s) x {tokens} tokens, temperature 1, top_k 50 (median)")
    print(
        f"{'setting':44} {'tok/s':>7} {'ratio':>6} {'target':>7} {'ceiling':>7} {'trips/token':>12} "
        f"{'ms/trip':>8} {'cache hit':>10} {'rewinds':>8} {'rewinds/tok':>12}"
    )
    print(f"{'(a) engine alone':44} {engine_tps:7.2f} {1:6.2f} {'':7} {'':7} {'':12} {1000 / engine_tps:8.1f}")
    for name, label_, target in (
        ("noop", "(b) provider, no-op strategy", 0.9),
        ("antislop", f"(c) provider, AntiSlop {len(slop_list or ()):,} phrases", 0.85),
        ("words", "(c') the same, whole_words=True", 0.85),
    ):
        if not rows[name]:
            print(f"{label_:44} skipped: {args.slop_file} is absent")
            continue
        tps = statistics.median(rows[name])
        got = sum(s[0] for s in stats[name])
        trips = sum(s[1] for s in stats[name]) / max(got, 1)
        prompt, cached = sum(s[2] for s in stats[name]), sum(s[3] for s in stats[name])
        rewinds = sum(s[4] for s in stats[name])
        first = 1000 * sum(s[6] for s in stats[name]) / max(sum(s[5] for s in stats[name]), 1)
        ceiling = f"{ceilings[name]:7.2f}" if name in ceilings else f"{'':7}"
        print(
            f"{label_:44} {tps:7.2f} {tps / engine_tps:6.2f} {target:7.2f} {ceiling} {trips:12.3f} "
            f"{first:8.1f} {cached / max(prompt, 1):10.1%} {rewinds:8d} {rewinds / max(got, 1):12.2f}"
        )
    print(
        "    ceiling: (c0), the same setting in process vs no strategy in process; trips/token: engine requests "
        "per delivered token; ms/trip: a request's mean time to its first token ((a): ms per streamed token); "
        "cache hit: share of the prompt tokens sent that the engine reported serving from its prefix cache",
        flush=True,
    )
    if not args.skip_serve:
        alone_one = engine_alone_many(provider, [prompt_ids], tokens, 1, seed0=0)
        alone_four = engine_alone_many(provider, [prompt_ids] * 4, tokens, 4, seed0=0)
        alone_one, alone_four = alone_one[0] / alone_one[1], alone_four[0] / alone_four[1]
        print(f"{'(d0) engine alone, 1 client':44} {alone_one:7.2f}")
        print(
            f"{'(d0) engine alone, 4 clients':44} {alone_four:7.2f} {alone_four / alone_one:6.2f} "
            f"{'':7}   (ratio: vs 1 client; the ceiling of (d))"
        )
        one, four = serve_concurrency(url, engine_type, tokenizer, tokens, rounds=1 if args.quick else 2)
        print(f"{'(d) serve --engine, 1 client':44} {one:7.2f}")
        print(
            f"{'(d) serve --engine, 4 clients':44} {four:7.2f} {four / one:6.2f} {2.5:7.2f}   (ratio: vs 1 client)",
            flush=True,
        )
    if args.batch_prompts:
        n, p, bt = args.batch_prompts, args.parallel, args.batch_tokens
        prompts = batch_prompts(n)
        ids = [chat_prompt_tokens(provider, m) for m in prompts]
        engine_alone_many(provider, ids[:p], 8, p, seed0=0)  # warm up
        got, seconds = engine_alone_many(provider, ids, bt, p, seed0=1)
        alone = got / seconds
        with tempfile.TemporaryDirectory() as folder:
            results = [
                (
                    "(f) batch, no strategy",
                    0.9,
                    run_batch_cli(url, engine_type, tokenizer, prompts, bt, p, 1, [], Path(folder), "noop"),
                )
            ]
            if slop_list is not None and args.batch_slop_prompts:
                m = min(args.batch_slop_prompts, n)
                results.append(
                    (
                        f"(g) batch, {len(slop_list):,} phrases, --whole-words",
                        0.85,
                        run_batch_cli(
                            url,
                            engine_type,
                            tokenizer,
                            prompts[:m],
                            bt,
                            p,
                            1,
                            ["--slops", args.slop_file, "--whole-words"],
                            Path(folder),
                            "slops",
                        ),
                    )
                )
        print(f"many prompts: chat prompts x {bt} tokens at most, {p} at a time, temperature 1, top_k 50")
        print(
            f"{'setting':44} {'prompts':>7} {'tok/s':>7} {'ratio':>6} {'target':>7} {'compl/min':>10} "
            f"{'rewinds/tok':>12} {'wall s':>7}"
        )
        print(
            f"{f'(e) engine alone, {p} clients':44} {n:7d} {alone:7.2f} {1:6.2f} {'':7} "
            f"{60 * n / seconds:10.1f} {'':12} {seconds:7.1f}"
        )
        for label_, target, r in results:
            tps = r["tokens"] / r["seconds"]
            print(
                f"{label_:44} {r['completions']:7d} {tps:7.2f} {tps / alone:6.2f} {target:7.2f} "
                f"{60 * r['completions'] / r['seconds']:10.1f} {r['rewinds'] / max(r['tokens'], 1):12.2f} "
                f"{r['wall']:7.1f}"
            )
        if slop_list is None:
            print(f"{'(g) batch, 50,046 phrases':44} skipped: {args.slop_file} is absent")
        print(
            "    tok/s and compl/min: over the generation (batch's own summary); wall s: the whole command, "
            "with its start (tokenizer, ban list)",
            flush=True,
        )
    provider.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running engine (default: start llama-server or vLLM here)")
    parser.add_argument(
        "--engine-type",
        default="llama-server",
        choices=("llama-server", "vllm", "sglang", "both"),
        help="both: start llama-server, then vLLM, with the same model (no --url)",
    )
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="the embedded model a started llama-server serves (default: smollm2-135m-instruct, the "
        "model the vLLM build serves converted)",
    )
    parser.add_argument("--tokenizer", help="with --url: the served model's tokenizer (.gguf or directory)")
    parser.add_argument("--tokens", type=int, help="tokens per single-stream run (default 200; --quick 80)")
    parser.add_argument("--runs", type=int, help="runs per single-stream setting, alternated (default 3; --quick 1)")
    parser.add_argument("--parallel", type=int, default=4, help="concurrency of (e)-(g) (default 4)")
    parser.add_argument("--batch-prompts", type=int, default=200, help="prompts of (e) and (f) (default 200; 0: skip)")
    parser.add_argument(
        "--batch-slop-prompts",
        type=int,
        help="prompts of (g), the first ones (default: --batch-prompts; --quick 40; 0: skip)",
    )
    parser.add_argument(
        "--batch-tokens", type=int, help="tokens per prompt at most in (e)-(g) (default 64; --quick 24)"
    )
    parser.add_argument(
        "--slop-file",
        default=str(SLOPS),
        help="the phrase list (default: the 50,046-phrase one; JSON [[phrase, m], ...] or [phrase, ...])",
    )
    parser.add_argument("--skip-serve", action="store_true", help="skip (d)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    tokens = args.tokens or (80 if args.quick else 200)
    runs = args.runs or (1 if args.quick else 3)
    args.batch_tokens = args.batch_tokens or (24 if args.quick else 64)
    if args.batch_slop_prompts is None:
        args.batch_slop_prompts = 40 if args.quick else args.batch_prompts
    if args.url and args.engine_type == "both":
        parser.error("--engine-type both starts the engines here: no --url")
    if not args.url and args.engine_type == "sglang":
        parser.error("SGLang is not started here: give --url")
    if not args.url and args.engine_type in ("vllm", "both"):
        from backtrack_sampler.provider.models import resolve_model

        if resolve_model(args.model) != resolve_model("smollm2-135m-instruct"):
            parser.error("the vLLM build here serves SmolLM2 135M Instruct only (scripts/build_vllm.sh): no --model")
    slop_list = json.loads(Path(args.slop_file).read_text()) if Path(args.slop_file).is_file() else None
    began = time.perf_counter()
    ceilings = {}
    if slop_list is not None and not args.url:  # the served model is an embedded one: run it here too
        ceilings = in_process_ceilings(args.model, slop_list, tokens, runs)
    if args.url:
        bench_engine(args, args.engine_type, args.url, args.tokenizer, "given", tokens, runs, slop_list, ceilings)
    for engine_type in (("llama-server", "vllm") if args.engine_type == "both" else (args.engine_type,)) * (
        not args.url
    ):
        server = start_llama_server(4, args.model) if engine_type == "llama-server" else start_vllm()
        try:
            print(f"\n[{engine_type} answered {server.seconds:.1f} s after it started]", flush=True)
            bench_engine(
                args, engine_type, server.url, server.tokenizer, server.label, tokens, runs, slop_list, ceilings
            )
        finally:
            server.stop()
    print(f"\n[whole run: {time.perf_counter() - began:.0f} s]")


if __name__ == "__main__":
    main()
