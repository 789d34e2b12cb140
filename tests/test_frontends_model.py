"""The frontends' requests against the real server (embedded Gemma 3 270M, llama.cpp): SillyTavern's
exact "tabby" body streamed with banned_strings and custom_token_bans honoured, its status and
tokenize calls, a KoboldAI stream with banned_tokens phrases, and the samplers' effect."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from serving import ServerThread
from st_bodies import kobold_body, textgen_body

from backtrack_sampler.server.app import Engine, Limits, create_app

pytestmark = pytest.mark.model
KEY = "st-key"
TIMEOUT = 300
PROMPT = "Once upon a time, in a small village by the sea, there lived"


@pytest.fixture(scope="module")
def server(llama_provider):
    engine = Engine(llama_provider, "gemma-test")
    with ServerThread(create_app(engine, api_key=KEY, limits=Limits(max_token_ids=300_000))) as running:
        yield running


def post(server, path, body, key=KEY):
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT)


def sse_text(response) -> str:
    assert response.status_code == 200, response.text
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return "".join(json.loads(line)["choices"][0]["text"] for line in lines[:-1])


def a_word(text: str) -> str:
    """A word of ``text`` (the first of four letters or more): a phrase to ban that it contains."""
    words = re.findall(r"[A-Za-z]{4,}", text)
    assert words, text
    return words[0]


def tabby(server, max_tokens=40, **settings):
    body = textgen_body("tabby", PROMPT, max_tokens, ["\n\n"], **settings)
    return sse_text(post(server, "/v1/completions", body))


def test_sillytavern_status_and_tokenizer_calls(server):
    """What ST's "tabby" type calls besides generation: /v1/model/list, /v1/model, /v1/token/encode."""
    models = httpx.get(server.url + "/v1/model/list", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["gemma-test"]
    card = httpx.get(server.url + "/v1/model", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert card["id"] == "gemma-test"
    encoded = post(server, "/v1/token/encode", {"text": PROMPT}).json()
    assert encoded["length"] == len(encoded["tokens"]) > 5
    assert post(server, "/v1/token/decode", {"tokens": encoded["tokens"]}).json()["text"].endswith(PROMPT)


def test_sillytavern_tabby_body_honours_banned_strings_and_token_bans(server, llama_provider):
    """ST's exact body (seed -1, every field it sends) streams; a phrase the unbanned text has is
    avoided (banned_strings), and with every token containing "e" banned by id (custom_token_bans as
    ST sends it, a comma-separated string) the text has no "e" at all."""
    baseline = tabby(server, temp=0)  # ST's temperature 0 is greedy: the same text every time
    assert baseline == tabby(server, temp=0)
    phrase = a_word(baseline)
    banned = tabby(server, temp=0, banned_strings=[phrase])
    assert phrase.lower() not in banned.lower() and banned
    with_e = [t for t in range(llama_provider.vocab_size) if "e" in llama_provider.decode([t]).lower()]
    no_e = tabby(server, banned_tokens=",".join(map(str, with_e)), seed=7)
    assert no_e and "e" not in no_e.lower(), no_e
    assert "e" in baseline


def test_kobold_stream_with_banned_tokens(server):
    """The KoboldAI stream: events of {"token"}, bans (KoboldCpp's banned_tokens phrases) and stop strings."""

    def stream(**extra):
        body = kobold_body(PROMPT, 40, ["\n\n"], temperature=0, **extra)
        response = post(server, "/api/extra/generate/stream", body)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(block.split("data: ", 1)[1]) for block in response.text.split("\n\n") if block]
        assert events[-1]["token"] == "" and events[-1]["finish_reason"] in ("stop", "length")
        return "".join(event["token"] for event in events)

    baseline = stream()
    plain = post(server, "/api/v1/generate", kobold_body(PROMPT, 40, ["\n\n"], temperature=0)).json()
    assert plain["results"][0]["text"] == baseline
    phrase = a_word(baseline)
    banned = stream(banned_tokens=[phrase])
    assert banned and phrase.lower() not in banned.lower()
    count = post(server, "/api/extra/tokencount", {"prompt": baseline}).json()
    assert count["value"] == len(count["ids"]) > 0


def greedy(server, prompt, **extra):
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, **extra}
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


LOOP = "red blue green, red blue green, red blue green, red blue green,"


