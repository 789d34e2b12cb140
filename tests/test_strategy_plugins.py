"""Installed plugins: a package declares strategies in the entry-point group
``backtrack_sampler.strategies`` (name -> ``module:Class``). Tested for real: a ``.dist-info``
folder with an ``entry_points.txt`` and a module on ``sys.path`` (importlib.metadata finds them as
it finds an installed package). Found by name like the built-ins (the command line's
``--strategy``, the server's ``--load-strategy``), never by a request to a server that was not
started with them; a built-in name wins over a plugin's (with a warning)."""

from __future__ import annotations

import io
import sys
import textwrap
import warnings

import pytest

from backtrack_sampler import cli
from backtrack_sampler.cli import model as cli_model
from backtrack_sampler.errors import UsageError
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.strategy.registry import (
    ENTRY_POINT_GROUP,
    StrategyRegistry,
    as_registry,
    make_strategy,
    plugin_references,
)

MODULE = "bs_demo_plugin_strategies"  # the plugin's module (removed from sys.modules after each test)

PLUGIN = textwrap.dedent(
    '''
    from backtrack_sampler import BaseStrategy


    class NoDigits(BaseStrategy):
        """Bans every token with a digit (the demo plugin)."""

        reads_probs = False
        edits_logits = True

        def __init__(self, provider, max_bans: int = 3):
            self.max_bans = max_bans
            self.banned = [t for t in range(provider.vocab_size) if any(c.isdigit() for c in provider.decode([t]))]

        def on_logits(self, logits, continuation_tokens):
            logits[self.banned] = float("-inf")
            return logits


    class Shadow(BaseStrategy):
        """Named like a built-in: never used."""
    '''
)

ENTRY_POINTS = f"""\
[{ENTRY_POINT_GROUP}]
no_digits = {MODULE}:NoDigits
antislop = {MODULE}:Shadow
broken = bs_no_such_module:Nothing
"""

SHADOWED = (
    "strategy entry point 'antislop' (bs_demo_plugin_strategies:Shadow, from bs-demo-plugin) is ignored: "
    "the built-in strategy 'antislop' wins over it"
)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """An installed plugin: its module and its dist-info (with entry_points.txt) on sys.path."""
    (tmp_path / f"{MODULE}.py").write_text(PLUGIN)
    info = tmp_path / "bs_demo_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bs-demo-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield tmp_path
    sys.modules.pop(MODULE, None)


def digits(text: str) -> int:
    return sum(c.isdigit() for c in text)


def test_entry_points_are_read_without_importing_and_a_builtin_name_wins(plugin):
    with pytest.warns(UserWarning) as caught:
        found = plugin_references()
    assert found == {"no_digits": f"{MODULE}:NoDigits", "broken": "bs_no_such_module:Nothing"}
    assert [str(w.message) for w in caught] == [SHADOWED]
    assert MODULE not in sys.modules  # read from the metadata: nothing imported


def test_a_plugin_is_found_by_name_and_registered_under_it(plugin):
    registry = StrategyRegistry()
    assert "no_digits" not in registry  # not registered until asked for
    with pytest.warns(UserWarning, match="the built-in strategy 'antislop' wins"):
        kind = registry.resolve("no_digits")
    assert kind.name == "no_digits" and kind.cls.__module__ == MODULE and kind.cls.__name__ == "NoDigits"
    assert registry.get("no_digits", per_request=True) is kind and registry.resolve("no_digits") is kind
    assert list(kind.params.model_fields) == ["max_bans"]
    fake = FakeProvider()
    strategy = kind.make(fake, {"max_bans": 1})
    assert strategy.max_bans == 1 and strategy.banned
    with pytest.raises(UsageError, match="parameter 'max_bans'"):
        kind.make(fake, {"max_bans": "1"})


def test_a_builtin_name_wins_over_a_plugin(plugin):
    registry = StrategyRegistry()
    with pytest.warns(UserWarning) as caught:
        kind = registry.resolve("antislop")
    assert kind.builtin and kind.cls.__name__ == "AntiSlopStrategy"
    assert SHADOWED in [str(w.message) for w in caught]


def test_unknown_and_broken_plugins_are_usage_errors(plugin):
    registry = StrategyRegistry()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UsageError) as raised:
            registry.resolve("magic")
        assert "unknown strategy 'magic'" in str(raised.value)
        assert "or an installed plugin (no_digits, broken)" in str(raised.value)
        with pytest.raises(UsageError, match=r"strategy 'broken' \(entry point bs_no_such_module:Nothing\): no module"):
            registry.resolve("broken")
    assert "broken" not in registry


def test_get_never_loads_a_plugin(plugin):
    """What a request names goes through ``get``: a plugin the server did not load is unknown, and
    nothing is imported for it."""
    registry = StrategyRegistry()
    with pytest.raises(UsageError, match="unknown strategy 'no_digits'"):
        registry.get("no_digits", per_request=True)
    assert MODULE not in sys.modules and "no_digits" not in registry


def test_make_strategy_and_as_registry_take_a_plugin_name(plugin):
    fake = FakeProvider()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert type(make_strategy("no_digits", fake, max_bans=2)).__name__ == "NoDigits"
        registry = as_registry(["no_digits"])
    assert registry.names(per_request=True)[-1] == "no_digits"


def test_the_command_line_runs_a_plugin_by_name(plugin, monkeypatch):
    provider = FakeProvider(context_length=256)
    monkeypatch.setattr(cli_model, "load_provider", lambda *args, **kwargs: provider)

    def run(*extra):
        out, err = io.StringIO(), io.StringIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            status = cli.main(
                ["generate", "the", "--max-new-tokens", "40", "--temperature", "0", *extra],
                stdin=io.StringIO(""),
                stdout=out,
                stderr=err,
            )
        return status, out.getvalue(), err.getvalue()

    status, plain, _ = run()
    assert status == 0 and digits(plain) >= 2
    status, out, err = run("--strategy", "no_digits", "--strategy-args", '{"max_bans": 5}')
    assert status == 0 and err == "" and out.strip() and digits(out) == 0


def test_a_server_offers_a_plugin_only_when_started_with_it(plugin):
    from starlette.testclient import TestClient

    from backtrack_sampler.server.app import Engine, create_app

    fake = FakeProvider()
    body = {"prompt": "the", "max_tokens": 8, "temperature": 0, "strategy": [{"name": "no_digits", "max_bans": 1}]}
    engine = Engine(fake, "fake")
    try:
        with TestClient(create_app(engine)) as client:  # the built-ins only
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 400 and "unknown strategy 'no_digits'" in response.text
            assert MODULE not in sys.modules
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            app = create_app(engine, strategies=["no_digits"])  # as `serve --load-strategy no_digits`
        with TestClient(app) as client:
            names = [entry["name"] for entry in client.get("/v1/backtrack/strategies").json()["data"]]
            assert names[-1] == "no_digits"
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            assert digits(response.json()["choices"][0]["text"]) == 0
    finally:
        engine.close()
