"""The frontends' language: SillyTavern / KoboldCpp / TabbyAPI / llama.cpp request fields and
routes, and the samplers they send, as strategies (fake model; the real-model tests are in
test_frontends_model.py)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest
from serving import ServerThread
from st_bodies import kobold_body, textgen_body

from backtrack_sampler import BacktrackSampler
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.server.app import Engine, build_strategy, create_app
from backtrack_sampler.server.frontends import KoboldRequest
from backtrack_sampler.server.schemas import APIError, CompletionRequest, Limits, parse_request
from backtrack_sampler.strategy.base_strategy import BaseStrategy
from backtrack_sampler.strategy.chain_strategy import ChainStrategy
from backtrack_sampler.strategy.dry_strategy import DryStrategy
from backtrack_sampler.strategy.logit_bias_strategy import LogitBiasStrategy
from backtrack_sampler.strategy.penalty_strategy import PenaltyStrategy
from backtrack_sampler.strategy.typical_strategy import TypicalStrategy
from backtrack_sampler.strategy.xtc_strategy import XtcStrategy


def softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    out = np.zeros_like(logits)
    finite = np.isfinite(logits)
    weights = np.exp(logits[finite] - logits[finite].max())
    out[finite] = weights / weights.sum()
    return out


def applied(strategy, probs, tokens=()):
    return strategy.on_logits(np.log(np.asarray(probs, dtype=np.float32)), list(tokens))


# --- the samplers against llama.cpp's own test vectors (tests/test-sampling.cpp) -----------------
@pytest.mark.parametrize(
    "probs, last, expected, repeat, freq, presence",
    [
        ([0.2] * 5, [0], [0, 0.25, 0.25, 0.25, 0.25], 50.0, 0.0, 0.0),
        ([0.2] * 5, [0, 1, 2], [0, 0, 0, 0.5, 0.5], 50.0, 0.0, 0.0),
        ([0.2] * 5, [0, 1, 2, 0, 0], [0, 0, 0, 0.5, 0.5], 50.0, 0.0, 0.0),
        ([0.2] * 5, [0], [0.000011, 0.249997, 0.249997, 0.249997, 0.249997], 1.0, 5.0, 5.0),
        ([0.2] * 5, [0, 1, 2], [0.000023, 0.000023, 0.000023, 0.499966, 0.499966], 1.0, 5.0, 5.0),
        ([0.2] * 5, [0, 1, 2, 0, 0], [0.000000, 0.000023, 0.000023, 0.499977, 0.499977], 1.0, 5.0, 5.0),
    ],
)
def test_penalties_match_llama_cpp(probs, last, expected, repeat, freq, presence):
    strategy = PenaltyStrategy(
        repeat_penalty=repeat, frequency_penalty=freq, presence_penalty=presence, last_n=len(last)
    )
    assert np.allclose(softmax(applied(strategy, probs, last)), expected, atol=1e-5)


def test_penalties_count_the_context_window():
    """The window is the last last_n tokens of context + continuation: token 0 (only in the
    context, 3 back) counts with last_n=3 and not with last_n=2."""
    probs = [0.2] * 5
    near = PenaltyStrategy(repeat_penalty=50.0, last_n=3, context=[0, 4])
    far = PenaltyStrategy(repeat_penalty=50.0, last_n=2, context=[0, 4])
    assert softmax(applied(near, probs, [1]))[0] < 1e-5
    assert softmax(applied(far, probs, [1]))[0] == pytest.approx(1 / 3, abs=1e-5)


class _Text:
    """A provider stand-in whose token 3 reads ":" (a DRY sequence breaker), every other one "x"."""

    context_length = 100

    def decode(self, tokens):
        return ":" if list(tokens) == [3] else "x"


@pytest.mark.parametrize(
    "probs, last, expected, multiplier, base, allowed, last_n, breakers",
    [
        ([0.25] * 4, [0, 1], [0.25] * 4, 1.0, 1.1, 2, 4, []),
        ([0.25] * 4, [0, 1, 2, 0, 1], [0.296923, 0.296923, 0.109232, 0.296923], 1.0, 1.1, 2, 5, []),
        ([0.2] * 5, [0, 1, 3, 4, 0, 1], [0.2] * 5, 1.0, 1.1, 2, 6, [":"]),
        ([0.2] * 5, [0, 1, 2, 0, 1], [0.241818, 0.241818, 0.032727, 0.241818, 0.241818], 2.0, 1.1, 2, 5, []),
        ([0.2] * 5, [0, 1, 2, 3, 4, 0, 1], [0.2] * 5, 1.0, 1.1, 4, 7, []),
    ],
)
def test_dry_matches_llama_cpp(probs, last, expected, multiplier, base, allowed, last_n, breakers):
    strategy = DryStrategy(
        _Text(),
        multiplier=multiplier,
        base=base,
        allowed_length=allowed,
        last_n=last_n,
        sequence_breakers=breakers or ["never"],
    )
    assert np.allclose(softmax(applied(strategy, probs, last)), expected, atol=1e-5)


def test_dry_penalty_grows_with_the_repeat_and_spares_breakers():
    """A longer repeat is penalized more (base ** (length - allowed)); a breaker token is never penalized."""
    strategy = DryStrategy(_Text(), multiplier=1.0, base=2.0, allowed_length=1, sequence_breakers=[":"])
    logits = applied(strategy, [0.2] * 5, [0, 1, 2, 4, 0, 1, 2])  # "0 1 2" repeats: 4 followed it (length 3)
    assert logits[4] == pytest.approx(np.log(0.2) - 1.0 * 2.0**2, abs=1e-5)
    assert logits[3] == pytest.approx(np.log(0.2))
    breaker = applied(strategy, [0.2] * 5, [0, 3, 2, 0])  # 3 followed "0" but is a breaker
    assert breaker[3] == pytest.approx(np.log(0.2))


@pytest.mark.parametrize(
    "probs, threshold, survivors",
    [
        ([0.4, 0.3, 0.2, 0.1], 0.09, [3]),
        ([0.4, 0.3, 0.2, 0.1], 0.19, [2, 3]),
        ([0.4, 0.3, 0.2, 0.1], 0.29, [1, 2, 3]),
        ([0.4, 0.3, 0.2, 0.1], 0.39, [0, 1, 2, 3]),  # only one token above: nothing removed
    ],
)
def test_xtc_matches_llama_cpp(probs, threshold, survivors):
    logits = applied(XtcStrategy(probability=1.0, threshold=threshold, seed=0), probs)
    assert list(np.flatnonzero(np.isfinite(logits))) == survivors


def test_xtc_probability_is_the_chance_per_step():
    strategy = XtcStrategy(probability=0.3, threshold=0.1, seed=7)
    removed = sum(not np.isfinite(applied(strategy, [0.4, 0.3, 0.2, 0.1])[0]) for _ in range(2000))
    assert 0.25 < removed / 2000 < 0.35


@pytest.mark.parametrize(
    "probs, p, survivors",
    [
        ([0.97, 0.01, 0.01, 0.01], 0.5, [0]),
        ([0.4, 0.2, 0.2, 0.2], 0.5, [1, 2, 3]),
    ],
)
def test_typical_matches_llama_cpp(probs, p, survivors):
    assert list(np.flatnonzero(np.isfinite(applied(TypicalStrategy(p=p), probs)))) == survivors


def test_logit_bias_clamps_and_bans():
    strategy = LogitBiasStrategy(FakeProvider(), bias={"4": 500, 5: -3.5}, banned_tokens=[6])
    logits = strategy.on_logits(np.zeros(10, dtype=np.float32), [])
    assert logits[4] == 100 and logits[5] == -3.5 and logits[6] == -np.inf and logits[7] == 0
    with pytest.raises(ValueError, match="token ids"):
        LogitBiasStrategy(FakeProvider(), bias={"99999": 1})


# --- penalties follow rewinds exactly ------------------------------------------------------------
class _Rewinder(BaseStrategy):
    """Rewinds two tokens whenever the continuation reaches 4 tokens, three times."""

    reads_probs, edits_logits = False, False

    def __init__(self):
        self.left = 3

    def reset(self):
        self.left = 3

    def get_keep_index(self):
        return 0

    def backtrack(self, tokens):
        if len(tokens) == 4 and self.left:
            self.left -= 1
            return tokens[:2]
        return tokens


class _Spy(BaseStrategy):
    """Records the logits the chain hands it (after the penalty) and the tokens they were for."""

    reads_probs, edits_logits = False, True

    def __init__(self):
        self.seen = []

    def on_logits(self, logits, tokens):
        self.seen.append((list(tokens), logits.copy()))
        return logits


@pytest.mark.parametrize("kind", ["penalties", "dry"])
def test_penalties_follow_rewinds(kind):
    """After every rewind the penalty is computed from the tokens as they are: a rewound token no
    longer counts (checked against the reference formula at every step)."""
    provider = FakeProvider(seed=3)
    prompt = provider.encode(" the cat sat on the mat")
    if kind == "penalties":
        penalty = PenaltyStrategy(
            provider, repeat_penalty=1.8, frequency_penalty=0.5, presence_penalty=0.25, context=prompt
        )
    else:
        penalty = DryStrategy(provider, multiplier=2.0, base=1.5, allowed_length=1, context=prompt)
    spy = _Spy()
    sampler = BacktrackSampler(provider, ChainStrategy([penalty, spy, _Rewinder()]))
    list(sampler.generate(prompt, max_new_tokens=12, temperature=0, seed=0))
    assert sampler.stats.rewinds == 3
    rewound_seen = 0
    for tokens, logits in spy.seen:
        reference = provider.logits_for(prompt + tokens).astype(np.float32)
        expected = reference.copy()
        if kind == "penalties":
            ids, counts = np.unique(prompt + tokens, return_counts=True)
            values = expected[ids]
            expected[ids] = np.where(values <= 0, values * 1.8, values / 1.8) - counts * 0.5 - 0.25
        else:
            expected = DryStrategy(provider, multiplier=2.0, base=1.5, allowed_length=1).on_logits(
                expected, prompt + tokens
            )
        assert np.allclose(logits, expected, atol=1e-4)
        rewound_seen += len(tokens) == 2
    assert rewound_seen >= 4  # the steps right after each rewind were checked too


# --- request fields: aliases, SillyTavern's values ------------------------------------------------
def parsed(body, model=CompletionRequest, limits=None):
    return parse_request(model, json.dumps(body).encode(), limits or Limits())


@pytest.mark.parametrize("api_type", ["tabby", "koboldcpp"])
def test_sillytavern_bodies_parse(api_type):
    body = textgen_body(api_type, "Once upon a time", 40, ["\nUser:"], banned_tokens="5,6", banned_strings=["tapestry"])
    request = parsed(body)
    assert request.seed is None  # -1: random
    assert request.max_tokens == 40 and request.stop == ["\nUser:"] and request.structured_output is None
    assert request.banned_phrases == ["tapestry"] and request.custom_token_bans == [5, 6]
    assert request.dry_sequence_breakers == ["\n", ":", '"', "*"]
    names = [name for name, _, _ in request.samplers([2, 3])]
    assert names == ["logit_bias", "penalties"]  # rep_pen 1.2; DRY, XTC, typical at their off values


@pytest.mark.parametrize(
    "body, field, value",
    [
        ({"max_new_tokens": 7}, "max_tokens", 7),
        ({"max_length": 7}, "max_tokens", 7),
        ({"n_predict": 7}, "max_tokens", 7),
        ({"stop_sequence": ["x"]}, "stop", ["x"]),
        ({"stopping_strings": "x"}, "stop", ["x"]),
        ({"sampler_seed": 5}, "seed", 5),
        ({"seed": -1}, "seed", None),
        ({"rep_pen": 1.3}, "repetition_penalty", 1.3),
        ({"repeat_penalty": 1.3}, "repetition_penalty", 1.3),
        ({"rep_pen_range": 64}, "penalty_range", 64),
        ({"repetition_penalty_range": 64}, "penalty_range", 64),
        ({"repeat_last_n": 64}, "penalty_range", 64),
        ({"repetition_range": 64}, "penalty_range", 64),
        ({"typical": 0.9}, "typical_p", 0.9),
        ({"dry_range": 99}, "dry_penalty_last_n", 99),
        ({"ignore_eos": True}, "ban_eos_token", True),
        ({"top_k": -1}, "top_k", 0),
        ({"banned_tokens": "1, 2,3"}, "banned_tokens", [1, 2, 3]),
        ({"banned_tokens": [4]}, "banned_tokens", [4]),
        ({"banned_tokens": ["a b"]}, "banned_tokens", ["a b"]),
        ({"custom_token_bans": [4]}, "custom_token_bans", [4]),
        ({"dry_sequence_breakers": '"\\n", ":"'}, "dry_sequence_breakers", ["\n", ":"]),
        ({"logit_bias": [[5, -1.5], [6, False]]}, "logit_bias", {"5": -1.5, "6": False}),
        ({"grammar_string": ""}, "grammar_string", None),
        ({"json_schema": {}}, "json_schema", None),
    ],
)
def test_aliases(body, field, value):
    assert getattr(parsed({"prompt": "x", **body}), field) == value


def test_kobold_fields_and_defaults():
    request = parsed(
        kobold_body(
            "hi",
            20,
            ["\n"],
            memory="M:",
            banned_tokens=["a b"],
            banned_strings=["c"],
            use_default_badwordsids=True,
            sampler_seed=3,
        ),
        KoboldRequest,
    )
    assert request.prompt == "M:hi" and request.max_tokens == 20 and request.stop == ["\n"] and request.seed == 3
    assert request.banned_phrases == ["c", "a b"] and request.ban_eos_token
    defaults = parsed({"prompt": "hi", "rep_pen": 1.1}, KoboldRequest)
    assert (defaults.temperature, defaults.top_k, defaults.top_p, defaults.token_limit()) == (0.7, 100, 0.92, None)
    assert defaults.samplers()[0][1]["last_n"] == 320  # KoboldCpp's rep_pen_range


@pytest.mark.parametrize(
    "body, param",
    [
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"1": "big"}}, "logit_bias"),
        ({"custom_token_bans": "1,a"}, "custom_token_bans"),
        ({"banned_tokens": [1, "a"]}, "banned_tokens"),
        ({"dry_sequence_breakers": "[oops"}, "dry_sequence_breakers"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"penalty_range": -2}, "penalty_range"),
        ({"xtc_probability": 2}, "xtc_probability"),
        ({"typical_p": 0}, "typical_p"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"logprobs": 21}, "logprobs"),
    ],
)
def test_bad_sampler_fields_are_400(body, param):
    with pytest.raises(APIError) as caught:
        parsed({"prompt": "x", **body})
    assert caught.value.status == 400 and caught.value.param == param


def test_new_inputs_are_bounded():
    limits = Limits(max_token_ids=3, max_sequence_breakers=2)
    for body, param in (
        ({"logit_bias": {str(i): 1 for i in range(4)}}, "logit_bias"),
        ({"custom_token_bans": "1,2,3,4"}, "custom_token_bans"),
        ({"dry_sequence_breakers": ["a", "b", "c"]}, "dry_sequence_breakers"),
        ({"dry_sequence_breakers": ["x" * 201]}, "dry_sequence_breakers"),
    ):
        with pytest.raises(APIError) as caught:
            parsed({"prompt": "x", **body}, limits=limits)
        assert caught.value.param == param and caught.value.code in (
            "array_above_max_length",
            "string_above_max_length",
        )


def test_request_samplers_become_the_chain():
    provider = FakeProvider()
    request = parsed(
        {
            "prompt": "x",
            "logit_bias": {"4": 2},
            "rep_pen": 1.2,
            "dry_multiplier": 0.8,
            "typical_p": 0.9,
            "xtc_probability": 0.5,
            "banned_strings": ["cat"],
            "seed": 1,
        }
    )
    chain = build_strategy(provider, request, prompt=[2, 5])
    names = [type(s).__name__ for s in chain.strategies]
    assert names == [
        "LogitBiasStrategy",
        "PenaltyStrategy",
        "DryStrategy",
        "TypicalStrategy",
        "XtcStrategy",
        "AntiSlopStrategy",
    ]
    assert chain.strategies[1].window.context == [2, 5] and not chain.capabilities.reads_probs
    with pytest.raises(APIError) as caught:  # an id outside the vocabulary
        build_strategy(provider, parsed({"prompt": "x", "custom_token_bans": "999"}))
    assert caught.value.param == "banned_tokens"


# --- routes on a fake model ------------------------------------------------------------------------
KEY = "k"


@pytest.fixture(scope="module")
def fake_server():
    engine = Engine(FakeProvider(), "fake-model", parallel=2)
    with ServerThread(create_app(engine, api_key=KEY)) as running:
        yield running


def call(server, method, path, body=None, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.url + path, json=body, headers=headers, timeout=60, **kwargs)


def test_tabby_model_routes(fake_server):
    card = call(fake_server, "GET", "/v1/model").json()
    assert card["id"] == "fake-model" and card["object"] == "model" and card["parameters"]["max_seq_len"] == 4096
    listed = call(fake_server, "GET", "/v1/model/list").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["fake-model"]
    assert call(fake_server, "GET", "/v1/model", key=None).status_code == 401


def test_token_routes(fake_server):
    provider = FakeProvider()
    ids = provider.encode(" the cat")
    assert call(fake_server, "POST", "/v1/token/encode", {"text": " the cat"}).json() == {
        "tokens": ids,
        "length": len(ids),
    }
    assert call(fake_server, "POST", "/v1/token/decode", {"tokens": ids}).json() == {"text": " the cat"}
    assert call(fake_server, "POST", "/tokenize", {"content": " the cat"}).json() == {
        "tokens": ids[1:]
    }  # add_special: false
    pieces = call(fake_server, "POST", "/tokenize", {"content": " the cat", "with_pieces": True}).json()
    assert pieces == {"tokens": [{"id": ids[1], "piece": " the"}, {"id": ids[2], "piece": " cat"}]}
    assert call(fake_server, "POST", "/detokenize", {"tokens": ids}).json() == {"content": " the cat"}
    assert call(fake_server, "POST", "/api/extra/tokencount", {"prompt": " the cat"}).json() == {"value": 3, "ids": ids}
    bad = call(fake_server, "POST", "/v1/token/decode", {"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert call(fake_server, "POST", "/tokenize", {"nothing": 1}).status_code == 400


def test_kobold_info_routes_need_no_key(fake_server):
    assert call(fake_server, "GET", "/api/v1/model", key=None).json() == {"result": "koboldcpp/protected-model"}
    assert call(fake_server, "GET", "/api/v1/model").json() == {"result": "fake-model"}
    assert call(fake_server, "GET", "/api/v1/info/version", key=None).json() == {"result": "1.2.5"}
    version = call(fake_server, "GET", "/api/extra/version", key=None).json()
    assert version["result"] == "KoboldCpp" and version["protected"] is True
    assert call(fake_server, "GET", "/api/v1/config/max_context_length", key=None).json() == {"value": 4096}
    assert call(fake_server, "GET", "/api/v1/config/max_length", key=None).json() == {"value": 4096}
    assert call(fake_server, "POST", "/api/v1/generate", {"prompt": "x"}, key=None).status_code == 401


def test_kobold_generate_check_and_errors(fake_server):
    body = {"prompt": " the cat", "max_length": 12, "temperature": 0, "genkey": "KCPP1", "banned_tokens": [" dog"]}
    result = call(fake_server, "POST", "/api/v1/generate", body).json()
    assert set(result) == {"results"} and result["results"][0]["finish_reason"] in ("stop", "length")
    text = result["results"][0]["text"]
    assert text and " dog" not in text
    check = call(fake_server, "POST", "/api/extra/generate/check", {"genkey": "KCPP1"}).json()
    assert check == {"results": [{"text": text}]}
    assert call(fake_server, "POST", "/api/extra/generate/check", {"genkey": "other"}).json() == {
        "results": [{"text": ""}]
    }
    bad = call(fake_server, "POST", "/api/v1/generate", {"prompt": " the", "rep_pen": -1})
    assert bad.status_code == 400 and bad.json()["detail"]["msg"] == bad.json()["error"]["message"]


def kobold_events(response):
    events = [block for block in response.text.split("\n\n") if block]
    assert all(block.startswith("event: message\ndata: ") for block in events), events
    return [json.loads(block.split("data: ", 1)[1]) for block in events]


def test_kobold_stream(fake_server):
    body = {"prompt": " the cat", "max_length": 10, "temperature": 0, "stop_sequence": [" mat"]}
    events = kobold_events(call(fake_server, "POST", "/api/extra/generate/stream", body))
    assert events[-1]["token"] == "" and events[-1]["finish_reason"] in ("stop", "length")
    assert all(e["finish_reason"] is None and e["token"] for e in events[:-1])
    plain = call(fake_server, "POST", "/api/v1/generate", body).json()["results"][0]["text"]
    assert "".join(e["token"] for e in events) == plain


class _SlowFake(FakeProvider):
    def logits_for(self, tokens):
        time.sleep(0.005)
        return super().logits_for(tokens)


def test_abort_ends_the_generation_with_its_text():
    """ST posts /api/extra/abort with no body: the running generation ends at the next step and its
    stream closes normally with the text so far; one with another genkey goes on."""
    with ServerThread(create_app(Engine(_SlowFake(), "slow", parallel=2))) as server:
        body = {"prompt": " the cat", "max_length": 3000, "seed": 1, "ban_eos_token": True}
        answers = {}

        def stream(name, **extra):
            answers[name] = call(server, "POST", "/api/extra/generate/stream", dict(body, **extra), key=None)

        threads = [
            threading.Thread(target=stream, args=("st",)),
            threading.Thread(target=stream, args=("lite",), kwargs={"genkey": "KCPP7", "max_length": 300}),
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while call(server, "GET", "/health").json()["running"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert httpx.post(server.url + "/api/extra/abort", timeout=30).json() == {"success": "true", "done": "true"}
        for thread in threads:
            thread.join(60)
        st, lite = kobold_events(answers["st"]), kobold_events(answers["lite"])
        assert st[-1] == {"token": "", "finish_reason": "stop"} and len(st) < 1000
        assert lite[-1] == {"token": "", "finish_reason": "length"}  # its genkey was not the abort's
        assert call(server, "POST", "/api/extra/abort", key=None).json() == {"success": "false", "done": "true"}


def test_keyless_abort_ends_the_current_generation_whatever_its_genkey():
    """KoboldCpp's rule: an abort without a genkey aborts the current generation (one started with
    a genkey too) when no other user's generation runs; an abort with another genkey aborts nothing."""
    with ServerThread(create_app(Engine(_SlowFake(), "slow", parallel=2))) as server:
        body = {"prompt": " the cat", "max_length": 3000, "seed": 1, "ban_eos_token": True, "genkey": "KCPP9"}
        answers = {}
        thread = threading.Thread(
            target=lambda: answers.update(st=call(server, "POST", "/api/extra/generate/stream", body, key=None))
        )
        thread.start()
        deadline = time.monotonic() + 30
        while call(server, "GET", "/health").json()["running"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        miss = call(server, "POST", "/api/extra/abort", {"genkey": "KCPP1"}, key=None).json()
        assert miss == {"success": "false", "done": "false"}
        assert httpx.post(server.url + "/api/extra/abort", timeout=30).json() == {"success": "true", "done": "true"}
        thread.join(60)
        events = kobold_events(answers["st"])
        assert events[-1] == {"token": "", "finish_reason": "stop"} and len(events) < 1000


@pytest.mark.parametrize("api_type", ["tabby", "koboldcpp"])
def test_sillytavern_body_on_the_openai_route(fake_server, api_type):
    """The exact body (seed -1, every field ST sends, custom_token_bans as a string) streams."""
    provider = FakeProvider()
    body = textgen_body(
        api_type, " the cat", 12, ["\nUser:"], banned_tokens=str(provider.ids[" dog"]), banned_strings=[" mat"]
    )
    response = call(fake_server, "POST", "/v1/completions", body)
    assert response.status_code == 200, response.text
    chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert response.text.rstrip().endswith("data: [DONE]") and text
    assert " dog" not in text and " mat" not in text


# --- logprobs --------------------------------------------------------------------------------------
def log_softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    return logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))


