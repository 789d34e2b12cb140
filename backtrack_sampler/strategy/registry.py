"""Strategies by reference, for the command line and the server, and the readers of slop-phrase
and regex files.

A strategy is named by a registered name (a built-in: ``"antislop"``, ... or one loaded
earlier), ``package.module:Class`` or ``path/to/file.py:Class``. A ``StrategyRegistry`` maps
public names to ``StrategyType`` s; the built-ins are registered the same way a user's class is,
from ``BUILTINS`` (imported on first use). A class's public name is its own ``name`` class
attribute, else its class name.

Parameters are declared by the strategy: a pydantic model it names as its ``Params`` class
attribute (the constructor is called with every field as a keyword argument), else its
constructor's signature and type hints (an unannotated parameter takes any JSON value; one whose
type has no JSON form, such as a file or a callable, is not settable from JSON; a ``**kwargs``
constructor also takes the optional parameters of its parent class's). ``StrategyType.validate``
checks a JSON object against them, strictly (a string is not a number), the one check for the
command line and the server.
"""

from __future__ import annotations

import collections.abc as abc
import enum
import hashlib
import importlib
import importlib.util
import inspect
import json
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, Union

from ..errors import UsageError
from ..provider.base_provider import BaseProvider
from ._regex import compile_regex
from .base_strategy import BaseStrategy

BUILTINS: Dict[str, str] = {
    "none": "backtrack_sampler.strategy.base_strategy:BaseStrategy",
    "antislop": "backtrack_sampler.strategy.antislop_strategy:AntiSlopStrategy",
    "creative": "backtrack_sampler.strategy.creative_writing_strategy:CreativeWritingStrategy",
    "adaptive": "backtrack_sampler.strategy.adaptive_temperature_strategy:AdaptiveTemperatureStrategy",
    "replace": "backtrack_sampler.strategy.replace_strategy:ReplaceStrategy",
    "debug": "backtrack_sampler.strategy.debug_strategy:DebugStrategy",
    "human": "backtrack_sampler.strategy.human_guidance_strategy:HumanGuidanceStrategy",
    "repetition": "backtrack_sampler.strategy.repetition_strategy:RepetitionStrategy",
    "grammar": "backtrack_sampler.strategy.grammar_strategy:GrammarStrategy",
    "confidence": "backtrack_sampler.strategy.confidence_strategy:ConfidenceStrategy",
    "penalties": "backtrack_sampler.strategy.penalty_strategy:PenaltyStrategy",
    "dry": "backtrack_sampler.strategy.dry_strategy:DryStrategy",
    "xtc": "backtrack_sampler.strategy.xtc_strategy:XtcStrategy",
    "typical": "backtrack_sampler.strategy.typical_strategy:TypicalStrategy",
    "logit_bias": "backtrack_sampler.strategy.logit_bias_strategy:LogitBiasStrategy",
}
TERMINAL_ONLY = ("debug", "human")  # they write to / read from a terminal: command line only, never per request
STRATEGIES = tuple(BUILTINS)  # the built-in names
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
REFERENCE_HELP = "a built-in name ({}), package.module:Class or path/to/file.py:Class"


def is_reference(text: str) -> bool:
    """True for a module or file reference (``a.b:C``, ``x.py:C``, a path), False for a plain name."""
    return ":" in text or "/" in text or "\\" in text or text.endswith(".py")


def public_name(cls: type) -> str:
    """The name a strategy class is offered under: its own ``name`` class attribute (not an
    inherited one), else its class name."""
    name = vars(cls).get("name")
    return name if isinstance(name, str) and name else cls.__name__


