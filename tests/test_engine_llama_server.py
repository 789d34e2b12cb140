"""The engine provider against a real llama-server (built from the pinned llama-cpp-python sdist by
scripts/build_llama_server.sh; started here on 127.0.0.1 with the embedded model and 4 slots)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving import concurrent_streams, serve_subprocess

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, CreativeWritingStrategy, ReplaceStrategy
from backtrack_sampler.engine import EngineError, EngineProvider
from backtrack_sampler.strategy.base_strategy import BaseStrategy

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parents[1]


def llama_server_binary() -> str:
    """The cached llama-server (the build script builds it on first use: ~10 minutes)."""
    done = subprocess.run(["bash", str(ROOT / "scripts" / "build_llama_server.sh")], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"scripts/build_llama_server.sh failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


class LlamaServer:
    """A llama-server process on a free 127.0.0.1 port; ``stop()`` ends it (bounded waits)."""

    def __init__(self, binary: str, model: str, slots: int = 4, n_ctx: int = 8192):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="llama-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [
                binary,
                "-m",
                model,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "-np",
                str(slots),
                "-c",
                str(n_ctx),
                "-t",
                str(os.cpu_count() or 2),
                "--no-webui",
                "--no-warmup",
                "--swa-full",
                "-fa",
                "on",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                pytest.fail(f"llama-server exited with {self.proc.returncode}:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        pytest.fail("llama-server did not become healthy within 120 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture(scope="module")
def binary():
    return llama_server_binary()


@pytest.fixture(scope="module")
def gguf():
    from backtrack_sampler.provider.models import default_model_path

    return str(default_model_path())


@pytest.fixture(scope="module")
def server(binary, gguf):
    process = LlamaServer(binary, gguf)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def engine(server, gguf):
    provider = EngineProvider(server.url, "llama-server", tokenizer=gguf, timeout=60)
    yield provider
    provider.close()


class Margins(BaseStrategy):
    """Wraps a strategy (or none) and records the gap between the two best logits it leaves at
    every step, to check that a prompt has no near-tie."""

    def __init__(self, inner=None):
        self.inner, self.gaps = inner, []

    def on_logits(self, logits, continuation_tokens):
        if self.inner is not None:
            logits = self.inner.on_logits(logits, continuation_tokens)
        top2 = np.partition(logits, -2)[-2:]
        self.gaps.append(float(top2[1] - top2[0]))
        return logits

    def backtrack(self, continuation_tokens):
        return self.inner.backtrack(continuation_tokens) if self.inner is not None else continuation_tokens

    def get_keep_index(self):
        return self.inner.get_keep_index() if self.inner is not None else super().get_keep_index()

    @property
    def rewind_reason(self):
        return getattr(self.inner, "rewind_reason", None)

    def reset(self):
        if self.inner is not None:
            self.inner.reset()


# A prompt whose greedy continuation (30 tokens, with and without the ban) has no near-tie: the two
# best logits differ by more than 0.1 at every step (checked below, in-process), so llama.cpp's
# batch-shape-dependent rounding cannot flip a choice. (Prompts with gaps of only 0.02-0.03, e.g.
# "Water boils at" with " 100" banned, diverged in some runs: after a rewind the server may evaluate
# a different number of tokens in one batch than the in-process provider.) The server runs with
# -fa on, like the in-process Llama (load_llamacpp enables flash attention).
CASES = [("def fibonacci(n):\n", "return")]


def test_greedy_with_bans_equals_in_process(engine, llama_provider):
    for prompt, ban in CASES:
        for phrases in (None, [ban]):
            margins = Margins(AntiSlopStrategy(llama_provider, phrases) if phrases else None)
            local = BacktrackSampler(llama_provider, margins)
            expected = list(local.generate(prompt, max_new_tokens=30, temperature=0))
            assert min(margins.gaps) > 0.1, (prompt, phrases, min(margins.gaps))
            remote = BacktrackSampler(engine, AntiSlopStrategy(engine, phrases) if phrases else Margins())
            got = list(remote.generate(prompt, max_new_tokens=30, temperature=0))
            assert got == expected, (prompt, phrases, engine.decode(got), llama_provider.decode(expected))
            if phrases:
                assert remote.stats.rewinds > 0 and ban not in engine.decode(got)


def test_bans_hold_at_temperature(engine):
    banned = [" the", " a", " and"]
    before = engine.stats.requests
    for seed in range(3):
        sampler = BacktrackSampler(engine, AntiSlopStrategy(engine, banned))
        text = engine.decode(list(sampler.generate("Once upon a time", max_new_tokens=60, seed=seed, top_k=40)))
        assert not any(phrase in text.lower() for phrase in banned), text
    assert engine.stats.requests - before > 3  # the bans rewound: new requests from the kept prefix
    assert engine.stats.cached_tokens > 0  # and the server's prefix cache served them


def test_every_strategy_kind_runs(engine):
    """Strategies that change every step (CreativeWriting) and that force tokens (Replace) work too."""
    creative = BacktrackSampler(engine, CreativeWritingStrategy(engine))
    tokens = list(creative.generate("Once upon a time", max_new_tokens=30, seed=0, top_k=40))
    assert 0 < len(tokens) <= 30
    replace = BacktrackSampler(engine, ReplaceStrategy(engine, " lazy dog", " sleepy cat"))
    text = engine.decode(list(replace.generate("The quick brown fox", max_new_tokens=12, temperature=0)))
    assert " sleepy cat" in text and " lazy dog" not in text, text


def test_engine_error_is_reported(server, gguf):
    """A request the engine refuses (longer than its context) comes back as an EngineError with its message."""
    provider = EngineProvider(server.url, "llama-server", tokenizer=gguf, context_length=100_000)
    try:
        sampler = BacktrackSampler(provider, AntiSlopStrategy(provider, ["x"]))
        with pytest.raises(EngineError, match="HTTP 400"):
            list(sampler.generate([2] + [236761] * 9000, max_new_tokens=5))
    finally:
        provider.close()


def test_engine_dying_mid_stream_is_a_clear_error(binary, gguf):
    process = LlamaServer(binary, gguf, slots=1, n_ctx=2048)
    provider = EngineProvider(process.url, "llama-server", tokenizer=gguf, timeout=30)

    class KillAfter(BaseStrategy):
        def on_next_token(self, continuation_tokens, probs):
            if len(continuation_tokens) == 5:
                os.kill(process.proc.pid, signal.SIGKILL)

    try:
        sampler = BacktrackSampler(provider, KillAfter())
        started = time.perf_counter()
        with pytest.raises(EngineError, match="broke off|ended the stream|cannot reach"):
            list(sampler.generate("Once upon a time", max_new_tokens=200, seed=0))
        assert time.perf_counter() - started < 30
    finally:
        provider.close()
        process.stop()


def test_command_line_generate_through_the_engine(server, gguf):
    import io

    from backtrack_sampler.cli import main

    out, err = io.StringIO(), io.StringIO()
    status = main(
        [
            "generate",
            "Water boils at",
            "--engine",
            server.url,
            "--tokenizer",
            gguf,
            "--ban",
            " 100",
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
        ],
        stdout=out,
        stderr=err,
    )
    assert status == 0, err.getvalue()
    assert len(out.getvalue().split()) >= 3 and " 100" not in out.getvalue(), out.getvalue()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = io.StringIO()
    status = main(
        ["generate", "hi", "--engine", f"http://127.0.0.1:{port}", "--tokenizer", gguf],
        stdout=io.StringIO(),
        stderr=err,
    )
    assert status == 1 and "error: cannot reach llama-server" in err.getvalue()


def test_serve_engine_runs_concurrent_requests_concurrently(server, gguf):
    """`backtrack-sampler serve --engine URL` (a real process): 4 streamed requests are all under
    way at once (each got its first text while the others were still open), and bans hold."""
    with serve_subprocess(["--engine", server.url, "--tokenizer", gguf], ready_path="/v1/models") as base:
        bodies = [
            {
                "model": "x",
                "prompt": "Once upon a time",
                "max_tokens": 40,
                "seed": i,
                "stream": True,
                "banned_strings": [" the", " and"],
            }
            for i in range(4)
        ]
        texts = concurrent_streams(base + "/v1/completions", bodies, lambda chunk: chunk["choices"][0]["text"])
        for text in texts:
            assert text and " the " not in f"{text} " and " and " not in f"{text} ", text


def test_sillytavern_through_serve_engine(server, gguf):
    """SillyTavern in front of `serve --engine` (a real llama-server behind): its status call, its
    exact "tabby" body streamed and a KoboldAI stream, with their bans honoured."""
    import json

    from st_bodies import kobold_body, textgen_body

    prompt = "Once upon a time, in a small village by the sea, there lived"
    with serve_subprocess(["--engine", server.url, "--tokenizer", gguf], ready_path="/v1/models") as base:
        assert httpx.get(base + "/v1/model/list", timeout=30).json()["data"][0]["id"]
        body = textgen_body("tabby", prompt, 40, ["\n\n"], banned_strings=[" the", " and"], rep_pen=1.1)
        response = httpx.post(base + "/v1/completions", json=body, timeout=180)
        assert response.status_code == 200, response.text
        lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        text = "".join(json.loads(line)["choices"][0]["text"] for line in lines[:-1])
        assert text and not any(f" {w} " in f" {text.lower()} " for w in ("the", "and")), text
        events = httpx.post(
            base + "/api/extra/generate/stream",
            timeout=180,
            json=kobold_body(prompt, 30, ["\n\n"], banned_tokens=[" the"], sampler_seed=3),
        ).text
        parsed = [json.loads(block.split("data: ", 1)[1]) for block in events.split("\n\n") if block]
        story = "".join(event["token"] for event in parsed)
        assert parsed[-1]["finish_reason"] in ("stop", "length") and story and " the " not in f" {story.lower()} "


def test_batch_through_the_engine(server, gguf, tmp_path):
    """`backtrack-sampler batch --engine URL`: every prompt once, 4 at a time on the server's slots,
    the bans held, per-line overrides applied, the rewinds traced with their ids."""
    import io
    import json

    from backtrack_sampler.cli import main

    rows = [
        {"id": i, "prompt": prompt}
        for i, prompt in enumerate(
            ["Once upon a time", "The lighthouse keeper", "In the morning the baker", "def fibonacci(n):\n"]
        )
    ]
    rows[1]["max_tokens"] = 8
    prompts, out, trace = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl", tmp_path / "trace.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    err = io.StringIO()
    status = main(
        [
            "batch",
            str(prompts),
            "-o",
            str(out),
            "--engine",
            server.url,
            "--tokenizer",
            gguf,
            "--ban",
            " the",
            "--ban",
            " a",
            "--parallel",
            "4",
            "--max-new-tokens",
            "24",
            "--seed",
            "1",
            "--trace",
            str(trace),
        ],
        stdout=io.StringIO(),
        stderr=err,
    )
    assert status == 0, err.getvalue()
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(records) == [0, 1, 2, 3] and records[1]["delivered"] <= 8
    for record in records.values():
        assert record["delivered"] > 0 and " the" not in record["text"].lower() and " a " not in record["text"].lower()
    rewinds = [json.loads(line) for line in trace.read_text().splitlines()]
    assert sum(r["rewinds"] for r in records.values()) == len(rewinds) > 0
    assert "4 completions written" in err.getvalue()