def test_completion_logprobs_are_the_models(fake_server):
    provider = FakeProvider()
    body = {"prompt": " the cat", "max_tokens": 6, "temperature": 0, "logprobs": 3}
    choice = call(fake_server, "POST", "/v1/completions", body).json()["choices"][0]
    report, prompt = choice["logprobs"], provider.encode(" the cat")
    assert "".join(report["tokens"]) == choice["text"] and len(report["tokens"]) == 6
    assert report["text_offset"] == [sum(map(len, report["tokens"][:i])) for i in range(6)]
    tokens = []
    for piece, logprob, top in zip(report["tokens"], report["token_logprobs"], report["top_logprobs"]):
        reference = log_softmax(provider.logits_for(prompt + tokens))
        best = np.argsort(-reference)[:3]
        assert logprob == pytest.approx(reference[provider.ids[piece]], abs=1e-5)
        assert list(top) == [provider.vocab[i] for i in best]  # greedy: the chosen one is the best
        assert list(top.values()) == pytest.approx(reference[best].tolist(), abs=1e-5)
        tokens.append(provider.ids[piece])


def test_logprobs_only_for_final_tokens(fake_server):
    """Bans that rewind: the reported tokens are exactly the answer's, streamed or not."""
    body = {
        "prompt": " the cat",
        "max_tokens": 30,
        "temperature": 1,
        "seed": 2,
        "logprobs": 2,
        "banned_strings": ["a", "e", " the"],
    }
    whole = call(fake_server, "POST", "/v1/completions", body).json()
    assert whole["backtrack"]["rewinds"] > 0
    choice = whole["choices"][0]
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
    assert len(choice["logprobs"]["tokens"]) == whole["usage"]["completion_tokens"]
    stream = call(fake_server, "POST", "/v1/completions", dict(body, stream=True))
    chunks = [json.loads(line[6:])["choices"][0] for line in stream.text.splitlines() if line.startswith("data: {")]
    tokens = [t for c in chunks if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert "".join(tokens) == "".join(c["text"] for c in chunks) == choice["text"]
    offsets = [o for c in chunks if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert offsets == choice["logprobs"]["text_offset"]
    assert call(fake_server, "POST", "/v1/completions", dict(body, logprobs=21)).status_code == 400


# --- n: several generations of one request -------------------------------------------------------
def test_n_choices(fake_server):
    """SillyTavern's "multiple swipes": n generations, each its own seed, as choices 0..n-1."""
    body = {"prompt": " the cat", "max_tokens": 8, "temperature": 1, "seed": 5, "n": 3, "top_k": 0}
    whole = call(fake_server, "POST", "/v1/completions", body).json()
    texts = [c["text"] for c in whole["choices"]]
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2] and len(set(texts)) == 3
    single = [
        call(fake_server, "POST", "/v1/completions", dict(body, n=1, seed=5 + i)).json()["choices"][0]["text"]
        for i in range(3)
    ]
    assert texts == single  # choice i is the request with seed + i
    assert whole["usage"]["completion_tokens"] == 24  # 8 each
    stream = call(
        fake_server, "POST", "/v1/completions", dict(body, stream=True, stream_options={"include_usage": True})
    )
    chunks = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
    streamed = {
        i: "".join(c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["index"] == i)
        for i in range(3)
    }
    assert [streamed[i] for i in range(3)] == texts
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishes) == 3 and chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    too_many = call(fake_server, "POST", "/v1/completions", dict(body, n=9))
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "integer_above_max_value"