# --------------------------------------------------------------------------------------------
# references -> classes
# --------------------------------------------------------------------------------------------
def load_class(reference: str) -> Type[BaseStrategy]:
    """The ``BaseStrategy`` subclass ``reference`` names: ``package.module:Class`` or
    ``path/to/file.py:Class`` (the file is imported once, as its own module). UsageError when the
    module or file is missing, fails to import, has no such class, or it is not a strategy."""
    where, colon, attribute = reference.rpartition(":")
    if not colon or not where or not attribute:
        raise UsageError(
            f"{reference!r} is not a strategy reference: use " + REFERENCE_HELP.format(", ".join(BUILTINS))
        )
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    module = _import_file(where) if is_file else _import_module(where)
    target: Any = module
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise UsageError(f"{where} has no class {attribute!r}")
    if not (isinstance(target, type) and issubclass(target, BaseStrategy)):
        raise UsageError(f"{reference} is not a strategy: it must be a subclass of BaseStrategy")
    return target


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name and name.startswith(error.name):
            raise UsageError(f"no module named {name!r} (is it installed, or on PYTHONPATH?)") from None
        raise UsageError(f"cannot import {name}: {error}") from None
    except Exception as error:
        raise UsageError(f"cannot import {name}: {type(error).__name__}: {error}") from None


def _import_file(where: str):
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        raise UsageError(f"strategy file not found: {where}")
    name = f"_strategy_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {where}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as import does (dataclasses, pickling and typing look it up there)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise UsageError(f"cannot import {where}: {type(error).__name__}: {error}") from None
    return module


# --------------------------------------------------------------------------------------------
# parameters: a pydantic model per strategy
# --------------------------------------------------------------------------------------------
_NO_JSON = object()  # a type that has no JSON form
_SEQUENCES = {list, tuple, set, frozenset, abc.Iterable, abc.Collection, abc.Sequence, abc.MutableSequence, abc.Set}
_MAPPINGS = {dict, abc.Mapping, abc.MutableMapping}


def json_type(hint: Any) -> Any:
    """The JSON-shaped type pydantic validates a parameter with, from its type hint (``_NO_JSON``
    when it has none): sequences become lists, mappings dicts with string keys, union members
    without a JSON form are dropped (and a union of lists is a list of any of their items)."""
    if hint is inspect.Parameter.empty or hint is Any:
        return Any
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        inner = json_type(args[0])
        return inner if inner is _NO_JSON else typing.Annotated[(inner, *hint.__metadata__)]
    if hint in (str, int, float, bool, type(None)) or origin is typing.Literal:
        return hint
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint
    if _is_model(hint):
        return hint
    if origin is Union or type(hint).__name__ == "UnionType":  # Union[...], X | Y
        members = [m for m in map(json_type, args) if m is not _NO_JSON]
        items = [typing.get_args(m)[0] for m in members if typing.get_origin(m) is list]
        if len(items) > 1:
            members = [m for m in members if typing.get_origin(m) is not list] + [List[Union[tuple(items)]]]
        if all(m is type(None) for m in members):
            return _NO_JSON
        return Union[tuple(members)] if len(members) > 1 else members[0]
    if (origin or hint) in _SEQUENCES:
        if origin is tuple and args and args[-1] is not Ellipsis:
            item = json_type(Union[args])  # a fixed-size tuple: a list of its item types
        else:
            item = json_type(args[0]) if args else Any
        return _NO_JSON if item is _NO_JSON else List[item]
    if (origin or hint) in _MAPPINGS:
        value = json_type(args[1]) if len(args) == 2 else Any
        return _NO_JSON if value is _NO_JSON else Dict[str, value]
    return _NO_JSON


def _is_model(cls: Any) -> bool:
    from pydantic import BaseModel

    return isinstance(cls, type) and issubclass(cls, BaseModel)


