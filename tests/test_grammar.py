"""GrammarStrategy (structured output): JSON Schema, grammars and regexes that follow every rewind
and compose with bans. Fast tests on a FakeProvider with JSON pieces in its vocabulary; real-model
tests (both providers, both embedded models), the command line, the server and a serving engine."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

pytest.importorskip("llguidance")

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, ChainStrategy
from backtrack_sampler.core.generation import Generation
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.strategy.base_strategy import BaseStrategy
from backtrack_sampler.strategy.grammar_strategy import GrammarError, GrammarStrategy, check_grammar
from backtrack_sampler.strategy.registry import StrategyRegistry, make_strategy

VOCAB = (
    ["<pad>", "<eos>", "<bos>"]
    + [
        '{"',
        '"}',
        "{",
        "}",
        "[",
        "]",
        '"',
        ":",
        ",",
        ": ",
        ", ",
        '": ',
        '", "',
        ' "',
        " ",
        " the",
        " cat",
        " dog",
        " rug",
        "cat",
        "dog",
        "rug",
        "name",
        "color",
        "age",
        "red",
        "green",
        "blue",
        "re",
        "gr",
        "bl",
        "ue",
        "d",
        "een",
        "x",
        "y",
    ]
    + list("abcdefghijklmnopqrstuvwxyz0123456789.")
)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "color": {"enum": ["red", "green", "blue"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "color", "age"],
    "additionalProperties": False,
}


def fake(boost=(), **options) -> FakeProvider:
    """A FakeProvider with JSON pieces; ``boost``: tokens made much more likely everywhere."""
    base = FakeProvider(vocab=VOCAB, **options)
    if not boost:
        return base

    def logits(tokens):
        values = base.logits_for(tokens).copy()
        for piece in boost:
            values[base.ids[piece]] += 10
        return values

    return FakeProvider(vocab=VOCAB, logits_fn=logits, **options)


def person_ok(text: str, colors=("red", "green", "blue")) -> bool:
    """``text`` is a JSON object valid for PERSON (with ``colors`` as its enum)."""
    value = json.loads(text)
    return (
        set(value) == {"name", "color", "age"}
        and isinstance(value["name"], str)
        and len(value["name"]) <= 12
        and value["color"] in colors
        and type(value["age"]) is int
        and 0 <= value["age"] <= 120
    )


def run(provider, strategy, prompt=" the", **kwargs):
    sampler = BacktrackSampler(provider, strategy)
    kwargs.setdefault("max_new_tokens", 80)
    text = "".join(sampler.generate_text(prompt, **kwargs))
    return text, sampler.stats


# --- the strategy on its own ---------------------------------------------------------------------
def test_declared_capabilities_keep_the_sparse_path():
    provider = fake()
    strategy = GrammarStrategy(provider, json_schema=PERSON)
    assert strategy.capabilities == (False, True, True)  # reads no probs, edits logits, a hard constraint
    generation = Generation(provider, strategy, provider.encode(" the"), 10, (1.0, 50, None, None))
    assert generation._dense is False


@pytest.mark.parametrize("seed", range(8))
def test_json_schema_output_is_valid_and_ends_with_stop(seed):
    provider = fake()
    text, stats = run(provider, GrammarStrategy(provider, json_schema=PERSON), seed=seed)
    assert stats.finish_reason == "stop" and person_ok(text), text


def test_json_is_compact_unless_whitespace_is_flexible():
    provider = fake(boost=(" ",))
    text, _ = run(provider, GrammarStrategy(provider, json_schema=PERSON), seed=1, temperature=0.5)
    assert person_ok(text) and re.fullmatch(r'\{"name": ".*", "color": "\w+", "age": \d+\}', text), text
    loose, stats = run(
        provider,
        GrammarStrategy(provider, json_schema=PERSON, whitespace_flexible=True),
        seed=1,
        max_new_tokens=60,
        temperature=0.5,
    )
    assert loose.startswith(" ") or "  " in loose or stats.finish_reason == "length", loose  # spaces are allowed now


@pytest.mark.parametrize("seed", range(5))
def test_regex_and_lark_grammars(seed):
    provider = fake()
    text, stats = run(provider, GrammarStrategy(provider, regex=r"( the| a)( cat| dog) (sat|ran)\."), seed=seed)
    assert stats.finish_reason == "stop" and re.fullmatch(r"( the| a)( cat| dog) (sat|ran)\.", text), text
    lark = 'start: animal ("," animal)*\nanimal: " cat" | " dog" | " rug"'
    text, stats = run(provider, GrammarStrategy(provider, grammar=lark), seed=seed, max_new_tokens=30)
    assert re.fullmatch(r"( cat| dog| rug)(,( cat| dog| rug))*", text) or stats.finish_reason == "length", text
    gbnf = 'root ::= "x" [0-9]+ "y"'
    text, stats = run(provider, GrammarStrategy(provider, grammar=gbnf), seed=seed, max_new_tokens=30)
    assert stats.finish_reason != "stop" or re.fullmatch(r"x[0-9]+y", text), text


def test_complete_grammar_allows_only_end_of_sequence():
    provider = fake()
    strategy = GrammarStrategy(provider, regex="cat")
    strategy.reset()
    tokens = [provider.ids["cat"]]
    assert strategy.backtrack(tokens) == tokens and strategy.complete
    logits = strategy.on_logits(np.zeros(provider.vocab_size, np.float32), tokens)
    assert list(np.flatnonzero(np.isfinite(logits))) == [provider.ids["<eos>"]]


def test_every_rewind_rolls_the_matcher_back():
    """After a cut to any position, the mask is the one a fresh matcher gives after those tokens."""
    provider = fake()
    text = '{"name": "cat", "color": "blue", "age": 42}'
    tokens = provider.encode(text, add_special_tokens=False)
    strategy = GrammarStrategy(provider, json_schema=PERSON)
    strategy.reset()
    assert strategy.backtrack(list(tokens)) == tokens and strategy.complete
    for position in [len(tokens) - 1, 9, 5, 1, 0]:
        strategy.on_rewind(position)
        fresh = GrammarStrategy(provider, json_schema=PERSON)
        fresh.backtrack(list(tokens[:position]))
        assert not strategy.complete
        np.testing.assert_array_equal(strategy.allowed(), fresh.allowed())
    assert strategy.backtrack(list(tokens)) == tokens and strategy.complete  # and it follows the tokens again


def test_a_refused_token_from_a_driver_is_rewound_and_banned_there():
    provider = fake()
    strategy = GrammarStrategy(provider, json_schema=PERSON)
    generation = Generation(provider, strategy, provider.encode(" the"), 20, (1.0, 50, None, None))
    generation.push(provider.ids['{"'])
    generation.push(provider.ids["dog"])  # not a key of PERSON
    assert generation.tokens == [provider.ids['{"']]
    assert generation.stats.events[-1].reason.startswith("json_schema: token not allowed")
    logits = strategy.on_logits(np.zeros(provider.vocab_size, np.float32), generation.tokens)
    assert logits[provider.ids["dog"]] == -np.inf


def test_the_mask_is_cheap_on_a_large_vocabulary():
    """The bitmask is applied with vectorised numpy (a 262k vocabulary, as Gemma 3's)."""
    vocab = VOCAB + [f"w{i}" for i in range(262_144 - len(VOCAB))]
    provider = FakeProvider(vocab=vocab)
    strategy = GrammarStrategy(provider, json_schema={"type": "object", "properties": {"s": {"type": "string"}}})
    strategy.reset()
    tokens = provider.encode('{"s": "', add_special_tokens=False)
    strategy.backtrack(tokens)
    logits = np.random.default_rng(0).standard_normal(len(vocab)).astype(np.float32)
    strategy.on_logits(logits.copy(), tokens)  # warm
    start = time.perf_counter()
    for _ in range(20):
        out = strategy.on_logits(logits.copy(), tokens)
    per_call = (time.perf_counter() - start) / 20
    assert np.isfinite(out).sum() > 200_000  # inside a string nearly every token is allowed
    assert per_call < 0.02, per_call  # about 1 ms here; a Python loop over the vocabulary takes ~100 ms


# --- composition with bans -----------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_enum_whose_values_are_all_banned_but_one_gives_that_one(seed):
    provider = fake(boost=("red", "re", "green", "gr"))
    bans = AntiSlopStrategy(provider, ["red", "green"])
    text, stats = run(provider, ChainStrategy([bans, GrammarStrategy(provider, json_schema=PERSON)]), seed=seed)
    assert stats.finish_reason == "stop" and person_ok(text, colors=("blue",)), text
    assert stats.rewinds > 0  # the bans did work


@pytest.mark.parametrize("seed", range(4))
def test_an_impossible_combination_ends_with_constraint(seed):
    provider = fake()
    bans = AntiSlopStrategy(provider, ["red", "green", "blue"])
    text, stats = run(provider, ChainStrategy([bans, GrammarStrategy(provider, json_schema=PERSON)]), seed=seed)
    assert stats.finish_reason == "constraint" and stats.constraint
    assert not any(color in text for color in ("red", "green", "blue"))
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)  # what was final before: never a complete answer