def _naive_repeat_lengths(window, limit):
    n, out = len(window), {}
    for e in range(n - 1):
        length = 0
        while length < limit and e - length >= 0 and window[e - length] == window[n - 1 - length]:
            length += 1
        if length:
            out[e] = length
    return out


@pytest.mark.parametrize("kind", ["random", "periodic", "constant"])
def test_dry_repeat_lengths_match_a_naive_scan(kind):
    from backtrack_sampler.strategy.dry_strategy import repeat_lengths

    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 300, 2000):
        window = {
            "random": rng.integers(0, 4, size),
            "periodic": np.tile([5, 6, 7], size)[:size],
            "constant": np.full(size, 3),
        }[kind]
        for limit in (1, 3, size):
            ends, lengths = repeat_lengths(window, limit)
            assert dict(zip(ends.tolist(), lengths.tolist())) == _naive_repeat_lengths(window.tolist(), limit)


def test_dry_is_fast_on_a_long_loop():
    """A 4000-token loop (where DRY matters most) costs milliseconds per step, not a Python loop per token."""
    strategy = DryStrategy(_Text(), multiplier=0.8, sequence_breakers=["never"])
    strategy.window.context = list(np.tile([4, 5, 6, 7, 8], 800))
    rows = [np.zeros(262_144, dtype=np.float32) for _ in range(5)]
    started = time.perf_counter()
    for logits in rows:
        strategy.on_logits(logits, [4, 5])
    assert (time.perf_counter() - started) / 5 < 0.05
    assert rows[0][6] < -1e30 and rows[0][7] == 0  # the loop's next token is penalized (clamped, finite)