def _init_parameters(cls: type) -> List[Tuple[inspect.Parameter, Any]]:
    """``(parameter, type hint)`` of the keyword parameters ``cls(...)`` takes, without ``self``
    and ``provider``; a ``**kwargs`` constructor adds its parent's optional parameters."""
    owner = next((k for k in cls.__mro__ if "__init__" in vars(k)), object)
    if owner is object:
        return []
    init = vars(owner)["__init__"]
    try:
        parameters = inspect.signature(init).parameters
    except (TypeError, ValueError):
        return []
    try:
        hints = typing.get_type_hints(init, include_extras=True)
    except Exception:  # a hint that names something not importable at run time: accept any value
        hints = {}
    found = [
        (p, hints.get(key, p.annotation if not isinstance(p.annotation, str) else inspect.Parameter.empty))
        for key, p in list(parameters.items())[1:]
        if key != "provider" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        parents = [base for base in owner.__mro__[1:] if base is not object]
        if parents:
            names = set(parameters)
            found += [
                (p, hint)
                for p, hint in _init_parameters(parents[0])
                if p.name not in names and p.default is not p.empty
            ]
    return found


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def params_model(cls: type, title: Optional[str] = None):
    """The pydantic model of the parameters ``cls`` takes from JSON (see the module docstring):
    its ``Params`` model with unknown fields forbidden, or one built from its constructor (strict,
    unknown fields forbidden, no inf/nan)."""
    from pydantic import ConfigDict, create_model

    title = title or public_name(cls)
    declared = getattr(cls, "Params", None)
    if _is_model(declared):

        class Params(declared):  # type: ignore[valid-type,misc]
            model_config = ConfigDict(extra="forbid", title=title, strict=declared.model_config.get("strict", True))

        Params.__doc__ = declared.__doc__
        return Params
    fields: Dict[str, Any] = {}
    for parameter, hint in _init_parameters(cls):
        kind = json_type(hint)
        if kind is _NO_JSON:
            continue
        default = parameter.default
        if default is parameter.empty:
            default = ...
        elif not _jsonable(default):
            default = None  # only for the schema: a parameter left out keeps the constructor's default
        fields[parameter.name] = (kind, default)
    config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, title=title)
    return create_model(f"{cls.__name__}Params", __config__=config, **fields)


