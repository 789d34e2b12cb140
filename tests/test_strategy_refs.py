"""Strategies by reference: a strategy file written outside the package (in a tmp dir) and a
strategy in a package module, used from Python (``BacktrackSampler``, ``BatchScheduler``), the
command line (``generate --strategy FILE.py:Class --strategy-args JSON``) and the server
(``create_app(..., strategies=...)`` / ``serve --load-strategy``), with their parameters
validated by one model per strategy. The fast tests run on the FakeProvider; the ``model`` ones
run the real command line and server as subprocesses on the embedded model."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from backtrack_sampler import BacktrackSampler, BaseStrategy, cli
from backtrack_sampler.cli import model as cli_model
from backtrack_sampler.core.batch import BatchScheduler
from backtrack_sampler.errors import UsageError
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.server.app import Engine, create_app
from backtrack_sampler.strategy.registry import StrategyRegistry, json_type, load_class, public_name

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).with_name("backtrack-sampler")

NO_DIGITS = (ROOT / "examples" / "no_digits.py").read_text()  # the README's strategy file

MAX_WORD_LENGTH = '''
"""max_word_length.py: rewinds every word longer than max_letters."""
import re

import numpy as np

from backtrack_sampler import BaseStrategy
from backtrack_sampler.provider.text import TextView

WORD = re.compile(r"[^\\W\\d_]+")  # letters


class MaxWordLength(BaseStrategy):
    """Rewinds a word as soon as it has more than max_letters letters, and bans the token that
    began it at that place."""

    edits_logits = True  # bans tokens in on_logits
    reads_probs = False
    hard_constraint = True  # when rewinding cannot fix it: finish_reason "constraint"

    def __init__(self, provider, max_letters: int = 8):
        self.max_letters = max_letters
        self.view = TextView(provider.decode)  # the text, with character <-> token offsets
        self.reset()

    def reset(self):
        self.view.reset()
        self.bans = {}  # position -> tokens banned there
        self.keep = 0  # tokens we let become final

    def on_rewind(self, position):  # told of every cut, ours or another strategy's
        self.view.rewind(position)
        self.bans = {p: banned for p, banned in self.bans.items() if p <= position}
        self.keep = min(self.keep, position)

    def on_logits(self, logits, continuation_tokens):
        logits[list(self.bans.get(len(continuation_tokens), ()))] = -np.inf
        return logits

    def backtrack(self, continuation_tokens):
        self.view.update(continuation_tokens)
        text = self.view.text
        for word in WORD.finditer(text, self.word_start(self.view.offset(self.keep))):  # the words not final
            if len(word.group()) > self.max_letters:
                start = max(self.view.token_at(word.start()), self.keep)  # never into final text
                self.bans.setdefault(start, set()).add(continuation_tokens[start])
                self.rewind_reason = f"a word longer than {self.max_letters} letters"
                return continuation_tokens[:start]
        return continuation_tokens

    def get_keep_index(self):  # the word being written may still grow: hold it back
        self.keep = max(self.keep, self.view.token_at(self.word_start(len(self.view.text))))
        return self.keep

    def word_start(self, end):  # where the word that ends at character `end` begins
        while end and self.view.text[end - 1].isalpha():
            end -= 1
        return end
'''

BAN_TOKENS = '''
"""A strategy in a package module, with a declared pydantic model of its parameters."""
from typing import List

import numpy as np
from pydantic import BaseModel, Field

from backtrack_sampler import BaseStrategy


class BanTokens(BaseStrategy):
    """Makes the tokens whose text is one of ``texts`` less likely."""

    name = "ban-tokens"
    edits_logits, reads_probs = True, False

    class Params(BaseModel):
        texts: List[str] = Field(min_length=1, description="the token texts to ban")
        penalty: float = Field(1000.0, gt=0, description="subtracted from their logits")

    def __init__(self, provider, texts, penalty):
        wanted = set(texts)
        self.ids = np.array([t for t in range(provider.vocab_size) if provider.decode([t]) in wanted], dtype=np.intp)
        self.penalty = penalty

    def on_logits(self, logits, continuation_tokens):
        logits[self.ids] -= self.penalty
        return logits
'''

GIVE_UP = '''
from backtrack_sampler.strategy.base_strategy import BaseStrategy, ConstraintError


class GiveUp(BaseStrategy):
    """Holds every token back and gives up at the third."""

    hard_constraint = True
    reads_probs = edits_logits = False

    def get_keep_index(self):
        return 0

    def backtrack(self, continuation_tokens):
        if len(continuation_tokens) >= 3:
            raise ConstraintError("three tokens are too many")
        return continuation_tokens
'''

NOT_A_STRATEGY = """
class Helper:
    pass