# --- every driver ----------------------------------------------------------------------------------
def _samplers(provider, prompt, repeat_penalty=1.5):
    return ChainStrategy(
        [
            LogitBiasStrategy(provider, bias={"5": 2.0}, banned_tokens=[6]),
            PenaltyStrategy(
                provider,
                repeat_penalty=repeat_penalty,
                presence_penalty=0.3,
                frequency_penalty=0.2,
                last_n=16,
                context=prompt,
            ),
            DryStrategy(provider, multiplier=1.0, allowed_length=1, context=prompt),
        ]
    )


def test_samplers_give_the_same_tokens_on_every_driver():
    """Greedy with bias, penalties and DRY: in process, in a batch of several, and drafted by a
    (fake) llama-server engine: the same tokens. (Through an engine the logits are its
    log-probabilities, so llama.cpp's repeat_penalty, which divides positive logits and multiplies
    negative ones, acts differently there; the additive penalties, DRY and the bias do not.)"""
    from engine_fakes import FakeEngine

    from backtrack_sampler.core.batch import BatchScheduler
    from backtrack_sampler.engine import EngineProvider

    model = FakeProvider()
    prompt = model.encode(" it was the cat")
    alone = list(BacktrackSampler(model, _samplers(model, prompt)).generate(prompt, max_new_tokens=30, temperature=0))
    assert 6 not in alone and len(alone) == 30
    plain = list(BacktrackSampler(model, BaseStrategy()).generate(prompt, max_new_tokens=30, temperature=0))
    assert plain != alone  # the samplers changed something
    scheduler = BatchScheduler(model, parallel=3)
    jobs = [scheduler.submit(prompt, _samplers(model, prompt), max_new_tokens=30, temperature=0) for _ in range(3)]
    list(scheduler.run())
    assert all(job.tokens == alone for job in jobs)
    additive = list(
        BacktrackSampler(model, _samplers(model, prompt, 1.0)).generate(prompt, max_new_tokens=30, temperature=0)
    )
    fake = FakeEngine("llama-server", model.logits_for, model.vocab_size, eos=model.get_eos_token_id())
    try:
        provider = EngineProvider(fake.url, "llama-server", tokenizer=model)
        drafted = BacktrackSampler(provider, _samplers(provider, prompt, 1.0)).generate(
            prompt, max_new_tokens=30, temperature=0
        )
        assert list(drafted) == additive != plain
    finally:
        fake.close()