def test_repetition_penalty_dry_and_logit_bias_change_the_output(server, llama_provider):
    """On a prompt the model just repeats: rep_pen and DRY break the loop; logit_bias +100 forces a token."""
    loop = greedy(server, LOOP)
    assert loop.startswith(" red blue green")  # greedy continues the pattern
    for extra in (
        {"rep_pen": 2.0, "rep_pen_range": 64},
        {"dry_multiplier": 2.0, "dry_base": 1.75, "dry_allowed_length": 2, "dry_sequence_breakers": "[]"},
    ):
        broken = greedy(server, LOOP, **extra)
        assert not broken.startswith(" red"), (extra, broken)  # the token that continues the loop is penalized
    banana = llama_provider.encode(" banana", add_special_tokens=False)
    assert len(banana) == 1
    forced = greedy(server, "The capital of France is", logit_bias={str(banana[0]): 100}, max_tokens=5)
    assert forced == " banana" * 5


def test_penalties_with_rewinds(server):
    """A penalty and a ban that rewinds, together on the real model: the phrase is avoided and the
    request succeeds (the exact penalty after a rewind is checked on the fake model)."""
    penalized = greedy(server, LOOP, rep_pen=1.3)
    phrase = a_word(penalized)
    both = greedy(server, LOOP, rep_pen=1.3, banned_strings=[phrase])
    assert phrase.lower() not in both.lower() and both != penalized


def test_sillytavern_token_probabilities(server):
    """ST's "Request token probabilities" adds logprobs: 10; every streamed chunk then carries the
    final tokens' top candidates (ST reads top_logprobs[0]), and chat reports them in its shape."""
    body = dict(textgen_body("tabby", PROMPT, 12, ["\n\n"], temp=0), logprobs=10)
    response = post(server, "/v1/completions", body)
    chunks = [json.loads(line[6:])["choices"][0] for line in response.text.splitlines() if line.startswith("data: {")]
    with_text = [c for c in chunks if c["text"] and c["logprobs"]]  # (held-back text comes without)
    assert with_text and all(len(c["logprobs"]["top_logprobs"][0]) == 10 for c in with_text)
    reported = "".join(t for c in chunks if c["logprobs"] for t in c["logprobs"]["tokens"])
    assert reported == "".join(c["text"] for c in chunks)
    for c in with_text:  # greedy: the token taken is the likeliest
        top = c["logprobs"]["top_logprobs"][0]
        assert max(top.values()) == pytest.approx(c["logprobs"]["token_logprobs"][0])
    chat = post(
        server,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 5,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
        },
    ).json()["choices"][0]
    content = chat["logprobs"]["content"]
    assert "".join(item["token"] for item in content) == chat["message"]["content"]
    assert all(len(item["top_logprobs"]) == 2 and item["logprob"] <= 0 for item in content)


def test_xtc_and_typical_change_greedy_text(server):
    """XTC at probability 1 removes the likeliest choices wherever two or more reach the threshold,
    so greedy text changes; typical-p with a small mass keeps the tokens nearest the entropy."""
    plain = greedy(server, PROMPT)
    assert greedy(server, PROMPT, xtc_probability=1.0, xtc_threshold=0.05) != plain
    assert greedy(server, PROMPT, typical_p=0.2) != plain