@pytest.mark.parametrize("order", ["bans first", "grammar first"])
def test_a_dead_end_rewinds_further(order):
    """After "x" the grammar allows only " cat", which is banned: the grammar rewinds to "x", bans
    it, and "y dog" follows. With the grammar last it always finds it; first in the chain,
    AntiSlop's own exhaustion may end it (its keep index has made "x" final) but never with a ban."""
    provider = fake(boost=("x", " cat", "cat", "c"))
    for seed in range(3):
        bans = AntiSlopStrategy(provider, ["cat"], max_retries=30)
        grammar = GrammarStrategy(provider, regex="x cat|y dog")
        text, stats = run(
            provider, ChainStrategy([bans, grammar] if order == "bans first" else [grammar, bans]), seed=seed
        )
        if order == "bans first":
            assert (text, stats.finish_reason) == ("y dog", "stop")
            assert any("dead end" in (event.reason or "") for event in stats.events)
        else:
            assert (text, stats.finish_reason) in {("y dog", "stop"), ("", "constraint")}


def test_a_dead_end_past_the_lookback_ends_with_constraint():
    provider = fake(boost=("x", " cat", "cat", "c"))
    bans = AntiSlopStrategy(provider, ["cat"], max_retries=30)
    text, stats = run(provider, ChainStrategy([bans, GrammarStrategy(provider, regex="x cat|y dog", lookback=0)]))
    assert (
        stats.finish_reason == "constraint" and "GrammarStrategy" in stats.constraint and "banned" in stats.constraint
    )
    assert "cat" not in text