def test_streamed_logprobs_leave_out_the_stop_string(fake_server):
    body = {"prompt": " the cat", "max_tokens": 40, "temperature": 0, "logprobs": 1}
    text = call(fake_server, "POST", "/v1/completions", body).json()["choices"][0]["text"]
    stop = text[len(text) // 2 :][:3]
    assert len(stop) == 3
    for stream in (False, True):
        response = call(fake_server, "POST", "/v1/completions", dict(body, stop=[stop], stream=stream))
        if stream:
            chunks = [
                json.loads(line[6:])["choices"][0] for line in response.text.splitlines() if line.startswith("data: {")
            ]
            answer = "".join(c["text"] for c in chunks)
            tokens = [t for c in chunks if c["logprobs"] for t in c["logprobs"]["tokens"]]
        else:
            choice = response.json()["choices"][0]
            answer, tokens = choice["text"], choice["logprobs"]["tokens"]
        assert answer == text[: text.index(stop)] and "".join(tokens).startswith(answer)
        assert len("".join(tokens)) - len(answer) < 3  # at most the token the stop string begins in


def test_samplers_without_effect_are_named(fake_server):
    """Fields the frontends send that do nothing here are accepted; when set to anything but their
    "off" value the answer names them (SillyTavern's defaults are all "off")."""
    body = {"prompt": " the cat", "max_tokens": 3, "temperature": 0, "tfs": 0.9, "mirostat": 2, "top_a": 0}
    assert call(fake_server, "POST", "/v1/completions", body).json()["backtrack"]["ignored"] == ["tfs", "mirostat"]
    stream = call(fake_server, "POST", "/v1/completions", dict(body, stream=True)).text
    last = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")][-1]
    assert last["backtrack"]["ignored"] == ["tfs", "mirostat"]
    st = dict(textgen_body("tabby", " the cat", 3, ["\n"]), stream=False)
    assert "ignored" not in call(fake_server, "POST", "/v1/completions", st).json()["backtrack"]
