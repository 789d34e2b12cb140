"""The strategies a command line or a server offers, by name, and the chains built from them.

A ``StrategyRegistry`` maps public names to ``StrategyType`` s; the built-ins are registered the
same way a user's class is, from ``BUILTINS`` (imported on first use). A class's public name is
its own ``name`` class attribute, else its class name (references.py). ``resolve`` (the command
line's ``--strategy``) and ``load`` (the server's ``--load-strategy``) also take a
``package.module:Class`` or ``path/to/file.py:Class`` reference, or the name of an installed
plugin (an entry point of the group ``backtrack_sampler.strategies``), and register it; ``get``
(what a request names) never imports anything: a request uses only what the server was started
with.

A ``StrategyType`` checks a JSON object against the strategy's parameter model (params.py) and
builds the strategy; ``StrategyCall`` s make a plan, ``build_strategies`` / ``chain`` one strategy
of it. The names of references.py, params.py and lists.py are re-exported here (``__all__``).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    Union,
)

from ..errors import UsageError
from ..provider.base_provider import BaseProvider
from .base_strategy import BaseStrategy
from .lists import check_regexes, read_regexes, read_slops, read_text
from .params import describe_error, init_parameters, is_model, json_type, params_model
from .references import (
    BUILTINS,
    ENTRY_POINT_GROUP,
    NAME,
    REFERENCE_HELP,
    STRATEGIES,
    TERMINAL_ONLY,
    is_reference,
    load_class,
    plugin_references,
    public_name,
)

T = TypeVar("T")

__all__ = [
    # this module
    "StrategyType",
    "StrategyCall",
    "StrategyRegistry",
    "as_registry",
    "make_strategy",
    "chain",
    "in_chain_order",
    "build_strategies",
    # references.py
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "REFERENCE_HELP",
    "STRATEGIES",
    "TERMINAL_ONLY",
    "is_reference",
    "load_class",
    "plugin_references",
    "public_name",
    # params.py
    "describe_error",
    "init_parameters",
    "json_type",
    "params_model",
    # lists.py
    "check_regexes",
    "read_regexes",
    "read_slops",
    "read_text",
]


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------
class StrategyType:
    """One registered strategy: its public ``name``, the ``reference`` it came from, and,
    imported on first use, its class (``cls``), parameter model (``params``) and description."""

    def __init__(self, name: str, target: Union[str, type], per_request: bool = True):
        self.name, self.per_request, self.builtin = name, per_request, False
        self.reference = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"
        self._cls: Optional[type] = None if isinstance(target, str) else target
        self._params = None

    def __repr__(self) -> str:
        return f"StrategyType({self.name!r}, {self.reference!r})"

    @property
    def cls(self) -> Type[BaseStrategy]:
        if self._cls is None:
            self._cls = load_class(self.reference)
        return self._cls

    @property
    def params(self):
        """The pydantic model of its JSON parameters."""
        if self._params is None:
            from pydantic import PydanticUserError

            try:
                model = params_model(self.cls, self.name)
                model.model_json_schema()
            except (PydanticUserError, TypeError, ValueError) as error:
                raise UsageError(
                    f"strategy {self.name!r}: cannot make a JSON Schema of its parameters: {error}"
                ) from None
            self._params = model
        return self._params

    @property
    def description(self) -> str:
        """Its docstring (its own, not one it inherits)."""
        return inspect.cleandoc(vars(self.cls).get("__doc__") or "")

    def schema(self) -> Dict[str, Any]:
        """Name, description, declared capabilities and the JSON Schema of its parameters."""
        cls = self.cls
        return {
            "name": self.name,
            "description": self.description,
            "builtin": self.builtin,
            "capabilities": {
                "reads_probs": cls.reads_probs,
                "edits_logits": cls.edits_logits,
                "hard_constraint": cls.hard_constraint if isinstance(cls.hard_constraint, bool) else None,
            },
            "parameters": self.params.model_json_schema(),
        }

    def validate(self, params: Mapping[str, Any]) -> Dict[str, Any]:
        """Constructor keyword arguments from the JSON object ``params``; raises pydantic's
        ``ValidationError`` (a wrong type, an unknown or a missing parameter)."""
        model = self.params.model_validate(dict(params))
        declared = is_model(getattr(self.cls, "Params", None))
        names = type(model).model_fields if declared else model.model_fields_set  # else: the constructor's defaults
        return {key: getattr(model, key) for key in names}

    def build(self, provider: BaseProvider, kwargs: Mapping[str, Any]) -> BaseStrategy:
        """The strategy, constructed with ``kwargs`` (validated ones, plus objects a caller adds,
        e.g. a ``file``); ``provider`` is passed to the constructor's parameter of that name, when
        it has one. UsageError when the constructor rejects them (a TypeError or ValueError)."""
        make: Callable[..., BaseStrategy] = self.cls  # its parameters are known at run time only
        try:
            taken = inspect.signature(make).parameters.get("provider")
        except (TypeError, ValueError):
            taken = None
        try:
            if taken is None:
                return make(**kwargs)
            if taken.kind is taken.POSITIONAL_ONLY:
                return make(provider, **kwargs)
            return make(provider=provider, **kwargs)
        except (TypeError, ValueError, re.error) as error:
            raise UsageError(f"strategy {self.name!r}: {error}") from None

    def make(
        self,
        provider: BaseProvider,
        params: Mapping[str, Any],
        extra: Optional[Mapping[str, Any]] = None,
        where: Optional[str] = None,
    ) -> BaseStrategy:
        """``build(provider, validate(params) + extra)``; a parameter error is a UsageError
        naming the parameter (prefixed with ``where``, default: the strategy's name)."""
        return StrategyCall(self, self.checked(params, where), dict(extra or {})).build(provider)

    def explain(
        self, error, prefix: Sequence[Union[str, int]] = (), says_value: Iterable[str] = ()
    ) -> Tuple[Optional[str], str, str]:
        """``describe_error`` of a ``validate`` error; an unknown parameter's message lists the known ones."""
        param, message, kind = describe_error(error, prefix, {"missing", "extra_forbidden", *says_value})
        if kind == "extra_forbidden":
            known = ", ".join(self.params.model_fields)
            message = f"{self.name} has no such parameter " + (f"(it takes: {known})" if known else "(it takes none)")
        return param, message, kind

    def checked(self, params: Mapping[str, Any], where: Optional[str] = None) -> Dict[str, Any]:
        """``validate(params)``, with a parameter error as a UsageError naming the parameter."""
        from pydantic import ValidationError

        try:
            return self.validate(params)
        except ValidationError as error:
            param, message, _ = self.explain(error)
            where = where or f"strategy {self.name!r}"
            raise UsageError(
                f"{where}: {message}" if param is None else f"{where}: parameter {param!r}: {message}"
            ) from None


@dataclass
class StrategyCall:
    """One strategy of a chain, ready to build: its type and validated keyword arguments
    (``extra``: objects added by the caller, not from JSON; ``scope``: "reasoning", "answer" or
    "both", see ``scope.ScopedStrategy``; None: ``scope.default_scope``)."""

    type: StrategyType
    kwargs: Dict[str, Any]
    extra: Optional[Dict[str, Any]] = None
    scope: Optional[str] = None

    @property
    def name(self) -> str:
        return self.type.name

    def build(self, provider: BaseProvider) -> BaseStrategy:
        return self.type.build(provider, {**self.kwargs, **(self.extra or {})})


class StrategyRegistry:
    """Public name -> ``StrategyType``. Starts with ``BUILTINS`` (registered lazily, the
    terminal-only ones not offered per request); ``load`` adds a user's class, by reference or
    by the name of an installed plugin::

        strategies = StrategyRegistry()
        strategies.load("my_strategies.py:NoDigits")     # now offered as "NoDigits"
        strategies.load("no_digits")                     # an entry point of backtrack_sampler.strategies
        strategies.get("NoDigits").make(provider, {"max_bans": 3})

    Installed plugins are not registered until loaded: ``get`` (what a request names) offers
    only the built-ins and what was loaded, so a request never makes a server import code.
    """

    def __init__(self, builtins: Mapping[str, str] = BUILTINS):
        self._types: Dict[str, StrategyType] = {}
        self._builtins = dict(builtins)
        self._plugins: Optional[Dict[str, str]] = None
        for name, reference in builtins.items():
            self.register(reference, name, per_request=name not in TERMINAL_ONLY).builtin = True

    def __iter__(self) -> Iterator[StrategyType]:
        return iter(list(self._types.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def names(self, per_request: bool = False) -> List[str]:
        """The registered names (``per_request``: only those a request may use)."""
        return [t.name for t in self._types.values() if t.per_request or not per_request]

    def plugins(self) -> Dict[str, str]:
        """Name -> ``module:Class`` of the installed plugins (entry points of the group
        ``backtrack_sampler.strategies``), read once per registry, nothing imported; one named
        like a built-in is left out with a UserWarning (``references.plugin_references``)."""
        if self._plugins is None:
            self._plugins = plugin_references(self._builtins)
        return dict(self._plugins)

    def register(self, target: Union[str, type], name: Optional[str] = None, per_request: bool = True) -> StrategyType:
        """Add a strategy class (or a ``module:Class`` / ``file.py:Class`` reference, imported
        now unless ``name`` is given) under ``name`` (default: its public name). A class that is
        already registered is returned as it is; another class under a taken name is a UsageError."""
        cls = None
        if not isinstance(target, str) or name is None:
            cls = target if not isinstance(target, str) else load_class(target)
            if not (isinstance(cls, type) and issubclass(cls, BaseStrategy)):
                raise UsageError(f"{cls!r} is not a strategy: it must be a subclass of BaseStrategy")
            for known in self._types.values():
                if known._cls is cls or known.reference == f"{cls.__module__}:{cls.__qualname__}":
                    return known
            name = name or public_name(cls)
        if not NAME.fullmatch(name):
            raise UsageError(f"strategy name {name!r} must be letters, digits, _ and - (set the class's `name`)")
        if name in self._types:
            raise UsageError(
                f"a strategy named {name!r} is already registered ({self._types[name].reference}): "
                "give the new class another `name` attribute"
            )
        entry = StrategyType(name, cls if cls is not None else target, per_request)
        self._types[name] = entry
        return entry

    def load(self, spec: str) -> StrategyType:
        """The strategy ``spec`` names, registered now if it was not: ``package.module:Class`` or
        ``path/to/file.py:Class`` (imported, offered under its public name), or the name of an
        installed plugin (imported, offered under the entry point's name). A registered name is
        returned as it is (a built-in wins over a plugin of the same name, with a warning).
        UsageError when it is none of these or cannot be imported."""
        if is_reference(spec):
            return self.register(spec)
        known = self._types.get(spec)
        if known is not None:
            if known.builtin:
                self.plugins()  # warns when an installed plugin has this name
            return known
        reference = self.plugins().get(spec)
        if reference is None:
            raise UsageError(f"unknown strategy {spec!r}: use " + self.help())
        try:
            cls = load_class(reference)
        except UsageError as error:
            raise UsageError(f"strategy {spec!r} (entry point {reference}): {error}") from None
        return self.register(cls, spec)

    def resolve(self, spec: str) -> StrategyType:
        """The command line's ``--strategy``: ``load(spec)``."""
        return self.load(spec)

    def get(self, name: str, per_request: bool = False) -> StrategyType:
        """The strategy registered as ``name``; never imports anything new. UsageError naming the
        choices when there is none (``per_request``: when a request may not use it)."""
        entry = self._types.get(name)
        if entry is None or (per_request and not entry.per_request):
            names = ", ".join(self.names(per_request))
            if entry is not None:
                raise UsageError(
                    f"strategy {name!r} needs a terminal: it is for the command line only (offered: {names})"
                )
            raise UsageError(f"unknown strategy {name!r}: choose one of {names}")
        return entry

    def help(self) -> str:
        """What ``load`` takes, in words, with the registered names and the installed plugins'."""
        text = REFERENCE_HELP.format(", ".join(self.names()))
        plugins = [name for name in self.plugins() if name not in self._types]
        return text + (f", or an installed plugin ({', '.join(plugins)})" if plugins else "")


def as_registry(strategies: Union[None, StrategyRegistry, Iterable[Union[str, type]]]) -> StrategyRegistry:
    """``strategies`` as a registry: itself, or the built-ins plus each class, reference or
    installed plugin's name given (``StrategyRegistry.load``)."""
    if isinstance(strategies, StrategyRegistry):
        return strategies
    registry = StrategyRegistry()
    for target in strategies or ():
        if isinstance(target, str):
            registry.load(target)
        else:
            registry.register(target)
    return registry


def make_strategy(name: str, provider: BaseProvider, **params: Any) -> BaseStrategy:
    """Build the strategy ``name`` (a built-in, a reference or an installed plugin's name) with
    JSON parameters ``params`` (validated). Raises UsageError for an unknown name, a wrong
    parameter, or a value the constructor rejects."""
    registry = StrategyRegistry()
    kind = registry.get(name) if name in registry else registry.load(name)
    return kind.make(provider, params)


def chain(strategies: Sequence[BaseStrategy]) -> BaseStrategy:
    """One strategy from several (a ChainStrategy when there is more than one)."""
    strategies = [s for s in strategies if type(s) is not BaseStrategy] or [BaseStrategy()]
    if len(strategies) == 1:
        return strategies[0]
    from .chain_strategy import ChainStrategy

    try:
        return ChainStrategy(strategies)
    except TypeError as error:
        raise UsageError(f"cannot combine strategies: {error}") from None


def in_chain_order(
    samplers: Sequence[T] = (), bans: Optional[T] = None, strategies: Sequence[T] = (), grammar: Optional[T] = None
) -> List[T]:
    """The one order in which options become a chain, for the command line, the batch command and
    the server alike: the samplers a frontend turns on (logit bias, penalties, DRY, typical-p, XTC)
    first, then the bans (AntiSlop), then the strategies named, in the order given, then the grammar
    of structured output, last so that its mask has the last word."""
    return [*samplers, *([] if bans is None else [bans]), *strategies, *([] if grammar is None else [grammar])]


def build_strategies(plan: Sequence[StrategyCall], provider: BaseProvider, prompt: Sequence[int] = ()) -> BaseStrategy:
    """The strategy for a plan of ``StrategyCall`` s: one, a ChainStrategy of several, or BaseStrategy;
    each scoped as its ``scope`` says (the ``prompt`` tokens tell whether a reasoning block is open)."""
    from .scope import default_scope, scoped

    return chain(
        [
            scoped(provider, call.build(provider), call.scope or default_scope(call.name, provider), prompt)
            for call in plan
        ]
    )