def describe_error(
    error, prefix: Sequence[Union[str, int]] = (), says_value: Iterable[str] = ("missing", "extra_forbidden")
) -> Tuple[Optional[str], str, str]:
    """``(param, message, pydantic error type)`` for the first error of a pydantic
    ``ValidationError``: ``param`` is its location as ``strategy[0].max_bans`` (under
    ``prefix``); the message ends with the value given (short ones), unless its type is in
    ``says_value``."""
    first = error.errors(include_url=False)[0]
    loc = (*prefix, *first["loc"])
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".") or None
    message = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    if param and first["type"] not in says_value and isinstance(value, (str, int, float)) and len(repr(value)) <= 60:
        message += f", got {value!r}"
    return param, message, first["type"]


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
        declared = _is_model(getattr(self.cls, "Params", None))
        names = type(model).model_fields if declared else model.model_fields_set  # else: the constructor's defaults
        return {key: getattr(model, key) for key in names}

    def build(self, provider: BaseProvider, kwargs: Mapping[str, Any]) -> BaseStrategy:
        """The strategy, constructed with ``kwargs`` (validated ones, plus objects a caller adds,
        e.g. a ``file``); ``provider`` is passed when the constructor takes it. UsageError when
        the constructor rejects them."""
        cls = self.cls
        try:
            takes_provider = "provider" in inspect.signature(cls).parameters
        except (TypeError, ValueError):
            takes_provider = False
        try:
            return cls(provider, **kwargs) if takes_provider else cls(**kwargs)
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
    (``extra``: objects added by the caller, not from JSON)."""

    type: StrategyType
    kwargs: Dict[str, Any]
    extra: Optional[Dict[str, Any]] = None

    @property
    def name(self) -> str:
        return self.type.name

    def build(self, provider: BaseProvider) -> BaseStrategy:
        return self.type.build(provider, {**self.kwargs, **(self.extra or {})})


class StrategyRegistry:
    """Public name -> ``StrategyType``. Starts with ``BUILTINS`` (registered lazily, the
    terminal-only ones not offered per request); ``load(reference)`` adds a user's class::

        strategies = StrategyRegistry()
        strategies.load("my_strategies.py:NoDigits")     # now offered as "NoDigits"
        strategies.get("NoDigits").make(provider, {"max_bans": 3})
    """

    def __init__(self, builtins: Mapping[str, str] = BUILTINS):
        self._types: Dict[str, StrategyType] = {}
        for name, reference in builtins.items():
            self.register(reference, name, per_request=name not in TERMINAL_ONLY).builtin = True

    def __iter__(self) -> Iterator[StrategyType]:
        return iter(list(self._types.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def names(self, per_request: bool = False) -> List[str]:
        """The registered names (``per_request``: only those a request may use)."""
        return [t.name for t in self._types.values() if t.per_request or not per_request]

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
        if not _NAME.fullmatch(name):
            raise UsageError(f"strategy name {name!r} must be letters, digits, _ and - (set the class's `name`)")
        if name in self._types:
            raise UsageError(
                f"a strategy named {name!r} is already registered ({self._types[name].reference}): "
                "give the new class another `name` attribute"
            )
        entry = StrategyType(name, cls if cls is not None else target, per_request)
        self._types[name] = entry
        return entry

    def load(self, reference: str) -> StrategyType:
        """``register(reference)``: import ``package.module:Class`` or ``path/to/file.py:Class``."""
        return self.register(reference)

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

    def resolve(self, spec: str) -> StrategyType:
        """A registered name, else a reference to load (the command line's ``--strategy``)."""
        if spec in self._types:
            return self._types[spec]
        if is_reference(spec):
            return self.load(spec)
        raise UsageError(f"unknown strategy {spec!r}: use " + REFERENCE_HELP.format(", ".join(self.names())))


def as_registry(strategies: Union[None, StrategyRegistry, Iterable[Union[str, type]]]) -> StrategyRegistry:
    """``strategies`` as a registry: itself, or the built-ins plus each reference or class given."""
    if isinstance(strategies, StrategyRegistry):
        return strategies
    registry = StrategyRegistry()
    for target in strategies or ():
        registry.register(target)
    return registry


def make_strategy(name: str, provider: BaseProvider, **params) -> BaseStrategy:
    """Build the built-in (or referenced) strategy ``name`` with JSON parameters ``params``
    (validated). Raises UsageError for an unknown name, a wrong parameter, or a value the
    constructor rejects."""
    return StrategyRegistry().resolve(name).make(provider, params)


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


def build_strategies(plan: Sequence[StrategyCall], provider: BaseProvider) -> BaseStrategy:
    """The strategy for a plan of ``StrategyCall`` s: one, a ChainStrategy of several, or BaseStrategy."""
    return chain([call.build(provider) for call in plan])


# --------------------------------------------------------------------------------------------
# slop-phrase and regex files
# --------------------------------------------------------------------------------------------
def _json_list(text: str, path: str) -> Optional[list]:
    """The JSON list ``text`` holds, or None when it is not JSON (a plain one-per-line file)."""
    if not text.lstrip().startswith("["):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{path} is not valid JSON: {error}") from None


def read_slops(path: str) -> list:
    """Phrases from a JSON file (a list of strings, or of [phrase, multiplier] pairs) or a text
    file with one phrase per line (blank lines and lines starting with # are skipped)."""
    text = read_text(path, "slop file")
    data = _json_list(text, path)
    if data is not None:
        for item in data:
            ok = isinstance(item, str) or (
                isinstance(item, list)
                and len(item) == 2
                and isinstance(item[0], str)
                and isinstance(item[1], (int, float))
                and not isinstance(item[1], bool)
            )
            if not ok:
                raise UsageError(
                    f"{path}: expected a JSON list of strings or of [phrase, multiplier] pairs, found {item!r}"
                )
        return data
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def read_regexes(path: str) -> List[str]:
    """Regular expressions from a JSON list, or one per line; a line may be quoted ("...", as a
    JSON string or with regex backslashes left as they are) and end with a comma. Blank lines and
    lines starting with # are skipped."""
    text = read_text(path, "regex file")
    patterns = _json_list(text, path)
    if patterns is None:
        patterns = []
        for _number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            quoted = line.rstrip(",").rstrip()
            if len(quoted) >= 2 and quoted[0] == quoted[-1] == '"':
                try:
                    line = json.loads(quoted)
                except json.JSONDecodeError:  # e.g. "\s": keep the backslashes, they are regex escapes
                    line = quoted[1:-1].replace('\\"', '"')
            patterns.append(line)
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise UsageError(f"{path}: expected a list of regular expressions")
    return check_regexes(patterns)


def check_regexes(patterns: Sequence[str]) -> List[str]:
    """``patterns`` as a list, once each compiles with ``compile_regex`` (RE2, linear time);
    UsageError naming the pattern and the problem (e.g. an unsupported backreference) otherwise."""
    for pattern in patterns:
        try:
            compile_regex(pattern)
        except ValueError as error:
            raise UsageError(f"bad regular expression: {error}") from None
    return list(patterns)


def read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {what} {path}: {error}") from None