@pytest.mark.parametrize("seed", range(6))
def test_rewinds_by_another_strategy_keep_the_output_valid(seed):
    """AntiSlop bans words inside the JSON string value: it rewinds there again and again (the
    matcher follows each rewind) and the JSON stays valid, without them."""
    provider = fake(boost=("cat", "dog", "c", "d"))
    bans = AntiSlopStrategy(provider, ["cat", "dog"])
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "minLength": 3, "maxLength": 20}},
        "required": ["name"],
        "additionalProperties": False,
    }
    text, stats = run(
        provider, ChainStrategy([bans, GrammarStrategy(provider, json_schema=schema)]), seed=seed, max_new_tokens=60
    )
    assert stats.finish_reason == "stop", (text, stats.constraint)
    value = json.loads(text)
    assert 3 <= len(value["name"]) <= 20 and "cat" not in text and "dog" not in text
    assert any((event.reason or "").startswith("AntiSlopStrategy") for event in stats.events)


# --- errors, limits, the registry -----------------------------------------------------------------
@pytest.mark.parametrize(
    "params, words",
    [
        ({"json_schema": {"type": "objectx"}}, ["json_schema", "objectx"]),
        ({"grammar": "start: foo"}, ["grammar", "foo"]),
        ({"regex": "a(b"}, ["regex", "unclosed group"]),
        ({}, ["exactly one"]),
        ({"regex": "a", "grammar": 'start: "a"'}, ["exactly one", "grammar, regex"]),
    ],
)
def test_bad_grammars_name_the_problem(params, words):
    provider = fake()
    for attempt in (lambda: GrammarStrategy(provider, **params), lambda: check_grammar(**params)):
        with pytest.raises(GrammarError) as error:
            attempt()
        assert isinstance(error.value, ValueError)
        for word in words:
            assert word in str(error.value)


def test_check_grammar_bounds_size_and_compile_time():
    with pytest.raises(GrammarError, match="max_grammar_chars"):
        check_grammar(json_schema={"enum": ["x" * 50] * 10}, max_chars=100)
    # llguidance's compile time grows exponentially with allOf patterns (20: 35 s): killed at the limit
    hostile = {"allOf": [{"type": "string", "pattern": f".*{c}.*"} for c in "abcdefghijklmnopqrst"]}
    start = time.perf_counter()
    with pytest.raises(GrammarError, match="max_grammar_seconds"):
        check_grammar(json_schema=hostile, max_chars=10_000, timeout=1.0)
    assert time.perf_counter() - start < 10
    assert check_grammar(json_schema=PERSON, max_chars=10_000, timeout=10.0)  # the checker starts again


def test_registered_as_a_builtin():
    provider = fake()
    kind = StrategyRegistry().get("grammar", per_request=True)
    assert kind.cls is GrammarStrategy and kind.builtin
    strategy = make_strategy("grammar", provider, json_schema={"type": "object"})
    assert isinstance(strategy, GrammarStrategy) and strategy.kind == "json_schema"
    schema = kind.schema()
    assert schema["capabilities"] == {"reads_probs": False, "edits_logits": True, "hard_constraint": True}
    assert {"json_schema", "grammar", "regex", "lookback"} <= set(schema["parameters"]["properties"])


def test_a_strategy_that_changes_the_masked_logits_after_it_cannot_break_the_output():
    """A strategy chained after the grammar that undoes its mask: the refused tokens are rewound."""

    class Unmask(BaseStrategy):
        edits_logits, reads_probs = True, False

        def on_logits(self, logits, tokens):
            return np.zeros_like(logits)

    provider = fake()
    for seed in range(3):
        text, stats = run(
            provider,
            ChainStrategy([GrammarStrategy(provider, regex=" the cat"), Unmask()]),
            seed=seed,
            temperature=0.3,
            max_new_tokens=10,
            max_rewound_tokens=10_000,
        )
        assert " the cat".startswith(text), text  # always a prefix of a valid text
        assert stats.finish_reason != "stop" or text == " the cat", text
        assert any("not allowed" in (event.reason or "") for event in stats.events)


# --- the command line (a FakeProvider) -------------------------------------------------------------
def cli_run(argv, monkeypatch=None, provider=None):
    import io

    from backtrack_sampler import cli
    from backtrack_sampler.cli import model as cli_model

    if monkeypatch is not None:
        monkeypatch.setattr(cli_model, "load_provider", lambda *args, **kwargs: provider)
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(argv, stdin=io.StringIO(""), stdout=out, stderr=err)
    return status, out.getvalue().rstrip("\n"), err.getvalue()