# --- against llama.cpp's own compiled samplers, on the real model's logits and vocabulary ------------
def _llama_cpp(sampler, logits, accepted):
    """Apply one of llama.cpp's samplers (after accepting ``accepted``) to ``logits``; returns the
    logits of the tokens it kept (-inf for the others)."""
    import ctypes

    import llama_cpp
    import numpy as np

    for token in accepted:
        llama_cpp.llama_sampler_accept(sampler, token)
    data = np.zeros(len(logits), dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
    data["id"], data["logit"] = np.arange(len(logits)), logits
    base = data.ctypes.data
    array = llama_cpp.llama_token_data_array(
        data=data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
        size=len(logits),
        selected=-1,
        sorted=False,
    )
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
    start = (ctypes.cast(array.data, ctypes.c_void_p).value - base) // data.itemsize  # XTC moves the start
    kept = data[start : start + array.size]
    llama_cpp.llama_sampler_free(sampler)
    out = np.full(len(logits), -np.inf, dtype=np.float32)
    out[kept["id"]] = kept["logit"]
    return out


REPEATS = 'She said: "The cat sat on the mat." He said: "The cat sat on the mat." She said: "The cat sat on the'


def test_samplers_match_llama_cpps_compiled_samplers(llama_provider, llm):
    """PenaltyStrategy, DryStrategy (with the real vocabulary's breakers "\\n", ":", '"', "*"),
    XtcStrategy and TypicalStrategy give the logits llama.cpp's own samplers give (called through
    llama-cpp-python), on the model's logits after a repetitive text, at several cut points."""
    import ctypes

    import llama_cpp
    import numpy as np

    from backtrack_sampler.strategy.dry_strategy import DryStrategy
    from backtrack_sampler.strategy.penalty_strategy import PenaltyStrategy
    from backtrack_sampler.strategy.typical_strategy import TypicalStrategy
    from backtrack_sampler.strategy.xtc_strategy import XtcStrategy

    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    breakers = [b"\n", b":", b'"', b"*"]
    tokens = llama_provider.encode(REPEATS)
    changed = 0
    for cut in (len(tokens) - 9, len(tokens) - 4, len(tokens)):
        sequence, prompt = tokens[:cut], tokens[:6]
        logits = llama_provider.next_logits(sequence).astype(np.float32)
        n = len(logits)
        reference = _llama_cpp(llama_cpp.llama_sampler_init_penalties(n, 48, 1.3, 0.2, 0.1), logits, sequence)
        ours = PenaltyStrategy(
            llama_provider, repeat_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.1, last_n=48, context=prompt
        ).on_logits(logits.copy(), sequence[6:])
        assert np.allclose(ours, reference, atol=1e-5) and (reference != logits).any()
        dry = llama_cpp.llama_sampler_init_dry(vocab, 0.8, 1.75, 2, 64, (ctypes.c_char_p * 4)(*breakers), 4)
        reference = _llama_cpp(dry, logits, sequence)
        ours = DryStrategy(
            llama_provider, multiplier=0.8, base=1.75, allowed_length=2, last_n=64, context=prompt
        ).on_logits(logits.copy(), sequence[6:])
        assert np.allclose(ours, reference, atol=1e-5)
        changed += int((reference != logits).sum())
        for threshold in (0.05, 0.2):  # probability 1: no random draw decides
            reference = _llama_cpp(llama_cpp.llama_sampler_init_xtc(1.0, threshold, 1, 0), logits, [])
            ours = XtcStrategy(probability=1.0, threshold=threshold).on_logits(logits.copy(), [])
            assert np.array_equal(np.isfinite(ours), np.isfinite(reference))
        reference = _llama_cpp(llama_cpp.llama_sampler_init_typical(0.5, 1), logits, [])
        ours = TypicalStrategy(p=0.5).on_logits(logits.copy(), [])
        assert np.array_equal(np.isfinite(ours), np.isfinite(reference))
    assert changed  # DRY penalized something at these repeats


def llamacpp(server, max_tokens=40, **settings):
    """ST's "llama.cpp" type: its body posted to llama-server's /completion, streamed; the text."""
    response = post(server, "/completion", textgen_body("llamacpp", PROMPT, max_tokens, ["\n\n"], **settings))
    assert response.status_code == 200, response.text
    chunks = [json.loads(block[6:]) for block in response.text.split("\n\n") if block]
    assert chunks[-1]["stop"] is True and all(c["stop"] is False for c in chunks[:-1])
    return "".join(c["content"] for c in chunks), chunks


def test_sillytavern_llamacpp_type_end_to_end(server, llama_provider):
    """ST's "llama.cpp" type on the real model: greedy is repeatable, a quoted phrase (banned_strings)
    is avoided, token bans come as logit_bias [id, false], and token probabilities come as ST reads
    them (``completion_probabilities[0].probs[].tok_str/prob``; greedy: the first is the token taken)."""
    baseline, _ = llamacpp(server, temp=0)
    assert baseline and baseline == llamacpp(server, temp=0)[0]
    phrase = a_word(baseline)
    banned, _ = llamacpp(server, temp=0, banned_strings=[phrase])
    assert banned and phrase.lower() not in banned.lower()
    with_e = [t for t in range(llama_provider.vocab_size) if "e" in llama_provider.decode([t]).lower()]
    no_e, _ = llamacpp(server, banned_tokens=",".join(map(str, with_e)), seed=7)
    assert no_e and "e" not in no_e.lower(), no_e
    text, chunks = llamacpp(server, 12, temp=0, probabilities=True)
    entries = [e for c in chunks[:-1] for e in c["completion_probabilities"]]
    assert entries and "".join(e["content"] for e in entries) == text
    assert all(e["probs"][0]["tok_str"] == e["content"] and len(e["probs"]) == 10 for e in entries)
