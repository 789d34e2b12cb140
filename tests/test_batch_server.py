"""The server runs many generations at once (BatchScheduler, llama.cpp slots): concurrent clients
with different bans, a disconnect frees its slot, a full queue answers 429 and recovers. Real
uvicorn on 127.0.0.1, the embedded model, the official openai client."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest
from serving import ServerThread

from backtrack_sampler.server.app import Engine, create_app

pytestmark = pytest.mark.model
TIMEOUT = 300


@pytest.fixture(scope="module")
def slotted_llm():
    from backtrack_sampler.provider.models import load_llamacpp

    return load_llamacpp(n_ctx=1024)


def provider(llm, slots):
    from backtrack_sampler.provider.llamacpp_provider import LlamacppProvider

    return LlamacppProvider(llm, None, "cpu", slots=slots)


def serving(llm, parallel, max_queue):
    engine = Engine(provider(llm, parallel), "gemma-batch", parallel, max_queue)
    return engine, ServerThread(create_app(engine))


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def wait_for(predicate, seconds=60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


class Streamer(threading.Thread):
    """A raw SSE completion stream in a thread; ``stop`` closes the connection (a disconnect)."""

    def __init__(self, server, max_tokens=800, **body):
        super().__init__(daemon=True)
        self.url, self.body = (
            server.url + "/v1/completions",
            dict(prompt="Tell me a long story.", max_tokens=max_tokens, stream=True, **body),
        )
        self.status, self.chunks, self.closing = None, 0, threading.Event()
        self.headers = {}

    def run(self):
        with httpx.stream("POST", self.url, json=self.body, timeout=TIMEOUT) as response:
            self.status, self.headers = response.status_code, response.headers
            for line in response.iter_lines():
                if self.closing.is_set():
                    return
                if line.startswith("data: {"):
                    self.chunks += 1

    def stop(self):
        self.closing.set()
        self.join(30)


def test_eight_concurrent_requests_with_different_bans(slotted_llm):
    bans = [
        [" the", " The"],
        [" and"],
        [" a", " A"],
        [" was"],
        [" of"],
        [" to"],
        [" in"],
        [" he", " she", " He", " She"],
    ]
    engine, thread = serving(slotted_llm, 8, 8)
    results, peak = {}, [0]
    with (
        thread as server,
        openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0) as client,
    ):

        def ask(i):
            stream = client.completions.create(
                model="gemma-batch",
                prompt="Write a short story about a dragon who learns to bake bread.\n",
                max_tokens=48,
                temperature=0.8,
                seed=i,
                stream=True,
                extra_body={"banned_strings": bans[i]},
            )
            parts, finish = [], None
            for chunk in stream:
                parts.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            results[i] = ("".join(parts), finish)

        workers = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for worker in workers:
            worker.start()
        while any(w.is_alive() for w in workers):
            peak[0] = max(peak[0], health(server)["running"])
            time.sleep(0.1)
        assert health(server)["running"] == 0 and health(server)["queued"] == 0
    engine.close()
    assert peak[0] >= 4, "the requests did not run side by side"
    for i, ban in enumerate(bans):
        text, finish = results[i]
        assert finish in ("length", "stop") and len(text) > 20, results[i]
        assert not any(b in " " + text for b in ban), (ban, text)


def test_disconnecting_one_running_client_frees_its_slot(slotted_llm):
    engine, thread = serving(slotted_llm, 3, 4)
    with thread as server:
        clients = [Streamer(server, seed=i) for i in range(3)]
        for c in clients:
            c.start()
        assert wait_for(lambda: all(c.chunks > 0 for c in clients)), [c.status for c in clients]
        assert health(server)["running"] == 3
        clients[1].stop()
        assert wait_for(lambda: health(server)["running"] == 2, 20), "the slot was not freed"
        assert clients[0].is_alive() and clients[2].is_alive()
        before = clients[0].chunks
        assert wait_for(lambda: clients[0].chunks > before + 3, 30), "the others stopped"
        late = Streamer(server, seed=9)  # the freed slot takes a new request at once
        late.start()
        assert wait_for(lambda: late.chunks > 0 and health(server)["running"] == 3, 30)
        for c in (clients[0], clients[2], late):
            c.stop()
        assert wait_for(lambda: health(server)["running"] == 0, 20)
    engine.close()


def test_full_queue_answers_429_and_recovers(slotted_llm):
    engine, thread = serving(slotted_llm, 1, 1)
    with thread as server:
        running = Streamer(server, seed=1)
        running.start()
        assert wait_for(lambda: running.chunks > 0)
        waiting = socket.create_connection(("127.0.0.1", server.port))  # raw, to hang up while it waits
        body = json.dumps({"prompt": "Hello", "max_tokens": 5, "stream": True}).encode()
        waiting.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert wait_for(lambda: health(server)["queued"] == 1)
        refused = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 5}, timeout=TIMEOUT)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        error = refused.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "rate_limit_exceeded"
        bad = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": -1}, timeout=TIMEOUT)
        assert bad.status_code == 400, "a bad request is refused before it could queue"
        waiting.close()  # a queued client that goes away leaves the queue
        assert wait_for(lambda: health(server)["queued"] == 0, 20)
        running.stop()
        assert wait_for(lambda: health(server)["running"] == 0, 20)
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0) as client:
            answer = client.completions.create(model="gemma-batch", prompt="Hi", max_tokens=5, temperature=0)
        assert answer.choices[0].finish_reason in ("length", "stop")
    engine.close()