def test_cli_flags_chain_the_grammar_last(tmp_path, monkeypatch):
    provider = fake(boost=("red", "re", "green", "gr"))
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    for seed in range(3):
        status, out, err = cli_run(
            [
                "generate",
                " the",
                "--json-schema",
                str(schema),
                "--ban",
                "red",
                "--ban",
                "green",
                "--seed",
                str(seed),
                "--max-new-tokens",
                "80",
            ],
            monkeypatch,
            provider,
        )
        assert status == 0 and person_ok(out, colors=("blue",)), (out, err)
    status, out, err = cli_run(
        ["generate", " the", "--regex-output", "( the| a)( cat| dog)", "--ban", "cat", "--seed", "3"],
        monkeypatch,
        provider,
    )
    assert status == 0 and out in (" the dog", " a dog"), (out, err)
    (tmp_path / "g.lark").write_text('start: " cat" | " dog" | " rug"')
    status, out, err = cli_run(
        ["generate", " the", "--grammar", str(tmp_path / "g.lark"), "--ban", "dog", "--ban", "cat", "--seed", "3"],
        monkeypatch,
        provider,
    )
    assert (status, out) == (0, " rug"), err
    status, out, err = cli_run(
        [
            "generate",
            " the",
            "--json-object",
            "--seed",
            "1",
            "--max-new-tokens",
            "40",
            "--strategy",
            "antislop",
            "--strategy-args",
            '{"slops": ["cat"]}',
        ],
        monkeypatch,
        provider,
    )
    assert status == 0 and (out.startswith("{") and "cat" not in out), (out, err)


def test_cli_strategy_grammar_and_the_flags(tmp_path, monkeypatch):
    provider = fake()
    args = json.dumps(
        {
            "json_schema": {
                "type": "object",
                "properties": {"age": {"type": "integer"}},
                "required": ["age"],
                "additionalProperties": False,
            }
        }
    )
    status, out, err = cli_run(
        ["generate", " the", "--strategy", "grammar", "--strategy-args", args, "--seed", "0"], monkeypatch, provider
    )
    assert status == 0 and set(json.loads(out)) == {"age"}, (out, err)
    status, out, err = cli_run(
        ["generate", " the", "--strategy", "grammar", "--regex-output", "( cat| dog)"], monkeypatch, provider
    )  # the flag fills the grammar of that --strategy grammar
    assert status == 0 and out in (" cat", " dog"), (out, err)


def test_cli_impossible_combination_exits_3(tmp_path, monkeypatch):
    provider = fake()
    status, out, err = cli_run(
        ["generate", " the", "--regex-output", "( the| a) cat", "--ban", "cat"], monkeypatch, provider
    )
    assert status == 3 and "cat" not in out and "hard constraint could not be held" in err, (out, err)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--json-schema", "MISSING.json"], ["JSON Schema file not found"]),
        (["--json-schema", "BAD"], ["not valid JSON"]),
        (["--json-schema", "TYPO"], ["--json-schema", "objectx"]),
        (["--regex-output", "a(b"], ["--regex-output", "unclosed group"]),
        (["--regex-output", "a", "--json-object"], ["give one of", "--json-object", "--regex-output"]),
    ],
)
def test_cli_bad_grammars_are_one_line_errors_before_the_model_loads(argv, words, tmp_path, monkeypatch):
    (tmp_path / "BAD").write_text("{not json")
    (tmp_path / "TYPO").write_text('{"type": "objectx"}')
    argv = [str(tmp_path / a) if a in ("BAD", "TYPO", "MISSING.json") else a for a in argv]
    loaded = []
    monkeypatch.setattr("backtrack_sampler.cli.model.load_provider", lambda *a, **k: loaded.append(1) or fake())
    status, out, err = cli_run(["generate", " the", *argv])
    assert status == 1 and not loaded and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


# --- through a serving engine (the fake engine of tests/engine_fakes.py) ---------------------------
@pytest.fixture(params=["llama-server", "vllm", "sglang"])
def engine_type(request):
    return request.param


def test_through_an_engine_the_output_is_valid_and_free_of_bans(engine_type):
    """The engine drafts; the grammar masks its K candidates (and rewinds where none is allowed).
    With top-k off and K = the vocabulary the engine reports every token: exact, as in process."""
    from engine_fakes import FakeEngine

    from backtrack_sampler.engine import EngineProvider

    model = fake(boost=("red", "re", "green", "gr"))
    engine = FakeEngine(engine_type, model.logits_for, model.vocab_size, eos=model.get_eos_token_id())
    try:
        provider = EngineProvider(engine.url, engine_type, tokenizer=model, n_probs=len(VOCAB))
        for seed in range(3):
            strategy = ChainStrategy(
                [AntiSlopStrategy(provider, ["red", "green"]), GrammarStrategy(provider, json_schema=PERSON)]
            )
            text, stats = run(provider, strategy, seed=seed, top_k=0)
            assert stats.finish_reason == "stop" and person_ok(text, colors=("blue",)), text
    finally:
        engine.close()


