"""Test helpers that run servers on 127.0.0.1: uvicorn in a thread, or ``backtrack-sampler serve``
as a subprocess."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parents[1]


class ServerThread:
    """uvicorn in a daemon thread on an ephemeral 127.0.0.1 port."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        engine = getattr(getattr(self.app, "state", None), "runner", None)
        if engine is not None:  # stop its generations: the next test's server may share the provider
            engine.close()


def free_port() -> int:
    """A free port on 127.0.0.1 (released just before the server takes it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_subprocess(args: List[str], ready_path: str = "/health", timeout: float = 120) -> Iterator[str]:
    """``backtrack-sampler serve ARGS --port P`` in a subprocess of this checkout; yields its URL once
    ``ready_path`` answers 200, and stops it afterwards. Fails with the server's output if it dies."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "backtrack_sampler.cli", "serve", *args, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, process.stdout.read()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def vllm_command(python: str, model: str, port: int, max_logprobs: int = 64) -> List[str]:
    """How the tests and bench/engine_bench.py start vLLM's CPU build (scripts/build_vllm.sh) on
    127.0.0.1: its OpenAI server module (the ``vllm serve`` script fails on the renamed
    distribution), eager mode (a faster start), prefix-cache blocks of 32 tokens."""
    return [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-logprobs",
        str(max_logprobs),
        "--logprobs-mode",
        "processed_logprobs",
        "--generation-config",
        "vllm",
        "--enforce-eager",
        "--max-model-len",
        "2048",
        "--block-size",
        "32",
        "--enable-prompt-tokens-details",
    ]


def vllm_env() -> dict:
    """Its environment: offline, no usage reports, 1 GB of KV cache, and VLLM_CPU_OMP_THREADS_BIND
    unset (binding both cores halves its throughput here)."""
    env = {key: value for key, value in os.environ.items() if key != "VLLM_CPU_OMP_THREADS_BIND"}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_CPU_KVCACHE_SPACE="1",
    )
    return env


def concurrent_streams(url: str, bodies: List[dict], text_of) -> List[str]:
    """POST each body (a streamed request) to ``url`` at once, one thread each; every client waits,
    after its first text, until every other one has text too (so all streams were open at the same
    time). ``text_of(chunk)`` is a chunk's text. Returns the texts; raises what a client met."""
    import json

    all_open = threading.Barrier(len(bodies), timeout=120)
    texts, errors = [""] * len(bodies), []

    def client(i: int) -> None:
        try:
            with httpx.stream("POST", url, json=bodies[i], timeout=120) as response:
                assert response.status_code == 200, response.read()
                waited = False
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    texts[i] += text_of(json.loads(line[6:]))
                    if texts[i] and not waited:
                        all_open.wait()  # every client has text while every stream is open
                        waited = True
                assert waited
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    return texts
