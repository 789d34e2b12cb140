"""The OpenAI-compatible server, driven by the official ``openai`` client (and httpx for raw
checks) against a uvicorn server on 127.0.0.1 (ephemeral port) running the embedded model."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest
from serving import ServerThread

from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.server.app import Engine, Limits, StopFilter, create_app

pytestmark = pytest.mark.model
KEY = "test-key"
TIMEOUT = 120  # seconds, per request: the shared CI machine can be slow


@pytest.fixture(scope="module")
def engine(llama_provider):
    return Engine(llama_provider, "gemma-test")


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, api_key=KEY)) as running:
        yield running


def openai_client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def client(server):
    with openai_client(server) as c:
        yield c


@pytest.fixture(scope="module")
def hf_client(transformers_provider):
    """An OpenAI client of a server running the transformers provider."""
    with ServerThread(create_app(Engine(transformers_provider, "gemma-test"), api_key=KEY)) as running:
        with openai_client(running) as c:
            yield c


@pytest.fixture(params=["llama", "transformers"])
def any_client(request):
    """The client of the llama.cpp server, then of the transformers one."""
    return request.getfixturevalue("client" if request.param == "llama" else "hf_client")


def post(server, path, body=None, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key and not isinstance(server, ServerProcess) else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=TIMEOUT, **kwargs)


def assert_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


PROMPT = "The capital of France is"


def greedy(client, prompt=PROMPT, max_tokens=6, **extra):
    return client.completions.create(
        model="gemma-test", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra or None
    )


def assert_finish(finish_reason, completion_tokens, max_tokens):
    """``length`` exactly when the token budget ran out, ``stop`` (end of turn or stop string) before it."""
    assert finish_reason == ("length" if completion_tokens == max_tokens else "stop"), (
        finish_reason,
        completion_tokens,
    )


_BASELINES = {}


@pytest.fixture
def baseline(any_client):
    """The greedy completion of PROMPT (6 tokens), computed once per server."""
    if any_client not in _BASELINES:
        _BASELINES[any_client] = greedy(any_client)
    return _BASELINES[any_client]


# --- routes -------------------------------------------------------------------------------------
def test_health_needs_no_key(server):
    response = httpx.get(server.url + "/health", timeout=10)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["gemma-test"]
    assert client.models.retrieve("gemma-test").id == "gemma-test"


def test_completion(baseline):
    result = baseline
    choice = result.choices[0]
    assert isinstance(choice.text, str) and choice.text
    assert_finish(choice.finish_reason, result.usage.completion_tokens, 6)
    assert result.usage.prompt_tokens > 0 and 0 < result.usage.completion_tokens <= 6
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.object == "text_completion" and result.model == "gemma-test"


def test_streamed_completion_matches_the_plain_one(any_client, baseline):
    plain = baseline.choices[0]
    chunks = list(
        any_client.completions.create(model="gemma-test", prompt=PROMPT, max_tokens=6, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == plain.text
    assert chunks[-1].choices[0].finish_reason == plain.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_completion(any_client):
    result = any_client.chat.completions.create(
        model="gemma-test",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        max_tokens=4,
        temperature=0,
    )
    choice = result.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert_finish(choice.finish_reason, result.usage.completion_tokens, 4)
    assert result.usage.completion_tokens <= 4 and result.object == "chat.completion"


def test_streamed_chat_completion_with_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="gemma-test",
            messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=4,
            temperature=0,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert_finish(finishes[-1], chunks[-1].usage.completion_tokens, 4)
    assert all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 4
    assert chunks[-1].model_extra["backtrack"]["rewinds"] >= 0  # the answer's rewinds, as unstreamed


def test_raw_stream_ends_with_done(server):
    body = {"prompt": "Once upon a time", "max_tokens": 3, "stream": True, "seed": 3}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_stop_string_is_never_sent(any_client, baseline):
    text = baseline.choices[0].text
    words = text.split()
    assert len(words) >= 2, f"greedy output too short to pick a stop string from: {text!r}"
    stop = words[1][:3]  # a piece of the second word
    expected = text[: text.index(stop)]
    for stream in (False, True):
        result = any_client.completions.create(
            model="gemma-test", prompt=PROMPT, max_tokens=6, temperature=0, stop=[stop, "zzzz-never"], stream=stream
        )
        if stream:
            chunks = list(result)
            out, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            out, finish = result.choices[0].text, result.choices[0].finish_reason
        assert out == expected and stop not in out
        assert finish == "stop"


def test_banned_strings_never_in_output(any_client, baseline):
    text = baseline.choices[0].text
    word = max(text.split(), key=len).strip(".,;:!?")
    for stream in (False, True):
        result = any_client.completions.create(
            model="gemma-test",
            prompt=PROMPT,
            max_tokens=6,
            temperature=0,
            stream=stream,
            extra_body={"banned_strings": [word]},
        )
        out = "".join(c.choices[0].text for c in result) if stream else result.choices[0].text
        assert out and word.lower() not in out.lower(), (word, out)
        if not stream:
            assert result.backtrack["rewinds"] >= 1  # the greedy text had the word: it was rewound


def test_regex_only_ban(any_client, baseline):
    """banned_regex alone (no banned_strings) bans the pattern."""
    word = max(baseline.choices[0].text.split(), key=len).strip(".,;:!?")
    pattern = f"{word[:2]}[a-z]*{word[-2:]}"
    result = greedy(any_client, banned_regex=[pattern])
    assert result.choices[0].text and word not in result.choices[0].text, (pattern, result.choices[0].text)


def test_regex_the_linear_engine_cannot_run_is_a_clear_400(server):
    for pattern, feature in (("(a)\\1", "backreference"), ("x(?=y)", "lookahead")):
        error = assert_error(
            post(server, "/v1/completions", {"prompt": "hi", "banned_regex": [pattern]}), 400, "banned_regex"
        )
        assert feature in error["message"] and error["code"] == "invalid_value", error
        body = {"prompt": "hi", "strategy": {"name": "antislop", "slops": ["a"], "regexes": [pattern]}}
        assert feature in assert_error(post(server, "/v1/completions", body), 400)["message"]


def test_strategy_per_request(any_client, baseline):
    """A chain of strategies from the request: replace a word of the greedy text, then adaptive
    temperature (greedy: it keeps the most likely token)."""
    word = max(baseline.choices[0].text.split(), key=len).strip(".,;:!?")
    spec = [{"name": "replace", "find": word, "replace": " ZEBRA"}, "adaptive"]
    out = greedy(any_client, max_tokens=12, strategy=spec).choices[0].text
    assert word not in out and "ZEBRA" in out, (word, baseline.choices[0].text, out)
    creative = greedy(any_client, max_tokens=4, strategy={"name": "creative", "top_p_flat": 0.6})
    assert creative.choices[0].text and creative.usage.completion_tokens <= 4


# --- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "top_k": -2}, "top_k"),
        ({"prompt": "hi", "min_p": 2}, "min_p"),
        ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "hi", "seed": 1.5}, "seed"),
        ({"prompt": "hi", "stop": 3}, "stop"),
        ({"prompt": "hi", "n": 9}, "n"),
        ({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": "hi", "logit_bias": {"ten": 5}}, "logit_bias"),
        (
            {"prompt": "hi", "strategy": ["creative", {"name": "creative", "top_p_flat": "high"}]},
            "strategy[1].top_p_flat",
        ),
        ({"prompt": "hi", "stream": "yes"}, "stream"),
        ({"prompt": "hi", "banned_strings": [1]}, "banned_strings[0]"),
        ({"prompt": "hi", "banned_regex": "(unclosed"}, "banned_regex"),
        ({"prompt": "hi", "strategy": {"name": "nope"}}, "strategy[0].name"),
        ({"prompt": "hi", "strategy": 5}, "strategy"),
        ({"prompt": 12}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_bad_completion_requests(server, body, param):
    assert_error(post(server, "/v1/completions", body), 400, param)


def test_unknown_strategy_parameter(server):
    error = assert_error(post(server, "/v1/completions", {"prompt": "hi", "strategy": {"name": "none", "x": 1}}), 400)
    assert error["param"].startswith("strategy")


@pytest.mark.parametrize(
    "messages, param",
    [
        (None, "messages"),
        ([], "messages"),
        ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
    ],
)
def test_bad_chat_requests(server, messages, param):
    assert_error(post(server, "/v1/chat/completions", {"messages": messages}), 400, param)


def test_prompt_longer_than_the_context(server, client, engine):
    prompt = "hello " * (engine.provider.context_length + 10)
    error = assert_error(post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1}), 400, "prompt")
    assert error["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="gemma-test", messages=[{"role": "user", "content": prompt}], max_tokens=1)
    assert raised.value.status_code == 400


def test_invalid_json_and_non_object(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        response = httpx.post(server.url + "/v1/completions", content=raw, headers=headers, timeout=TIMEOUT)
        assert_error(response, 400)


def test_unknown_route_and_method(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    assert_error(httpx.get(server.url + "/v1/nothing", headers=headers, timeout=10), 404)
    assert_error(httpx.get(server.url + "/v1/completions", headers=headers, timeout=10), 405)


def test_api_key(server):
    for key in (None, "wrong"):
        response = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, key=key)
        assert assert_error(response, 401)["code"] == "invalid_api_key"
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        assert_error(httpx.get(server.url + "/v1/models", headers=headers, timeout=10), 401)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", timeout=TIMEOUT, max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_no_api_key_configured(engine):
    from starlette.testclient import TestClient

    with TestClient(create_app(engine)) as test_client:
        assert test_client.get("/v1/models").status_code == 200


# --- concurrency and disconnects -------------------------------------------------------------------
def test_two_concurrent_requests_both_succeed(client):
    results, errors = [None, None], []

    def run(i):
        try:
            results[i] = client.completions.create(
                model="gemma-test", prompt=f"Story number {i}:", max_tokens=3, seed=i
            )
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * TIMEOUT)
    assert not errors, errors
    assert all(r is not None for r in results)
    for r in results:
        assert_finish(r.choices[0].finish_reason, r.usage.completion_tokens, 3)


def test_disconnect_mid_stream_frees_the_model(server, client, engine):
    body = {
        "prompt": "Write a very long story about a dragon:",
        "max_tokens": 2000,
        "stream": True,
        "seed": 0,
        "stop": ["never-appears-0xdeadbeef"],
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=TIMEOUT) as raw:
        with raw.stream("POST", server.url + "/v1/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    break  # one chunk of text arrived; now hang up
            assert engine.busy
    started = time.monotonic()
    while engine.busy and time.monotonic() - started < 30:
        time.sleep(0.05)
    assert not engine.busy, "the generation went on after the client disconnected"
    result = client.completions.create(model="gemma-test", prompt="Hello", max_tokens=2)
    assert_finish(result.choices[0].finish_reason, result.usage.completion_tokens, 2)
    assert time.monotonic() - started < 60


def test_non_streaming_client_that_gives_up_frees_the_model(server, client, engine):
    body = {"prompt": "Write a very long story about a cat:", "max_tokens": 2000, "seed": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=1.5)
    started = time.monotonic()
    while engine.busy and time.monotonic() - started < 30:
        time.sleep(0.05)
    assert not engine.busy
    assert client.completions.create(model="gemma-test", prompt="Hi", max_tokens=1).choices


# --- hostile requests and limits -------------------------------------------------------------------
# Greedy continues " a a a ...": with Python's re, each search of the 100-character window takes
# about 2**50 steps (holding the GIL) once 50 tokens are out; on RE2 it takes linear time.
HOSTILE_REGEX = {
    "prompt": "a a a a a a a a a a a a",
    "banned_regex": ["(\\s*a\\s*)*b"],
    "banned_strings": ["zebra"],
    "temperature": 0,
    "max_tokens": 64,
}


class ServerProcess:
    """``serve()`` (default limits, the embedded model) in a child process on 127.0.0.1: a request
    that stalls it (e.g. holding the GIL) makes the test fail on its timeouts instead of hanging it."""

    CODE = (
        "import sys; from backtrack_sampler.server.app import serve; serve(port=int(sys.argv[1]), n_ctx=4096, "
        "model_name='gemma-test', log_level='warning')"
    )

    def __enter__(self):
        import os
        import subprocess
        import sys
        from pathlib import Path

        with socket.socket() as sock:  # a free port (released just before the server takes it)
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen(
            [sys.executable, "-c", self.CODE, str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, self.process.stderr.read()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait(30)
        self.process.stderr.close()


class Requests:
    """POSTs sent from threads at once, each answer kept with how long it took."""

    def __init__(self, server):
        self.server, self.threads, self.answers = server, [], {}

    def send(self, name, path, body):
        def run():
            started = time.monotonic()
            try:
                response = post(self.server, path, body)
                self.answers[name] = (response.status_code, response.json(), time.monotonic() - started)
            except Exception as error:  # reported by the test
                self.answers[name] = (None, repr(error), time.monotonic() - started)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def running(self):
        return any(thread.is_alive() for thread in self.threads)


def slowest_health_check(server, requests, deadline=4 * TIMEOUT):
    """Polls /health until every request has its answer; returns the slowest /health answer (s)."""
    slowest, started = 0.0, time.monotonic()
    with httpx.Client(timeout=10) as http:
        while requests.running():
            assert time.monotonic() - started < deadline, "the requests got no answer"
            asked = time.monotonic()
            assert http.get(server.url + "/health").status_code == 200
            slowest = max(slowest, time.monotonic() - asked)
            time.sleep(0.05)
    return slowest


def test_hostile_requests_get_prompt_answers_and_the_server_stays_responsive():
    """Issue #7: a catastrophic-backtracking regex, a 200,000-character phrase and max_tokens=10**9
    each get an answer, /health stays fast, and a normal request sent alongside completes."""
    with ServerProcess() as server:
        requests = Requests(server)
        _send_hostile_requests(requests)
        slowest = slowest_health_check(server, requests)
    _check_hostile_answers(requests.answers, slowest)


def _send_hostile_requests(requests):
    requests.send("regex", "/v1/completions", HOSTILE_REGEX)
    requests.send("phrase", "/v1/completions", {"prompt": "Hello", "banned_strings": ["x" * 200_000], "max_tokens": 4})
    requests.send(
        "phrase in a strategy",
        "/v1/completions",
        {"prompt": "Hello", "strategy": {"name": "antislop", "slops": ["x" * 200_000]}},
    )
    requests.send("max_tokens", "/v1/completions", {"prompt": "Hello", "max_tokens": 10**9})
    requests.send(
        "chat max_tokens",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 10**9},
    )
    requests.send("normal", "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0})


def _check_hostile_answers(answers, slowest):
    print(f"slowest /health: {slowest:.3f} s")
    assert slowest < 0.5, f"/health took {slowest:.2f} s"

    status, body, seconds = answers["regex"]
    assert status == 200, body
    assert_finish(body["choices"][0]["finish_reason"], body["usage"]["completion_tokens"], 64)
    assert "b" not in body["choices"][0]["text"]  # the regex ban held
    for name in ("phrase", "phrase in a strategy"):
        status, body, _ = answers[name]
        assert status == 400 and body["error"]["code"] == "string_above_max_length", (name, body)
    for name in ("max_tokens", "chat max_tokens"):
        status, body, _ = answers[name]
        assert status == 400 and body["error"]["code"] == "context_length_exceeded", (name, body)
        assert body["error"]["param"] == "max_tokens"
    status, body, _ = answers["normal"]
    assert status == 200, body
    assert_finish(body["choices"][0]["finish_reason"], body["usage"]["completion_tokens"], 4)


COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy goes on counting: thousands of tokens without an EOS


@pytest.fixture(scope="class")
def busy_model(server, engine):
    """The model busy with a long streamed generation while the tests of a class run (hung up after)."""
    body = {"prompt": COUNTING, "max_tokens": 3000, "stream": True, "temperature": 0}
    with httpx.Client(timeout=TIMEOUT) as raw:
        with raw.stream(
            "POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as response:
            assert response.status_code == 200
            lines = response.iter_lines()  # kept: an abandoned iterator closes the connection when collected
            for line in lines:
                if line.startswith("data: {"):
                    break  # generating
            assert engine.busy
            yield engine
    deadline = time.monotonic() + 30
    while engine.busy:  # the generation stops once we hung up
        assert time.monotonic() < deadline
        time.sleep(0.05)


TIGHT = Limits(
    max_body_bytes=4000,
    max_banned_strings=3,
    max_banned_string_chars=10,
    max_regexes=2,
    max_regex_chars=20,
    max_stop=2,
    max_stop_chars=5,
    max_messages=3,
    max_message_chars=50,
    max_tokens=8,
)


@pytest.fixture(scope="module")
def tight_server(engine):
    """A second server on the same model (and so the same generation lock) with small limits."""
    with ServerThread(create_app(engine, api_key=KEY, limits=TIGHT)) as running:
        yield running


USER = {"role": "user", "content": "hi"}


class TestLimitsWhileTheModelIsBusy:
    """Requests beyond a limit, sent while another request holds the model, are answered at once."""

    @pytest.mark.parametrize(
        "path, body, param, code",
        [
            (
                "completions",
                {"prompt": "hi", "banned_strings": ["a", "b", "c", "d"]},
                "banned_strings",
                "array_above_max_length",
            ),
            (
                "completions",
                {"prompt": "hi", "banned_strings": ["x" * 11]},
                "banned_strings",
                "string_above_max_length",
            ),
            (
                "completions",
                {"prompt": "hi", "strategy": {"name": "antislop", "slops": ["a", "b", "c", "d"]}},
                "strategy[0]",
                "array_above_max_length",
            ),
            (
                "completions",
                {"prompt": "hi", "strategy": {"name": "replace", "find": "x" * 11, "replace": "y"}},
                "strategy[0]",
                "string_above_max_length",
            ),
            (
                "completions",
                {"prompt": "hi", "banned_regex": ["a", "b", "c"]},
                "banned_regex",
                "array_above_max_length",
            ),
            ("completions", {"prompt": "hi", "banned_regex": ["a" * 21]}, "banned_regex", "string_above_max_length"),
            (
                "completions",
                {"prompt": "hi", "strategy": {"name": "antislop", "slops": ["a"], "regexes": ["a", "b", "c"]}},
                "strategy[0]",
                "array_above_max_length",
            ),
            ("completions", {"prompt": "hi", "stop": ["a", "b", "c"]}, "stop", "array_above_max_length"),
            ("completions", {"prompt": "hi", "stop": "abcdef"}, "stop", "string_above_max_length"),
            ("completions", {"prompt": "hi", "max_tokens": 9}, "max_tokens", "integer_above_max_value"),
            ("completions", {"prompt": "hi", "max_tokens": 10**9}, "max_tokens", "integer_above_max_value"),
            ("chat/completions", {"messages": [USER] * 4}, "messages", "array_above_max_length"),
            (
                "chat/completions",
                {"messages": [{"role": "user", "content": "x" * 51}]},
                "messages[0].content",
                "string_above_max_length",
            ),
            (
                "chat/completions",
                {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 51}]}]},
                "messages[0].content",
                "string_above_max_length",
            ),
            (
                "chat/completions",
                {"messages": [USER], "max_completion_tokens": 9},
                "max_completion_tokens",
                "integer_above_max_value",
            ),
        ],
    )
    def test_each_limit_answers_at_once_in_openais_shape(self, tight_server, busy_model, path, body, param, code):
        """While the model is busy with another request, a request beyond a limit is answered at once
        (it does not wait for the model): 400 in OpenAI's error shape naming the field."""
        error = assert_error(post(tight_server, "/v1/" + path, body), 400, param)
        assert error["code"] == code, error
        assert busy_model.busy  # answered while the other generation still runs

    def test_body_size_limit_is_413_before_the_body_is_read(self, tight_server, busy_model):
        body = {"prompt": "x" * 5000}
        error = assert_error(post(tight_server, "/v1/completions", body), 413)
        assert error["code"] == "request_too_large" and "4000" in error["message"]

        def chunks():  # no Content-Length: the limit is found while the body streams in
            yield b'{"prompt": "'
            for _ in range(100):
                yield b"x" * 100
            yield b'"}'

        response = httpx.post(
            tight_server.url + "/v1/completions",
            content=chunks(),
            timeout=TIMEOUT,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        assert assert_error(response, 413)["code"] == "request_too_large"
        assert busy_model.busy


def test_max_tokens_above_the_context_room(server, engine):
    room = engine.provider.context_length - len(engine.provider.encode("Hello", add_special_tokens=True))
    error = assert_error(
        post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": room + 1}), 400, "max_tokens"
    )
    assert error["code"] == "context_length_exceeded" and str(engine.provider.context_length) in error["message"]


def test_limits_within_the_tight_server_are_accepted(tight_server):
    body = {
        "prompt": PROMPT,
        "max_tokens": 8,
        "banned_strings": ["a" * 10, "b", "c"],
        "banned_regex": ["q+z", "zz"],
        "stop": ["abcde", "\n\n"],
        "temperature": 0,
    }
    response = post(tight_server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 8
    chat = post(tight_server, "/v1/chat/completions", {"messages": [USER] * 3, "max_tokens": 2})
    assert chat.status_code == 200, chat.text


def test_wall_clock_limit_ends_the_generation_with_length(engine):
    """max_seconds: the generation stops after that long (finish_reason "length"), streamed or not;
    max_tokens may be all the room the context leaves."""
    limit, prompt = 1.0, COUNTING
    room = engine.provider.context_length - len(engine.provider.encode(prompt, add_special_tokens=True))
    with ServerThread(create_app(engine, limits=Limits(max_seconds=limit))) as running:
        body = {"prompt": prompt, "max_tokens": room, "temperature": 0}
        started = time.monotonic()
        result = httpx.post(running.url + "/v1/completions", json=body, timeout=TIMEOUT).json()
        seconds = time.monotonic() - started
        assert result["choices"][0]["finish_reason"] == "length", result
        assert result["usage"]["completion_tokens"] < room
        assert seconds < limit + 30, seconds  # not the thousands of tokens asked for (minutes)
        with openai.OpenAI(base_url=running.url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0) as c:
            chunks = list(c.completions.create(model="m", stream=True, **body))
        assert chunks[-1].choices[0].finish_reason == "length"


def test_limits_reject_nonsense():
    with pytest.raises(ValueError):
        Limits(max_tokens=0)
    with pytest.raises(ValueError):
        Limits(max_seconds=-1)
    with pytest.raises(ValueError):
        Limits(max_body_byte=10)  # a typo is an error, not a silently ignored limit


def test_readme_limits_table_matches_the_defaults():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `--([a-z-]+)` \| (\w+)", readme, re.M))
    expected = {
        name.replace("_", "-"): "none" if field.default is None else f"{field.default:.12g}"
        for name, field in Limits.model_fields.items()
    }
    assert rows == expected


def test_serve_options_become_limits(monkeypatch):
    from backtrack_sampler import cli
    from backtrack_sampler.server import app as server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda **kwargs: seen.update(kwargs))
    assert cli.main(["serve", "--max-tokens", "64", "--max-seconds", "2.5", "--max-banned-strings", "7"]) == 0
    assert seen["limits"] == Limits(max_tokens=64, max_seconds=2.5, max_banned_strings=7)
    assert cli.main(["serve", "--max-regexes", "0"]) == 2


# --- pieces --------------------------------------------------------------------------------------
def test_the_time_limit_keeps_the_sparse_path():
    """The time limit is the scheduler's (no wrapper strategy): a request's generation runs its
    own strategy, which reads no probabilities unless it declares so."""
    import asyncio

    from backtrack_sampler.server.runner import Plan
    from backtrack_sampler.strategy.base_strategy import BaseStrategy
    from backtrack_sampler.strategy.creative_writing_strategy import CreativeWritingStrategy

    runner = Engine(FakeProvider(), parallel=1)

    async def generation_of(strategy):
        answer = runner.start(Plan(False, [2, 5], strategy, {"max_new_tokens": 3, "seed": 0}, [], 1.0))
        assert answer.job.max_seconds == 1.0
        return answer.job.generation

    try:
        for strategy, reads in ((BaseStrategy(), False), (CreativeWritingStrategy(FakeProvider()), True)):
            generation = asyncio.run(generation_of(strategy))
            assert generation.strategy is strategy and generation.strategy.capabilities.reads_probs is reads
    finally:
        runner.close()


def test_stop_filter_holds_back_partial_matches():
    stops = StopFilter(["END", "\n\n"])
    sent = []
    for piece in ["Hello E", "N", "x and\n", "\nmore"]:
        text, hit = stops.push(piece)
        sent.append(text)
        if hit:
            break
    assert "".join(sent) == "Hello ENx and" and hit
    stops = StopFilter(["abc"])
    assert stops.push("xxab") == ("xx", False)
    assert stops.flush() == "ab"


def test_chat_prompt_formats():
    from backtrack_sampler.provider.chat import _gemma_prompt, chat_prompt_tokens

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    assert _gemma_prompt(messages) == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )

    class Tokenizer:  # a transformers-like tokenizer with its own template
        chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        bos_token = "<s>"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "<s>" + "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"

    class Provider:
        tokenizer = Tokenizer()

        def encode(self, text, add_special_tokens=True):
            return [ord(c) for c in ("^" if add_special_tokens else "") + text]

    tokens = chat_prompt_tokens(Provider(), [{"role": "user", "content": "x"}])
    assert "".join(map(chr, tokens)) == "<s>[user]x[assistant]"


def test_chat_template_from_gguf_metadata(llama_provider, monkeypatch):
    from backtrack_sampler.provider.chat import chat_prompt_tokens

    template = (
        "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    monkeypatch.setitem(llama_provider.llm.metadata, "tokenizer.chat_template", template)
    tokens = chat_prompt_tokens(llama_provider, [{"role": "user", "content": "Hi"}])
    assert tokens[0] == llama_provider.llm.token_bos() and tokens[1] != tokens[0]  # one BOS, from the template
    assert llama_provider.decode(tokens) == "<user>Hi\n<assistant>"