def test_through_an_engine_tokens_outside_the_candidates():
    """The engine reports K candidates. A token the grammar forces (the only one it allows) is taken
    even when it is not among them: its probability under the grammar is 1, as in process. Where
    the grammar allows several tokens and none is a candidate (here: "x" and "y", which the model
    ranks last), it is a dead end: the generation rewinds and, never finding them, ends with
    "constraint", never with text the grammar refuses. In process both are found."""
    from engine_fakes import FakeEngine

    from backtrack_sampler.engine import EngineProvider

    base = fake()

    def logits(tokens):
        values = base.logits_for(tokens).copy()
        values[[base.ids["x"], base.ids["y"]]] = -50.0  # always last
        values[[base.ids[" cat"], base.ids[" dog"]]] += 10  # among the candidates
        return values

    model = FakeProvider(vocab=VOCAB, logits_fn=logits)
    engine = FakeEngine("llama-server", model.logits_for, model.vocab_size, eos=model.get_eos_token_id())
    try:
        provider = EngineProvider(engine.url, "llama-server", tokenizer=model, n_probs=8)
        for seed in range(3):
            text, stats = run(provider, GrammarStrategy(provider, regex="( cat| dog)x"), seed=seed, top_k=8)
            assert stats.finish_reason == "stop" and text in (" catx", " dogx"), text
        text, stats = run(
            provider, GrammarStrategy(provider, regex="( cat| dog)(x|y)"), seed=0, top_k=8, max_new_tokens=10
        )
        assert stats.finish_reason == "constraint" and text in ("", " cat", " dog")
        assert any("dead end" in (event.reason or "") for event in stats.events)
        local, local_stats = run(model, GrammarStrategy(model, regex="( cat| dog)(x|y)"), seed=0, top_k=8)
        assert local_stats.finish_reason == "stop" and re.fullmatch("( cat| dog)(x|y)", local)
    finally:
        engine.close()


# --- the server (a FakeProvider) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake_server():
    from starlette.testclient import TestClient

    from backtrack_sampler.server.app import Engine, Limits, create_app

    provider = fake(boost=("red", "re", "green", "gr"))
    with TestClient(
        create_app(Engine(provider, "fake"), limits=Limits(max_grammar_chars=5000, max_grammar_seconds=1.0))
    ) as client:
        yield client


def person_format(schema=PERSON):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def sse(response):
    chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
    return text, chunks[-1]


@pytest.mark.parametrize("stream", [False, True])
def test_server_response_format_with_banned_strings(fake_server, stream):
    for seed in range(3):
        body = {
            "prompt": " the",
            "max_tokens": 80,
            "seed": seed,
            "response_format": person_format(),
            "banned_strings": ["red", "green"],
            "stream": stream,
        }
        if stream:
            with fake_server.stream("POST", "/v1/completions", json=body) as response:
                text, last = sse(response)
            finish = last["choices"][0]["finish_reason"]
        else:
            answer = fake_server.post("/v1/completions", json=body).json()
            text, finish = answer["choices"][0]["text"], answer["choices"][0]["finish_reason"]
        assert finish == "stop" and person_ok(text, colors=("blue",)), text


@pytest.mark.parametrize(
    "field, value, check",
    [
        ("json_schema", PERSON, person_ok),  # llama-server / TabbyAPI: the schema itself
        (
            "grammar",
            'root ::= (" cat" | " dog" | " rug") ("," (" cat" | " dog" | " rug"))*',
            lambda t: re.fullmatch(r"( cat| dog| rug)(,( cat| dog| rug))*", t),
        ),
        ("grammar_string", 'start: " cat" | " rug"', lambda t: t in (" cat", " rug")),
        ("regex_pattern", "( the| a)( cat| dog)", lambda t: re.fullmatch("( the| a)( cat| dog)", t)),
        ("response_format", {"type": "json_object"}, None),
    ],
)
def test_server_structured_output_fields(fake_server, field, value, check):
    answer = fake_server.post(
        "/v1/completions", json={"prompt": " the", "max_tokens": 60, "seed": 1, field: value}
    ).json()
    choice = answer["choices"][0]
    if check is None:  # any object: this model writes one long key (the token limit ends it)
        assert choice["text"].startswith('{"') and choice["finish_reason"] in ("stop", "length"), choice
        assert choice["finish_reason"] == "length" or isinstance(json.loads(choice["text"]), dict)
    else:
        assert choice["finish_reason"] == "stop" and check(choice["text"]), choice


def test_server_strategy_grammar_is_checked_like_the_fields(fake_server):
    answer = fake_server.post(
        "/v1/completions",
        json={"prompt": " the", "max_tokens": 40, "seed": 2, "strategy": [{"name": "grammar", "regex": "( cat| dog)"}]},
    ).json()
    assert answer["choices"][0]["text"] in (" cat", " dog")
    hostile = {"allOf": [{"type": "string", "pattern": f".*{c}.*"} for c in "abcdefghijklmnopqrst"]}
    response = fake_server.post(
        "/v1/completions", json={"prompt": " the", "strategy": [{"name": "grammar", "json_schema": hostile}]}
    )
    assert response.status_code == 400 and "max_grammar_seconds" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "strategy[0]"