def broken(:
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The strategy files, in a tmp dir outside the package; ``pkgs`` holds the package ``mystrategies``."""
    root = tmp_path_factory.mktemp("user_strategies")
    for name, text in [
        ("no_digits.py", NO_DIGITS),
        ("max_word_length.py", MAX_WORD_LENGTH),
        ("give_up.py", GIVE_UP),
        ("helper.py", "class Helper:\n    pass\n"),
        ("broken.py", NOT_A_STRATEGY),
    ]:
        (root / name).write_text(textwrap.dedent(text))
    package = root / "pkgs" / "mystrategies"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "bans.py").write_text(BAN_TOKENS)
    assert not str(root).startswith(str(ROOT / "backtrack_sampler"))
    return root


@pytest.fixture
def on_path(files, monkeypatch):
    """``mystrategies`` importable (as an installed package would be)."""
    monkeypatch.syspath_prepend(str(files / "pkgs"))
    return files


@pytest.fixture
def fake():
    return FakeProvider(context_length=256)


def greedy(provider, strategy, prompt="the", tokens=40):
    sampler = BacktrackSampler(provider, strategy)
    text = provider.decode(list(sampler.generate(prompt, max_new_tokens=tokens, temperature=0)))
    return text, sampler.stats


def digits(text: str) -> int:
    return sum(c.isdigit() for c in text)


def longest_word(text: str) -> int:
    return max((len(w) for w in re.findall(r"[^\W\d_]+", text)), default=0)


# --- Python --------------------------------------------------------------------------------------
def test_a_file_strategy_with_backtrack_sampler(files, fake):
    NoDigits = load_class(f"{files}/no_digits.py:NoDigits")
    assert issubclass(NoDigits, BaseStrategy) and public_name(NoDigits) == "NoDigits"
    plain, _ = greedy(fake, BaseStrategy())
    assert digits(plain) >= 2  # the fake model writes digits: the strategy has work to do
    text, _ = greedy(fake, NoDigits(fake))
    assert text and digits(text) == 0
    once, _ = greedy(fake, NoDigits(fake, max_bans=1))
    assert digits(once) > 0 and once != plain  # one ban, then digits pass
    assert load_class(f"{files}/no_digits.py:NoDigits") is NoDigits  # the file is imported once


def test_a_rewinding_file_strategy_holds_its_word_length(files, fake):
    MaxWordLength = load_class(f"{files}/max_word_length.py:MaxWordLength")
    plain, _ = greedy(fake, BaseStrategy(), tokens=60)
    assert longest_word(plain) > 6
    strategy = MaxWordLength(fake, max_letters=6)
    assert strategy.capabilities == (False, True, True)
    text, stats = greedy(fake, strategy, tokens=60)
    assert stats.rewinds > 0 and stats.finish_reason == "length", stats
    assert text and longest_word(text) <= 6, text
    assert all(event.reason == "a word longer than 6 letters" for event in stats.events)


def test_file_strategies_in_a_batch(files, fake):
    NoDigits = load_class(f"{files}/no_digits.py:NoDigits")
    MaxWordLength = load_class(f"{files}/max_word_length.py:MaxWordLength")
    scheduler = BatchScheduler(fake, parallel=2)
    a = scheduler.submit("the", NoDigits(fake), max_new_tokens=40, temperature=0)
    b = scheduler.submit("the", MaxWordLength(fake, max_letters=6), max_new_tokens=60, temperature=0)
    list(scheduler.run())
    assert a.error is None and b.error is None
    assert a.text == greedy(fake, NoDigits(fake))[0] and digits(a.text) == 0
    assert b.text == greedy(fake, MaxWordLength(fake, max_letters=6), tokens=60)[0] and longest_word(b.text) <= 6


def test_a_registry_names_builtins_and_loaded_classes(files, on_path):
    strategies = StrategyRegistry()
    samplers = ["penalties", "dry", "xtc", "typical", "logit_bias"]
    assert strategies.names() == [
        "none",
        "antislop",
        "creative",
        "adaptive",
        "replace",
        "debug",
        "human",
        "repetition",
        "grammar",
        "confidence",
        *samplers,
    ]
    assert strategies.names(per_request=True) == [
        "none",
        "antislop",
        "creative",
        "adaptive",
        "replace",
        "repetition",
        "grammar",
        "confidence",
        *samplers,
    ]
    loaded = strategies.load(f"{files}/no_digits.py:NoDigits")
    assert loaded.name == "NoDigits" and strategies.get("NoDigits") is loaded
    assert strategies.load(f"{files}/no_digits.py:NoDigits") is loaded  # loading it again is a no-op
    bans = strategies.load("mystrategies.bans:BanTokens")
    assert bans.name == "ban-tokens"  # its `name` attribute
    # a built-in by its module path is the built-in
    creative = strategies.resolve("backtrack_sampler.strategy.creative_writing_strategy:CreativeWritingStrategy")
    assert creative is strategies.get("creative")
    assert strategies.names(per_request=True)[-2:] == ["NoDigits", "ban-tokens"]


def test_a_name_is_taken_once(files):
    strategies = StrategyRegistry()
    strategies.load(f"{files}/no_digits.py:NoDigits")

    class NoDigits(BaseStrategy):
        pass

    with pytest.raises(UsageError, match="already registered"):
        strategies.register(NoDigits)

    class Renamed(BaseStrategy):
        name = "antislop"

    with pytest.raises(UsageError, match="'antislop' is already registered"):
        strategies.register(Renamed)

    class BadName(BaseStrategy):
        name = "my/strategy"

    with pytest.raises(UsageError, match="must be letters"):
        strategies.register(BadName)


@pytest.mark.parametrize(
    "reference, words",
    [
        ("{files}/missing.py:NoDigits", ["strategy file not found", "missing.py"]),
        ("{files}/no_digits.py:Nope", ["has no class 'Nope'"]),
        ("{files}/helper.py:Helper", ["not a strategy", "BaseStrategy"]),
        ("{files}/broken.py:Helper", ["cannot import", "SyntaxError"]),
        ("os.path:join", ["not a strategy"]),
        ("no_such_package.module:Class", ["no module named 'no_such_package.module'"]),
        ("magic", ["unknown strategy 'magic'", "package.module:Class"]),
    ],
)
def test_bad_references_are_usage_errors(files, reference, words):
    with pytest.raises(UsageError) as raised:
        StrategyRegistry().resolve(reference.format(files=files))
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


def test_parameters_from_type_hints(files, on_path):
    strategies = StrategyRegistry()
    no_digits = strategies.load(f"{files}/no_digits.py:NoDigits")
    assert no_digits.validate({"max_bans": 3}) == {"max_bans": 3}
    assert no_digits.validate({}) == {}  # left out: the constructor's default
    for wrong in ("3", 3.5, True, None):
        with pytest.raises(Exception) as raised:
            no_digits.validate({"max_bans": wrong})
        assert raised.value.errors()[0]["loc"] == ("max_bans",)
    schema = no_digits.schema()
    assert schema["parameters"]["properties"]["max_bans"] == {"default": 100, "title": "Max Bans", "type": "integer"}
    assert schema["description"].startswith("Never writes a digit")
    assert schema["capabilities"] == {"reads_probs": False, "edits_logits": True, "hard_constraint": False}
    # the built-ins' parameters come from their constructors the same way
    antislop = strategies.get("antislop").schema()["parameters"]
    assert antislop["required"] == ["slops"] and "on_accept" not in antislop["properties"]  # a callable: not JSON
    assert "provider" not in antislop["properties"]
    assert "file" not in strategies.get("debug").schema()["parameters"]["properties"]  # a file: not JSON
    replace = strategies.get("replace").schema()["parameters"]["properties"]
    assert {"find", "replace", "whole_words"} <= set(replace)  # **kwargs: AntiSlop's optional parameters


def test_a_declared_params_model(on_path, fake):
    bans = StrategyRegistry().load("mystrategies.bans:BanTokens")
    assert bans.validate({"texts": [" quickly"]}) == {"texts": [" quickly"], "penalty": 1000.0}
    schema = bans.schema()["parameters"]
    assert schema["properties"]["texts"]["description"] == "the token texts to ban" and schema["required"] == ["texts"]
    for params, param in [
        ({"texts": []}, "texts"),
        ({"texts": [" quickly"], "penalty": "1"}, "penalty"),
        ({"texts": [" quickly"], "oops": 1}, "oops"),
        ({}, "texts"),
    ]:
        with pytest.raises(UsageError, match=f"parameter '{param}'"):
            bans.make(fake, params)
    plain, _ = greedy(fake, BaseStrategy())
    assert " quickly" in plain
    text, _ = greedy(fake, bans.make(fake, {"texts": [" quickly"]}))
    assert " quickly" not in text


def test_json_types_of_hints():
    from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, TextIO, Tuple, Union

    assert json_type(Sequence[float]) == List[float]
    assert json_type(Optional[Iterable[str]]) == Optional[List[str]]
    assert json_type(Tuple[int, ...]) == List[int]
    assert (
        json_type(Union[Iterable[str], Iterable[tuple], Dict[str, float]])
        == Union[Dict[str, float], List[Union[str, List[Any]]]]
    )
    assert json_type(Optional[Callable[[int], None]]) is json_type(TextIO)  # neither has a JSON form


# --- the command line ------------------------------------------------------------------------------
def run(argv):
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(argv, stdin=io.StringIO(""), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def fake_model(monkeypatch):
    provider = FakeProvider(context_length=256)
    monkeypatch.setattr(cli_model, "load_provider", lambda *args, **kwargs: provider)
    return provider


GREEDY = ["generate", "the", "--max-new-tokens", "40", "--temperature", "0"]


def test_generate_with_a_file_strategy_and_its_args(files, fake_model):
    spec = f"{files}/no_digits.py:NoDigits"
    status, plain, err = run(GREEDY)
    assert status == 0 and digits(plain) >= 2
    status, out, err = run(GREEDY + ["--strategy", spec])
    assert status == 0 and err == "" and digits(out) == 0 and out.strip()
    status, once, err = run(GREEDY + ["--strategy", spec, "--strategy-args", '{"max_bans": 1}'])
    assert status == 0 and digits(once) > 0 and once != plain
    assert once == greedy(fake_model, load_class(spec)(fake_model, max_bans=1))[0] + "\n"


def test_generate_chains_strategies_in_order_with_the_flags(files, fake_model, on_path):
    argv = GREEDY + [
        "--strategy",
        f"{files}/no_digits.py:NoDigits",
        "--strategy",
        f"{files}/max_word_length.py:MaxWordLength",
        "--strategy-args",
        '{"max_letters": 5}',
        "--strategy",
        "mystrategies.bans:BanTokens",
        "--strategy-args",
        '{"texts": [" quickly"]}',
        "--ban",
        "cat",
        "--show-backtracking",
        "--color",
        "never",
    ]
    plan = cli.strategy_plan(cli.build_parser().parse_args(argv))
    assert [(call.name, call.kwargs) for call in plan] == [
        ("antislop", {"slops": ["cat"]}),
        ("NoDigits", {}),
        ("MaxWordLength", {"max_letters": 5}),
        ("ban-tokens", {"texts": [" quickly"], "penalty": 1000.0}),
    ]
    status, out, err = run(argv)
    assert status == 0, err
    text = out.rstrip("\n")
    assert text and digits(text) == 0 and longest_word(text) <= 5 and " quickly" not in text and "cat" not in text
    assert "rewound in" in err


@pytest.mark.parametrize(
    "extra, words",
    [
        (
            ["--strategy", "{files}/no_digits.py:NoDigits", "--strategy-args", '{"max_bans": "3"}'],
            ["parameter 'max_bans'", "valid integer", "'3'", "no_digits.py:NoDigits"],
        ),
        (
            ["--strategy", "{files}/no_digits.py:NoDigits", "--strategy-args", '{"max_bams": 3}'],
            ["parameter 'max_bams'", "it takes: max_bans"],
        ),
        (["--strategy", "{files}/no_digits.py:NoDigits", "--strategy-args", '{"max_bans": 3'], ["not valid JSON"]),
        (["--strategy", "{files}/no_digits.py:NoDigits", "--strategy-args", "[3]"], ["must be a JSON object"]),
        (["--strategy", "{files}/missing.py:NoDigits"], ["strategy file not found"]),
        (["--strategy", "{files}/no_digits.py:Missing"], ["has no class 'Missing'"]),
        (["--strategy", "{files}/helper.py:Helper"], ["not a strategy"]),
        (["--strategy", "no_digits.py"], ["not a strategy reference", "path/to/file.py:Class"]),
        (["--strategy", "creative", "--strategy-args", '{"top_p_flat": "high"}'], ["parameter 'top_p_flat'"]),
    ],
)
def test_generate_strategy_errors_are_one_line(files, fake_model, extra, words):
    status, out, err = run(GREEDY + [arg.replace("{files}", str(files)) for arg in extra])
    lines = err.strip().splitlines()
    assert status == 1 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_a_hard_constraint_that_cannot_hold_is_an_error_not_a_stop(files, fake_model):
    status, out, err = run(
        GREEDY + ["--strategy", f"{files}/give_up.py:GiveUp", "--show-backtracking", "--color", "never"]
    )
    assert status == cli.CONSTRAINT_EXIT == 3
    lines = err.strip().splitlines()
    assert "finish: constraint]" in lines[0]
    assert lines[-1] == (
        "error: the generation stopped: a hard constraint could not be held "
        "(GiveUp: three tokens are too many); the text above ends before it"
    )
    assert out == "\n"  # nothing was final: nothing is printed
    status, _, err = run(GREEDY + ["--strategy", f"{files}/give_up.py:GiveUp", "--ban", "zzz"])  # in a chain
    assert status == 3 and "(GiveUp: three tokens are too many)" in err


def test_a_spent_rewind_budget_ends_a_hard_constraint_with_exit_status_3(files, fake_model):
    spec = f"{files}/max_word_length.py:MaxWordLength"
    status, out, err = run(GREEDY + ["--strategy", spec, "--strategy-args", '{"max_letters": 0}'])
    assert status == 0 and longest_word(out) == 0, err  # the budget is large enough for no words at all
    status, out, err = run(
        GREEDY + ["--strategy", spec, "--strategy-args", '{"max_letters": 0}', "--max-rewound-tokens", "5"]
    )
    assert status == 3 and longest_word(out) == 0
    assert err.strip().splitlines() == [
        "error: the generation stopped: a hard constraint could not be held (MaxWordLength: rewound 5 tokens "
        "(max_rewound_tokens=5) without satisfying its constraint); the text above ends before it"
    ]


def test_serve_loads_its_strategies_before_the_model(files, monkeypatch, on_path):
    from backtrack_sampler.server import app as server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda **kwargs: seen.update(kwargs))
    assert (
        cli.main(
            [
                "serve",
                "--load-strategy",
                f"{files}/no_digits.py:NoDigits",
                "--load-strategy",
                "mystrategies.bans:BanTokens",
            ]
        )
        == 0
    )
    assert seen["strategies"].names(per_request=True)[-2:] == ["NoDigits", "ban-tokens"]
    status, _, err = run(["serve", "--load-strategy", f"{files}/missing.py:X"])
    assert status == 1 and err.strip() == f"error: strategy file not found: {files}/missing.py"


# --- the server --------------------------------------------------------------------------------------
@pytest.fixture
def client(files, on_path, fake):
    engine = Engine(fake, "fake")
    app = create_app(
        engine,
        strategies=[
            f"{files}/no_digits.py:NoDigits",
            "mystrategies.bans:BanTokens",
            f"{files}/max_word_length.py:MaxWordLength",
        ],
    )
    with TestClient(app) as test_client:
        yield test_client
    engine.close()


def complete(client, **body):
    response = client.post("/v1/completions", json={"prompt": "the", "max_tokens": 40, "temperature": 0, **body})
    return response


def assert_400(response, param):
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"].startswith(param), error
    return error


def test_the_server_lists_its_strategies_with_their_parameters(client):
    data = client.get("/v1/backtrack/strategies").json()["data"]
    names = [entry["name"] for entry in data]
    assert names == [
        "none",
        "antislop",
        "creative",
        "adaptive",
        "replace",
        "repetition",
        "grammar",
        "confidence",
        "penalties",
        "dry",
        "xtc",
        "typical",
        "logit_bias",
        "NoDigits",
        "ban-tokens",
        "MaxWordLength",
    ]
    entry = data[names.index("NoDigits")]
    assert entry["parameters"]["properties"] == {"max_bans": {"default": 100, "title": "Max Bans", "type": "integer"}}
    assert entry["description"].startswith("Never writes a digit") and entry["builtin"] is False
    creative = data[names.index("creative")]["parameters"]["properties"]
    assert creative["top_p_flat"]["type"] == "number" and creative["top_p_flat"]["default"] == 0.65
    assert data[names.index("MaxWordLength")]["capabilities"]["hard_constraint"] is True


def test_a_loaded_strategy_is_used_by_name(client, fake):
    plain = complete(client).json()["choices"][0]["text"]
    assert digits(plain) >= 2
    answer = complete(client, strategy=[{"name": "NoDigits", "max_bans": 100}]).json()
    text = answer["choices"][0]["text"]
    assert text and digits(text) == 0
    assert text == greedy(fake, load_class_from(client, "NoDigits")(fake))[0]
    once = complete(client, strategy={"name": "NoDigits", "max_bans": 1}).json()["choices"][0]["text"]
    assert digits(once) > 0 and once != plain
    chained = complete(
        client,
        max_tokens=60,
        strategy=[
            "NoDigits",
            {"name": "MaxWordLength", "max_letters": 5},
            {"name": "ban-tokens", "texts": [" quickly"]},
        ],
    ).json()
    text = chained["choices"][0]["text"]
    assert (
        digits(text) == 0 and longest_word(text) <= 5 and " quickly" not in text and chained["backtrack"]["rewinds"] > 0
    )


def load_class_from(client, name):
    return client.app.state.strategies.get(name).cls


@pytest.mark.parametrize(
    "strategy, param, code",
    [
        ([{"name": "NoDigits", "max_bans": "many"}], "strategy[0].max_bans", "invalid_type"),
        (["NoDigits", {"name": "NoDigits", "max_bans": 2.5}], "strategy[1].max_bans", "invalid_type"),
        ([{"name": "NoDigits", "bans": 3}], "strategy[0].bans", "unknown_parameter"),
        ([{"name": "ban-tokens"}], "strategy[0].texts", "missing_required_parameter"),
        ([{"name": "ban-tokens", "texts": []}], "strategy[0].texts", "invalid_value"),
        ([{"name": "antislop", "slops": ["a"], "on_accept": "print"}], "strategy[0].on_accept", "unknown_parameter"),
        ([{"name": "creative", "top_p_flat": "high"}], "strategy[0].top_p_flat", "invalid_type"),
        ([{"name": "os.path:join"}], "strategy[0].name", "invalid_value"),
        ([{"name": "mystrategies.bans:BanTokens"}], "strategy[0].name", "invalid_value"),
        (["/tmp/no_digits.py:NoDigits"], "strategy[0].name", "invalid_value"),
        (["no_digits.py"], "strategy[0].name", "invalid_value"),
        (["debug"], "strategy[0].name", "invalid_value"),
        (["NoSuchThing"], "strategy[0].name", "invalid_value"),
    ],
)
def test_bad_strategies_in_a_request_are_400s(client, strategy, param, code):
    for path in ("/v1/completions", "/v1/backtrack/candidates"):
        response = client.post(path, json={"prompt": "the", "strategy": strategy})
        assert assert_400(response, param)["code"] == code


def test_a_request_never_imports_code(client, files, tmp_path):
    marker = tmp_path / "imported"
    evil = tmp_path / "evil.py"
    evil.write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom backtrack_sampler import BaseStrategy\n"
        "class Evil(BaseStrategy):\n    pass\n"
    )
    for name in (f"{evil}:Evil", "evil:Evil", str(evil)):
        error = assert_400(complete(client, strategy=[{"name": name}]), "strategy[0].name")
        assert "never a module or a file" in error["message"] and "--load-strategy" in error["message"]
    assert not marker.exists() and "evil" not in sys.modules
    assert "Evil" not in client.app.state.strategies


def test_strategy_limits_still_hold_for_loaded_strategies(files, on_path, fake):
    from backtrack_sampler.server.app import Limits

    engine = Engine(fake, "fake")
    app = create_app(engine, limits=Limits(max_banned_strings=2), strategies=[f"{files}/no_digits.py:NoDigits"])
    with TestClient(app) as test_client:
        error = assert_400(
            test_client.post(
                "/v1/completions",
                json={"prompt": "the", "strategy": ["NoDigits", {"name": "antislop", "slops": ["a", "b", "c"]}]},
            ),
            "strategy[1]",
        )
        assert error["code"] == "array_above_max_length"
        ok = test_client.post(
            "/v1/completions",
            json={"prompt": "the", "max_tokens": 4, "strategy": ["NoDigits", {"name": "antislop", "slops": ["a"]}]},
        )
        assert ok.status_code == 200, ok.text
    engine.close()


def test_the_default_app_offers_the_builtins_only(fake):
    engine = Engine(fake, "fake")
    with TestClient(create_app(engine)) as test_client:
        names = [entry["name"] for entry in test_client.get("/v1/backtrack/strategies").json()["data"]]
        assert names == [
            "none",
            "antislop",
            "creative",
            "adaptive",
            "replace",
            "repetition",
            "grammar",
            "confidence",
            "penalties",
            "dry",
            "xtc",
            "typical",
            "logit_bias",
        ]
        assert_400(
            test_client.post("/v1/completions", json={"prompt": "the", "strategy": "NoDigits"}), "strategy[0].name"
        )
    engine.close()


# --- the real command line and server, as subprocesses on the embedded model ----------------------------
YEAR = "The Second World War ended in"  # greedy: " 1945, and the United States was in"


@pytest.mark.model
def test_the_console_script_runs_a_file_strategy(files):
    assert EXE.exists(), f"{EXE} is not installed (pip install -e .)"
    base = [
        str(EXE),
        "generate",
        YEAR,
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--n-ctx",
        "256",
        "--threads",
        "1",
    ]
    plain = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and digits(plain.stdout) >= 4, plain
    result = subprocess.run(
        base + ["--strategy", f"{files}/no_digits.py:NoDigits", "--strategy-args", '{"max_bans": 3}'],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    never = subprocess.run(
        base + ["--strategy", f"{files}/no_digits.py:NoDigits"], capture_output=True, text=True, timeout=300
    )
    assert never.returncode == 0 and re.search(r"[a-z]{3}", never.stdout) and digits(never.stdout) == 0, never
    # three bans, then digits pass: the year is gone, a later number is written
    assert not result.stdout.startswith(plain.stdout[:5]) and digits(result.stdout) > 0, (result.stdout, plain.stdout)
    assert result.stdout != never.stdout
    bad = subprocess.run(
        base + ["--strategy", f"{files}/no_digits.py:NoDigits", "--strategy-args", '{"max_bans": "3"}'],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "parameter 'max_bans'" in bad.stderr


@pytest.mark.model
def test_serve_load_strategy_as_a_subprocess(files):
    import openai
    from serving import serve_subprocess

    args = [
        "--load-strategy",
        f"{files}/no_digits.py:NoDigits",
        "--n-ctx",
        "512",
        "--threads",
        "1",
        "--model-name",
        "tiny",
    ]
    with serve_subprocess(args) as url:
        listed = httpx.get(url + "/v1/backtrack/strategies", timeout=10).json()["data"]
        assert [entry["name"] for entry in listed][-1] == "NoDigits"
        body = {"prompt": YEAR, "max_tokens": 12, "temperature": 0}
        plain = httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        assert digits(plain) >= 4
        with openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=120, max_retries=0) as client:
            answer = client.completions.create(
                model="tiny",
                prompt=YEAR,
                max_tokens=12,
                temperature=0,
                extra_body={"strategy": [{"name": "NoDigits", "max_bans": 100}]},
            )
            assert re.search(r"[a-z]{3}", answer.choices[0].text) and digits(answer.choices[0].text) == 0
            with pytest.raises(openai.BadRequestError) as raised:
                client.completions.create(
                    model="tiny",
                    prompt=YEAR,
                    max_tokens=4,
                    extra_body={"strategy": [{"name": "NoDigits", "max_bans": "lots"}]},
                )
            assert raised.value.body["param"] == "strategy[0].max_bans"
        for name in (f"{files}/no_digits.py:NoDigits", "backtrack_sampler.strategy.debug_strategy:DebugStrategy"):
            response = httpx.post(url + "/v1/completions", json={**body, "strategy": [{"name": name}]}, timeout=30)
            assert response.status_code == 400 and response.json()["error"]["param"] == "strategy[0].name"


def test_a_constraint_that_cannot_hold_is_content_filter_with_the_reason(files, fake):
    engine = Engine(fake, "fake")
    with TestClient(create_app(engine, strategies=[f"{files}/give_up.py:GiveUp"])) as client:
        body = {"prompt": "the", "max_tokens": 20, "temperature": 0, "strategy": ["GiveUp"]}
        answer = client.post("/v1/completions", json=body).json()
        assert answer["choices"][0]["finish_reason"] == "content_filter"
        assert answer["choices"][0]["text"] == "" and answer["usage"]["completion_tokens"] == 0
        assert answer["backtrack"]["constraint"] == "GiveUp: three tokens are too many"
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
        assert chunks[-1]["backtrack"] == {"constraint": "GiveUp: three tokens are too many"}
        plain = client.post("/v1/completions", json={**body, "strategy": []}).json()
        assert plain["choices"][0]["finish_reason"] == "length" and "constraint" not in plain["backtrack"]
    engine.close()
