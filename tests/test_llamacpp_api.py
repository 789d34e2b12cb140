"""llama-server's native API on the server (fake model): SillyTavern's exact "llama.cpp" bodies
replayed against ``POST /completion`` (streamed and not, with token bans as ``logit_bias`` false,
quoted banned strings, token probabilities), llama.cpp's fields and shapes, ``/props`` and
``/slots``; and the warning for token-id bans made with another tokenizer (``backtrack.warnings``)."""

from __future__ import annotations

import json

import httpx
import pytest
from serving import ServerThread
from st_bodies import textgen_body

from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.server.app import Engine, create_app
from backtrack_sampler.server.ban_check import ban_warnings
from backtrack_sampler.server.schemas import CompletionRequest

KEY = "llama-key"
PROVIDER = FakeProvider()
IDS = PROVIDER.ids
CHAT = " the cat sat on the mat and ran away quickly." * 6  # a chat history of 270 characters


@pytest.fixture(scope="module")
def server():
    with ServerThread(create_app(Engine(FakeProvider(), "fake-model", parallel=2), api_key=KEY)) as running:
        yield running


def call(server, method, path, body=None, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.url + path, json=body, headers=headers, timeout=60)


def events(response):
    """The ``data:`` objects of a llama-server stream (it sends no ``[DONE]``)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [block for block in response.text.split("\n\n") if block]
    assert all(block.startswith("data: {") for block in blocks), blocks
    return [json.loads(block[6:]) for block in blocks]


def st_body(stream=True, probabilities=False, **settings):
    """SillyTavern's "llama.cpp" body, seed fixed so that streamed and whole answers compare."""
    return textgen_body(
        "llamacpp", " the cat", 16, ["\nUser:"], stream=stream, probabilities=probabilities, seed=7, **settings
    )


def test_sillytavern_llamacpp_body_streams_with_its_bans(server):
    """The exact body (token bans as logit_bias [id, false] and custom_token_bans, quoted strings as
    banned_strings, cache_prompt, samplers ...) streams llama-server's events; whole or streamed,
    the same text, without the banned token or string."""
    body = st_body(banned_tokens=f"{IDS[' dog']},{IDS[' rug']}", banned_strings=[" mat"])
    assert [IDS[" dog"], False] in body["logit_bias"] and body["cache_prompt"] is True
    chunks = events(call(server, "POST", "/completion", body))
    *parts, last = chunks
    assert parts and all(c["stop"] is False and c["content"] and c["tokens"] for c in parts)
    assert [c["tokens_predicted"] for c in parts] == list(range(1, len(parts) + 1)) or all(
        a["tokens_predicted"] < b["tokens_predicted"] for a, b in zip(parts, parts[1:])
    )
    text = "".join(c["content"] for c in parts)
    assert " dog" not in text and " rug" not in text and " mat" not in text
    assert "".join(PROVIDER.decode([t]) for c in parts for t in c["tokens"]) == text
    assert last["stop"] is True and last["content"] == "" and last["tokens"] == []
    assert last["stop_type"] in ("eos", "limit", "word") and last["tokens_predicted"] == sum(
        len(c["tokens"]) for c in parts
    )
    assert last["tokens_evaluated"] == len(PROVIDER.encode(" the cat"))
    assert last["generation_settings"]["temperature"] == 0.7 and last["generation_settings"]["n_predict"] == 16
    assert set(last["timings"]) >= {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "predicted_per_second"}
    assert last["timings"]["predicted_n"] == last["tokens_predicted"]
    whole = call(
        server,
        "POST",
        "/completion",
        st_body(stream=False, banned_tokens=f"{IDS[' dog']},{IDS[' rug']}", banned_strings=[" mat"]),
    )
    assert whole.status_code == 200, whole.text
    answer = whole.json()
    assert answer["content"] == text and answer["stop"] is True and answer["tokens"] == []  # return_tokens off
    assert answer["model"] == "fake-model" and answer["backtrack"]["rewinds"] >= 0


def test_sillytavern_llamacpp_token_probabilities(server):
    """ST's "Request token probabilities" (n_probs 10): every streamed piece carries its tokens'
    entries, with llama.cpp's fields and the older content/probs ST 1.12 reads
    (``logprobs[0].probs.map(x => [x.tok_str, x.prob])``); whole: one entry per token."""
    parts = events(call(server, "POST", "/completion", st_body(probabilities=True)))[:-1]
    for chunk in parts:
        entries = chunk["completion_probabilities"]
        assert [e["id"] for e in entries] == chunk["tokens"] and "".join(e["content"] for e in entries) == chunk[
            "content"
        ]
        for entry in entries:
            assert entry["token"] == entry["content"] and entry["bytes"] == list(entry["token"].encode())
            assert entry["logprob"] <= 0 and 0 < len(entry["top_logprobs"]) <= 10
            assert [p["tok_str"] for p in entry["probs"]] == [t["token"] for t in entry["top_logprobs"]]
            assert all(0 <= p["prob"] <= 1 for p in entry["probs"])
    whole = call(server, "POST", "/completion", st_body(stream=False, probabilities=True)).json()
    entries = whole["completion_probabilities"]
    assert len(entries) == whole["tokens_predicted"] and "".join(e["content"] for e in entries) == whole["content"]
    post = call(
        server, "POST", "/completion", {"prompt": " the cat", "n_predict": 3, "n_probs": 2, "post_sampling_probs": True}
    ).json()
    assert all(
        0 < e["prob"] <= 1 and len(e["top_probs"]) == 2 and "logprob" not in e for e in post["completion_probabilities"]
    )


