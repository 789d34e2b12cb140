"""The plugin contract of base_strategy.py: a misspelled hook is warned about when its class is
created (the sampler would never call it), and the 4.0 ``needs_probs`` still works both ways."""

from __future__ import annotations

import warnings

import pytest

from backtrack_sampler import BaseStrategy, ChainStrategy
from backtrack_sampler.strategy.base_strategy import HOOKS, Capabilities, misspelled_hooks
from backtrack_sampler.strategy.registry import BUILTINS, load_class


def define(**methods):
    """A BaseStrategy subclass with these methods, made here (the warnings are caught)."""
    return type("Mine", (BaseStrategy,), {name: (lambda self, *args: None) for name in methods})


@pytest.mark.parametrize(
    "name, hook",
    [
        ("on_logit", "on_logits"),
        ("backtrack_", "backtrack"),
        ("onlogits", "on_logits"),
        ("on_next_tokens", "on_next_token"),
        ("get_keep_idx", "get_keep_index"),
        ("on_prob", "on_probs"),
        ("on_rewinds", "on_rewind"),
        ("rest", "reset"),
    ],
)
def test_a_misspelled_hook_warns_when_the_class_is_made(name, hook):
    with pytest.warns(UserWarning) as caught:
        define(**{name: True})
    assert [str(w.message) for w in caught] == [
        f"{__name__}.Mine.{name} looks like a misspelling of the hook {hook!r}: the sampler never calls {name!r}"
    ]
    assert caught[0].filename == __file__  # points at the code that made the class


def test_a_class_statement_is_where_the_warning_points():
    with pytest.warns(UserWarning, match="misspelling of the hook 'on_logits'") as caught:

        class Typo(BaseStrategy):
            def on_logit(self, logits, continuation_tokens):
                return logits

    assert caught[0].filename == __file__ and caught[0].lineno == Typo.on_logit.__code__.co_firstlineno - 1


def test_hooks_helpers_and_inherited_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        define(**dict.fromkeys(HOOKS, True))  # every hook, spelled right
        helper = define(
            allowed=True,
            rewind=True,
            logits=True,
            logprobs=True,
            ban=True,
            complete=True,
            keep=True,
            _rewind=True,  # private: never a hook
            _backtrack=True,
            __call__=True,
        )

        class Child(helper):  # its own names only: nothing new
            def on_logits(self, logits, continuation_tokens):
                return logits

            def rewind(self):  # redefines a base class's method: not a typo
                pass

        class Props(BaseStrategy):
            name = "on_logit"  # an attribute, not a method
            on_prob = 3

            @property
            def capabilitys(self):  # properties are not hooks
                return None


def test_a_name_a_base_class_defines_is_warned_about_once():
    with pytest.warns(UserWarning):
        base = define(on_logit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        type("Sub", (base,), {"on_logit": lambda self, *args: None})


@pytest.mark.parametrize("name", BUILTINS)
def test_no_builtin_strategy_has_a_misspelled_hook(name):
    cls = load_class(BUILTINS[name])
    assert all(misspelled_hooks(k) == [] for k in cls.__mro__ if issubclass(k, BaseStrategy))
    assert misspelled_hooks(ChainStrategy) == []


# --- the 4.0 needs_probs --------------------------------------------------------------------------
class Legacy(BaseStrategy):  # 4.0: told the sampler with needs_probs, declares nothing
    @property
    def needs_probs(self):
        return False

    def on_next_token(self, continuation_tokens, probs):
        pass


class LegacySuper(BaseStrategy):  # asks the base class (no recursion through capabilities)
    @property
    def needs_probs(self):
        return super().needs_probs


class Declared(BaseStrategy):
    reads_probs = True


def test_the_4_0_needs_probs_still_works_both_ways():
    assert Legacy().capabilities == Capabilities(False, False, False) and not Legacy().needs_probs
    assert not LegacySuper().capabilities.reads_probs and not LegacySuper().needs_probs
    assert Declared().needs_probs and Declared().capabilities.reads_probs
    assert ChainStrategy([Declared(), Legacy()]).needs_probs
    assert not ChainStrategy([Legacy(), LegacySuper()]).needs_probs
