"""The OpenAI-compatible server, driven by the official ``openai`` client (and httpx for raw
checks) against a uvicorn server on 127.0.0.1 (ephemeral port) running the embedded model."""

from __future__ import annotations

import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from backtrack_sampler.server import Engine, StopFilter, create_app  # noqa: E402

pytestmark = pytest.mark.model
KEY = "test-key"
TIMEOUT = 120  # seconds, per request: the shared CI machine can be slow


class ServerThread:
    """uvicorn in a daemon thread on an ephemeral 127.0.0.1 port."""

    def __init__(self, app):
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


@pytest.fixture(scope="module")
def engine(llama_provider):
    return Engine(llama_provider, "gemma-test")


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, api_key=KEY)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0) as c:
        yield c


def post(server, path, body=None, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
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
    return client.completions.create(model="gemma-test", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                      extra_body=extra or None)


@pytest.fixture(scope="module")
def baseline(client):
    """The greedy completion of PROMPT (6 tokens), computed once."""
    return greedy(client)


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
    assert choice.finish_reason in ("stop", "length")
    assert result.usage.prompt_tokens > 0 and 0 < result.usage.completion_tokens <= 6
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.object == "text_completion" and result.model == "gemma-test"


def test_streamed_completion_matches_the_plain_one(client, baseline):
    plain = baseline.choices[0]
    chunks = list(client.completions.create(model="gemma-test", prompt=PROMPT, max_tokens=6,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.text
    assert chunks[-1].choices[0].finish_reason == plain.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_completion(client):
    result = client.chat.completions.create(
        model="gemma-test", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        max_tokens=4, temperature=0,
    )
    choice = result.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert result.usage.completion_tokens <= 4 and result.object == "chat.completion"


def test_streamed_chat_completion_with_usage(client):
    chunks = list(client.chat.completions.create(
        model="gemma-test", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=4,
        temperature=0, seed=1, stream=True, stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 4


def test_raw_stream_ends_with_done(server):
    body = {"prompt": "Once upon a time", "max_tokens": 3, "stream": True, "seed": 3}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=TIMEOUT) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_stop_string_is_never_sent(client, baseline):
    text = baseline.choices[0].text
    words = text.split()
    if len(words) < 2:
        pytest.skip(f"greedy output too short to pick a stop string from: {text!r}")
    stop = words[1][:3]  # a piece of the second word
    expected = text[: text.index(stop)]
    for stream in (False, True):
        result = client.completions.create(model="gemma-test", prompt=PROMPT, max_tokens=6,
                                           temperature=0, stop=[stop, "zzzz-never"], stream=stream)
        if stream:
            chunks = list(result)
            out, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            out, finish = result.choices[0].text, result.choices[0].finish_reason
        assert out == expected and stop not in out
        assert finish == "stop"


def test_banned_strings_never_in_output(client, baseline):
    text = baseline.choices[0].text
    word = max(text.split(), key=len).strip(".,;:!?")
    for stream in (False, True):
        result = client.completions.create(model="gemma-test", prompt=PROMPT, max_tokens=6,
                                           temperature=0, stream=stream, extra_body={"banned_strings": [word]})
        out = "".join(c.choices[0].text for c in result) if stream else result.choices[0].text
        assert word.lower() not in out.lower(), (word, out)


def test_strategy_per_request(client):
    result = greedy(client, max_tokens=4, strategy={"name": "creative", "top_p_flat": 0.6})
    assert result.choices[0].finish_reason in ("stop", "length")


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
        ({"prompt": "hi", "n": 2}, "n"),
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
    [(None, "messages"), ([], "messages"), ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
     ([{"role": "user", "content": 5}], "messages[0].content"),
     ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content")],
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
            results[i] = client.completions.create(model="gemma-test", prompt=f"Story number {i}:", max_tokens=3, seed=i)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * TIMEOUT)
    assert not errors, errors
    assert all(r is not None and r.choices[0].finish_reason in ("stop", "length") for r in results)


def test_disconnect_mid_stream_frees_the_model(server, client, engine):
    body = {"prompt": "Write a very long story about a dragon:", "max_tokens": 2000, "stream": True, "seed": 0,
            "stop": ["never-appears-0xdeadbeef"]}
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
    assert result.choices[0].finish_reason in ("stop", "length")
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


# --- pieces --------------------------------------------------------------------------------------
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
    from backtrack_sampler.chat import _gemma_prompt, chat_prompt_tokens

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
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
    from backtrack_sampler.chat import chat_prompt_tokens

    template = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}" \
               "{% if add_generation_prompt %}<assistant>{% endif %}"
    monkeypatch.setitem(llama_provider.llm.metadata, "tokenizer.chat_template", template)
    tokens = chat_prompt_tokens(llama_provider, [{"role": "user", "content": "Hi"}])
    assert tokens[0] == llama_provider.llm.token_bos() and tokens[1] != tokens[0]  # one BOS, from the template
    assert llama_provider.decode(tokens) == "<user>Hi\n<assistant>"