def test_sillytavern_llamacpp_status_and_tokenizer(server):
    """ST's status check for the "llama.cpp" type (GET /v1/models) and its tokenizer (/tokenize {content})."""
    assert [m["id"] for m in call(server, "GET", "/v1/models").json()["data"]] == ["fake-model"]
    assert call(server, "POST", "/tokenize", {"content": " the cat"}).json() == {"tokens": [IDS[" the"], IDS[" cat"]]}


def test_completion_fields_as_llama_cpp_reads_them(server):
    ids = PROVIDER.encode(" the cat")
    limited = call(
        server,
        "POST",
        "/completion",
        {"prompt": ids, "n_predict": 5, "return_tokens": True, "temperature": 0, "ignore_eos": True},
    ).json()
    assert limited["tokens_predicted"] == 5 and limited["stop_type"] == "limit" and len(limited["tokens"]) == 5
    assert PROVIDER.decode(limited["tokens"]) == limited["content"] and limited["stopping_word"] == ""
    word = limited["content"].split()[1]  # a word it writes greedily: a stop string
    stopped = call(
        server,
        "POST",
        "/completion",
        {"prompt": ids, "n_predict": 5, "temperature": 0, "ignore_eos": True, "stop": [word]},
    ).json()
    assert stopped["stop_type"] == "word" and stopped["stopping_word"] == word and word not in stopped["content"]
    assert stopped["content"] == limited["content"][: limited["content"].index(word)]
    for bad, param in (
        ({"n_probs": 21}, "n_probs"),
        ({"id_slot": 2}, "id_slot"),
        ({"n_cmpl": 2}, "n_cmpl"),
        ({"prompt": ""}, "prompt"),
    ):
        response = call(server, "POST", "/completion", {"prompt": " the", "n_predict": 2, **bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert call(server, "POST", "/completion", {"prompt": " the", "n_predict": 2, "id_slot": 1}).status_code == 200
    assert call(server, "POST", "/completion", {"prompt": " the"}, key=None).status_code == 401


def test_repeat_last_n_zero_turns_the_penalty_off():
    """llama.cpp's 0: no repetition penalty (ST sends repeat_last_n 0 with rep_pen 1.2 by default)."""
    from backtrack_sampler.server.llamacpp_api import LlamaCompletionRequest

    body = LlamaCompletionRequest.model_validate({"prompt": "x", "repeat_penalty": 1.2, "repeat_last_n": 0})
    assert body.samplers() == []
    on = LlamaCompletionRequest.model_validate({"prompt": "x", "repeat_penalty": 1.2})
    assert [(name, params["last_n"]) for name, params, _ in on.samplers()] == [("penalties", 64)]


def test_props_and_slots(server):
    props = call(server, "GET", "/props").json()
    settings = props["default_generation_settings"]
    assert props["total_slots"] == 2 and settings["n_ctx"] == 4096 and props["model_alias"] == "fake-model"
    assert settings["params"]["temperature"] == 0.8 and settings["params"]["top_k"] == 40
    assert props["modalities"] == {"vision": False, "audio": False} and "build_info" in props
    slots = call(server, "GET", "/slots").json()
    assert [s["id"] for s in slots] == [0, 1] and not any(s["is_processing"] for s in slots)
    assert slots[0]["n_ctx"] == 4096 and "n_decoded" in slots[0]["next_token"]
    assert call(server, "GET", "/slots?fail_on_no_slot=1").status_code == 200
    assert call(server, "GET", "/props", key=None).status_code == 401


# --- token-id bans made with another tokenizer ----------------------------------------------------
def warnings_of(ids, prompt=CHAT):
    request = CompletionRequest.model_validate({"prompt": prompt, "custom_token_bans": ids})
    return ban_warnings(PROVIDER, request, PROVIDER.encode(prompt))


def test_token_bans_from_another_tokenizer_are_reported(server):
    """Ids that read " tapestry", " night" here, nowhere in the chat: made for other words."""
    ids = [IDS[" tapestry"], IDS[" night"]]
    (warning,) = warnings_of(ids)
    assert "' tapestry'" in warning and "' night'" in warning and "double quotes" in warning
    body = {"prompt": CHAT, "max_tokens": 3, "logit_bias": [[i, False] for i in ids]}
    assert call(server, "POST", "/v1/completions", body).json()["backtrack"]["warnings"] == [warning]
    chunks = [
        json.loads(line[6:])
        for line in call(server, "POST", "/v1/completions", dict(body, stream=True)).text.splitlines()
        if line.startswith("data: {")
    ]
    assert chunks[-1]["backtrack"]["warnings"] == [warning]
    native = call(
        server, "POST", "/completion", {"prompt": CHAT, "n_predict": 3, "logit_bias": [[i, False] for i in ids]}
    )
    assert native.json()["backtrack"]["warnings"] == [warning]


def test_token_bans_made_with_this_tokenizer_are_not_reported(server):
    """Ids of words of the chat (this model's tokenizer): never a warning, whatever else is banned;
    nor when there is too little to judge (one word, a short prompt, ids that read as no word)."""
    assert warnings_of([IDS[" cat"], IDS[" quickly"]]) == []
    assert warnings_of([IDS[" tapestry"], IDS[" night"], IDS[" away"]]) == []  # one of them is in the chat
    assert warnings_of(PROVIDER.encode(" Quickly")) == []  # any case
    assert warnings_of([IDS[" tapestry"]]) == []  # one id
    assert warnings_of([IDS[" tapestry"], IDS[" night"]], prompt=" the cat sat") == []  # a short prompt
    assert warnings_of([IDS["a"], IDS[","], IDS[" a"]]) == []  # no word
    body = {"prompt": CHAT, "max_tokens": 3, "logit_bias": [[IDS[" cat"], False], [IDS[" mat"], False]]}
    assert "warnings" not in call(server, "POST", "/v1/completions", body).json()["backtrack"]