def test_server_impossible_combination_is_content_filter(fake_server):
    body = {
        "prompt": " the",
        "max_tokens": 80,
        "seed": 0,
        "response_format": person_format(),
        "banned_strings": ["red", "green", "blue"],
    }
    answer = fake_server.post("/v1/completions", json=body).json()
    assert answer["choices"][0]["finish_reason"] == "content_filter"
    assert answer["backtrack"]["constraint"] and not any(
        c in answer["choices"][0]["text"] for c in ("red", "green", "blue")
    )
    with fake_server.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        text, last = sse(response)
    assert last["choices"][0]["finish_reason"] == "content_filter" and last["backtrack"]["constraint"]


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"json_schema": {"type": "objectx"}}, "json_schema", ["objectx"]),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
            "response_format",
            ["objectx"],
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", ["schema"]),
        ({"response_format": {"type": "xml"}}, "response_format.type", ["json_schema"]),
        ({"grammar": "root ::= foo"}, "grammar", ["foo"]),
        ({"regex_pattern": "a(b"}, "regex_pattern", ["unclosed group"]),
        ({"json_schema": {"enum": ["x" * 100] * 100}}, "json_schema", ["max_grammar_chars"]),
        (
            {"json_schema": {"allOf": [{"type": "string", "pattern": f".*{c}.*"} for c in "abcdefghijklmnopqrst"]}},
            "json_schema",
            ["max_grammar_seconds"],
        ),
        (
            {"json_schema": {"type": "object"}, "regex_pattern": "a"},
            None,
            ["give one of", "json_schema", "regex_pattern"],
        ),
        ({"strategy": [{"name": "grammar", "json_schema": "not a schema"}]}, "strategy[0].json_schema", []),
    ],
)
def test_server_bad_structured_output_is_a_400_at_once(fake_server, body, param, words):
    start = time.perf_counter()
    response = fake_server.post("/v1/completions", json={"prompt": " the", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    assert time.perf_counter() - start < 8  # the compile limit is 1 s here


def test_server_text_response_format_is_plain_text(fake_server):
    answer = fake_server.post(
        "/v1/completions", json={"prompt": " the", "max_tokens": 8, "seed": 0, "response_format": {"type": "text"}}
    ).json()
    assert answer["choices"][0]["finish_reason"] == "length"


# --- real models: both providers, both embedded models -------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_llama():
    from backtrack_sampler.provider.models import load_provider

    return load_provider("llamacpp", "smollm2-135m-instruct", n_ctx=2048)


@pytest.fixture(scope="module")
def smollm2_hf():
    from backtrack_sampler.provider.models import load_provider

    return load_provider("transformers", "smollm2-135m-instruct")


REAL = {
    "gemma-llama": "llama_provider",
    "gemma-transformers": "transformers_provider",
    "smollm2-llama": "smollm2_llama",
    "smollm2-transformers": "smollm2_hf",
}
ASK = "Describe a person as JSON, with a name, a favourite colour and an age."


def real_prompt(provider):
    from backtrack_sampler.provider.chat import chat_prompt_tokens

    if (
        "gemma" in str(getattr(getattr(provider, "llm", None), "model_path", ""))
        or "gemma" in str(getattr(getattr(provider, "model", None), "name_or_path", "")).lower()
    ):
        return f"{ASK}\nJSON:"  # Gemma 3 270M is a base model: a plain prompt
    return chat_prompt_tokens(provider, [{"role": "user", "content": ASK}])


@pytest.mark.model
@pytest.mark.parametrize("name", list(REAL))
def test_real_models_valid_json_that_composes_with_bans(request, name):
    """Greedy JSON for PERSON; then the name it wrote and two of the colours are banned: the JSON
    is still valid, without them (AntiSlop rewound inside the string value: the matcher followed),
    and the colour is the one left."""
    provider = request.getfixturevalue(REAL[name])
    prompt = real_prompt(provider)
    text, stats = run(provider, GrammarStrategy(provider, json_schema=PERSON), prompt, temperature=0, max_new_tokens=60)
    assert stats.finish_reason == "stop" and person_ok(text), text
    first = json.loads(text)["name"].split()
    bans = ["red", "green"] + ([first[0]] if first and len(first[0]) > 1 else [])
    strategy = ChainStrategy([AntiSlopStrategy(provider, bans), GrammarStrategy(provider, json_schema=PERSON)])
    text, stats = run(provider, strategy, prompt, temperature=0, max_new_tokens=60)
    assert stats.finish_reason == "stop" and person_ok(text, colors=("blue",)), (text, stats.constraint)
    assert not any(ban in text for ban in bans), text
    assert stats.rewinds > 0 or len(bans) == 2


@pytest.mark.model
@pytest.mark.parametrize("name", ["smollm2-llama", "gemma-transformers"])
def test_real_models_impossible_combination_ends_with_constraint(request, name):
    provider = request.getfixturevalue(REAL[name])
    strategy = ChainStrategy(
        [AntiSlopStrategy(provider, ["red", "green", "blue"]), GrammarStrategy(provider, json_schema=PERSON)]
    )
    text, stats = run(provider, strategy, real_prompt(provider), temperature=0, max_new_tokens=60)
    assert stats.finish_reason == "constraint" and stats.constraint, text
    assert not any(c in text for c in ("red", "green", "blue"))


@pytest.mark.model
@pytest.mark.parametrize("name", ["smollm2-llama", "gemma-llama"])
def test_real_models_regex_and_gbnf(request, name):
    provider = request.getfixturevalue(REAL[name])
    text, stats = run(
        provider,
        GrammarStrategy(provider, regex=r"The year is (19|20)[0-9]{2}\."),
        "When did the Second World War end?",
        temperature=0,
        max_new_tokens=20,
    )
    assert stats.finish_reason == "stop" and re.fullmatch(r"The year is (19|20)[0-9]{2}\.", text), text
    gbnf = 'root ::= "Answer: " ("yes" | "no")'
    text, stats = run(provider, GrammarStrategy(provider, grammar=gbnf), "Is the sky blue?", max_new_tokens=20, seed=0)
    assert stats.finish_reason == "stop" and text in ("Answer: yes", "Answer: no"), text


@pytest.mark.model
def test_real_cli(tmp_path):
    """generate --chat --json-schema --ban (a subprocess, the embedded chat model); an impossible
    combination exits 3."""
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("backtrack-sampler")
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    base = [
        str(exe),
        "generate",
        "--chat",
        ASK,
        "--json-schema",
        str(schema),
        "--ban",
        "red",
        "--ban",
        "green",
        "--temperature",
        "0",
        "--max-new-tokens",
        "60",
        "--n-ctx",
        "2048",
    ]
    done = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and person_ok(done.stdout.strip(), colors=("blue",)), (done.stdout, done.stderr)
    done = subprocess.run(base + ["--ban", "blue"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3 and "hard constraint" in done.stderr, (done.stdout, done.stderr)
    assert not any(c in done.stdout for c in ("red", "green", "blue"))


@pytest.fixture(scope="module")
def chat_server(smollm2_llama):
    from serving import ServerThread

    from backtrack_sampler.server.app import Engine, create_app

    with ServerThread(create_app(Engine(smollm2_llama, "smollm2"))) as running:
        yield running


@pytest.mark.model
@pytest.mark.parametrize("stream", [False, True])
def test_real_server_response_format_with_banned_strings(chat_server, stream):
    """The official openai client: chat with response_format json_schema and banned_strings."""
    import openai

    with openai.OpenAI(base_url=chat_server.url + "/v1", api_key="none", timeout=300, max_retries=0) as client:
        kwargs = dict(
            model="smollm2",
            messages=[{"role": "user", "content": ASK}],
            temperature=0,
            max_tokens=60,
            response_format=person_format(),
            extra_body={"banned_strings": ["red", "green"]},
        )
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = chunks[-1].choices[0].finish_reason
        else:
            answer = client.chat.completions.create(**kwargs)
            text, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
        assert finish == "stop" and person_ok(text, colors=("blue",)), text
        # the impossible combination: content_filter, and the extension says which strategy gave up
        kwargs["extra_body"] = {"banned_strings": ["red", "green", "blue"]}
        answer = client.chat.completions.create(**kwargs)
        assert answer.choices[0].finish_reason == "content_filter"
        assert answer.model_extra["backtrack"]["constraint"]
        # an invalid schema: a 400 at once
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(**{**kwargs, "response_format": person_format({"type": "objectx"})})
        assert "objectx" in str(error.value)


@pytest.mark.model
def test_real_server_completions_with_llama_server_fields(chat_server):
    import httpx

    for body, check in [
        ({"json_schema": PERSON, "banned_strings": ["red", "green"]}, lambda t: person_ok(t, colors=("blue",))),
        (
            {"grammar": 'root ::= "The answer is " ("yes" | "no") "."'},
            lambda t: t in ("The answer is yes.", "The answer is no."),
        ),
        ({"regex_pattern": r"[A-Z][a-z]+, [A-Z][a-z]+"}, lambda t: re.fullmatch(r"[A-Z][a-z]+, [A-Z][a-z]+", t)),
    ]:
        answer = httpx.post(
            chat_server.url + "/v1/completions",
            timeout=300,
            json={"prompt": "Q: Name a person and a city.\nA:", "max_tokens": 60, "temperature": 0, **body},
        ).json()
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop" and check(choice["text"]), (body, choice)


INVENT = "Invent a fictional person. Reply in JSON with name, age and hobbies."
HOBBIES = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}


@pytest.mark.model
@pytest.mark.parametrize("stream", [False, True])
def test_real_server_a_dead_end_of_max_items_finishes_valid(chat_server, stream):
    """Issue 26, through the server: seed 11 writes a third hobby the model wants to follow with a
    fourth, which ``maxItems: 3`` refuses. Plain masking (the grammar strategy with dead_ends and
    close_at_limit off) writes on inside that string to the token limit; the default rewinds to
    the hobby's first free token, bans it there, and ends valid (streamed the same)."""
    import httpx

    body = {
        "messages": [{"role": "user", "content": INVENT}],
        "seed": 11,
        "max_tokens": 250,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": HOBBIES}},
    }
    url = chat_server.url + "/v1/chat/completions"
    if stream:
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=600) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1]
    else:
        answer = httpx.post(url, json=body, timeout=600).json()
        text, finish = answer["choices"][0]["message"]["content"], answer["choices"][0]["finish_reason"]
        assert answer["backtrack"]["rewinds"] >= 1, answer
    value = json.loads(text)
    assert finish == "stop" and set(value) == {"name", "age", "hobbies"} and len(value["hobbies"]) <= 3, text
    assert all(len(hobby) < 40 for hobby in value["hobbies"]), text
    if not stream:  # plain masking on the same request runs into the dead end
        plain = [{"name": "grammar", "json_schema": HOBBIES, "dead_ends": False, "close_at_limit": False}]
        plain_body = {key: value for key, value in body.items() if key != "response_format"}
        answer = httpx.post(url, json={**plain_body, "strategy": plain, "max_tokens": 60}, timeout=600).json()
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "length" and '"hobbies": [' in choice["message"]["content"], choice
        with pytest.raises(json.JSONDecodeError):
            json.loads(choice["message"]["content"])


@pytest.mark.model
def test_real_a_list_at_a_tight_token_limit_ends_valid(smollm2_llama):
    """Issue 26's second case, one of bench/json_bench.py's: at its limit (80 tokens) plain masking
    is cut inside the third hobby; with budget-aware closing the third hobby winds down and the
    JSON ends within the limit, valid, with "stop"."""
    from backtrack_sampler.provider.chat import chat_prompt_tokens

    schema = {
        **HOBBIES,
        "properties": {**HOBBIES["properties"], "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    }
    ask = "Invent a retired sailor. Reply in JSON with name, age and hobbies."
    prompt = chat_prompt_tokens(smollm2_llama, [{"role": "user", "content": ask}])
    plain = GrammarStrategy(smollm2_llama, json_schema=schema, dead_ends=False, close_at_limit=False)
    text, stats = run(smollm2_llama, plain, prompt, seed=1, temperature=1.0, max_new_tokens=80)
    assert stats.finish_reason == "length" and '"hobbies": [' in text, text
    text, stats = run(
        smollm2_llama, GrammarStrategy(smollm2_llama, json_schema=schema), prompt, seed=1, max_new_tokens=80
    )
    value = json.loads(text)
    assert stats.finish_reason == "stop" and stats.delivered < 80 and len(value["hobbies"]) <= 3, text
    assert 0 <= value["age"] <= 120


@pytest.mark.model
def test_real_playground_json_schema_box(chat_server, tmp_path):
    """The playground (headless Chromium): a schema in the JSON Schema box with banned phrases gives
    schema-valid JSON without them; an invalid schema shows the server's 400 and marks the box."""
    from pathlib import Path

    playwright_api = pytest.importorskip("playwright.sync_api")
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.fail(f"{chromium} is missing: install Debian's chromium (apt-get install -y chromium)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(chromium), args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(chat_server.url + "/")
            playwright_api.expect(page.locator("#model")).to_have_text("smollm2", timeout=60_000)
            page.click(".seg label:has(input[value=chat])")
            page.fill("#prompt", ASK)
            page.fill("#banned", "red\ngreen")
            page.fill("#json-schema", json.dumps(PERSON, indent=1))
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "60")
            page.click("#generate")
            playwright_api.expect(page.locator("#st-status")).to_have_text("done · stop", timeout=240_000)
            text = "".join(page.locator("#output > .final").all_text_contents())
            assert person_ok(text, colors=("blue",)), text
            page.screenshot(path=str(tmp_path / "playground-json-schema.png"), full_page=True)
            page.fill("#json-schema", '{"type": "objectx"}')
            page.click("#generate")
            playwright_api.expect(page.locator("#error")).to_contain_text("objectx", timeout=60_000)
            assert "invalid" in page.locator("#json-schema").get_attribute("class")
            assert not errors, errors
        finally:
            browser.close()


@pytest.mark.model
def test_real_llama_server_engine_json_with_bans():
    """Through a real llama-server (the embedded chat model): sampled JSON with bans is valid and
    free of them. The K candidates often lack a key the schema forces; it is taken anyway (the
    grammar's only choice), so no rewinds are needed there."""
    from test_engine_llama_server import LlamaServer, llama_server_binary

    from backtrack_sampler.engine import EngineProvider
    from backtrack_sampler.provider.chat import chat_prompt_tokens
    from backtrack_sampler.provider.models import resolve_model

    server = LlamaServer(llama_server_binary(), str(resolve_model("smollm2-135m-instruct")), slots=2, n_ctx=4096)
    try:
        provider = EngineProvider(server.url, "llama-server", tokenizer="smollm2-135m-instruct")
        prompt = chat_prompt_tokens(provider, [{"role": "user", "content": ASK}])
        for seed in range(3):
            strategy = ChainStrategy(
                [AntiSlopStrategy(provider, ["red", "green"]), GrammarStrategy(provider, json_schema=PERSON)]
            )
            text, stats = run(provider, strategy, prompt, seed=seed, temperature=0.8, max_new_tokens=60)
            assert stats.finish_reason == "stop" and person_ok(text, colors=("blue",)), (text, stats.constraint)
    finally:
        server.stop()
