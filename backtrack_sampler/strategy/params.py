"""A strategy's parameters as JSON: one pydantic model per strategy class, and its errors in words.

Parameters are declared by the strategy: a pydantic model it names as its ``Params`` class
attribute (the constructor is called with every field as a keyword argument), else its
constructor's signature and type hints (``init_parameters``):

- ``self`` and the parameter named ``provider`` are not parameters (the sampler's provider is
  passed to ``provider`` by name, see ``StrategyType.build``);
- an unannotated parameter takes any JSON value; one whose type has no JSON form, such as a
  file or a callable, is not settable from JSON (``json_type``);
- a ``**kwargs`` constructor also takes the optional parameters of its parent class's (the next
  class of its MRO that is not ``object``), those it does not name itself.

The model is strict (a string is not a number), forbids unknown fields, and rejects inf/nan: the
one check for the command line and the server.
"""

from __future__ import annotations

import collections.abc as abc
import enum
import inspect
import json
import typing
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .references import public_name

NO_JSON: Any = object()  # what json_type returns for a type that has no JSON form
_SEQUENCES = {list, tuple, set, frozenset, abc.Iterable, abc.Collection, abc.Sequence, abc.MutableSequence, abc.Set}
_MAPPINGS = {dict, abc.Mapping, abc.MutableMapping}


def json_type(hint: Any) -> Any:
    """The JSON-shaped type pydantic validates a parameter with, from its type hint (``NO_JSON``
    when it has none): sequences become lists, mappings dicts with string keys, union members
    without a JSON form are dropped (and a union of lists is a list of any of their items)."""
    if hint is inspect.Parameter.empty or hint is Any:
        return Any
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        inner = json_type(args[0])
        annotated = (inner, *hint.__metadata__)
        return inner if inner is NO_JSON else typing.Annotated[annotated]
    if hint in (str, int, float, bool, type(None)) or origin is typing.Literal:
        return hint
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint
    if is_model(hint):
        return hint
    if origin is Union or type(hint).__name__ == "UnionType":  # Union[...], X | Y
        members = [m for m in map(json_type, args) if m is not NO_JSON]
        items = [typing.get_args(m)[0] for m in members if typing.get_origin(m) is list]
        if len(items) > 1:
            members = [m for m in members if typing.get_origin(m) is not list] + [_list_of(_union(items))]
        if all(m is type(None) for m in members):
            return NO_JSON
        return _union(members)
    if (origin or hint) in _SEQUENCES:
        if origin is tuple and args and args[-1] is not Ellipsis:
            item = json_type(_union(args))  # a fixed-size tuple: a list of its item types
        else:
            item = json_type(args[0]) if args else Any
        return NO_JSON if item is NO_JSON else _list_of(item)
    if (origin or hint) in _MAPPINGS:
        value: Any = json_type(args[1]) if len(args) == 2 else Any
        return NO_JSON if value is NO_JSON else Dict[str, value]
    return NO_JSON


def _union(members: Sequence[Any]) -> Any:
    """``Union[members]`` built at run time (one member: itself)."""
    return Union[tuple(members)] if len(members) > 1 else members[0]


def _list_of(item: Any) -> Any:
    return List[item]


def is_model(cls: Any) -> bool:
    """Whether ``cls`` is a pydantic model class."""
    from pydantic import BaseModel

    return isinstance(cls, type) and issubclass(cls, BaseModel)


def init_parameters(cls: type) -> List[Tuple[inspect.Parameter, Any]]:
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
                (p, hint) for p, hint in init_parameters(parents[0]) if p.name not in names and p.default is not p.empty
            ]
    return found


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def params_model(cls: type, title: Optional[str] = None) -> Any:
    """The pydantic model of the parameters ``cls`` takes from JSON (see the module docstring):
    its ``Params`` model with unknown fields forbidden, or one built from its constructor (strict,
    unknown fields forbidden, no inf/nan)."""
    from pydantic import BaseModel, ConfigDict, create_model

    title = title or public_name(cls)
    declared = getattr(cls, "Params", None)
    if isinstance(declared, type) and issubclass(declared, BaseModel):
        strict = declared.model_config.get("strict", True)

        class Params(declared):  # type: ignore[valid-type,misc]
            model_config = ConfigDict(extra="forbid", title=title, strict=strict)

        Params.__doc__ = declared.__doc__
        return Params
    fields: Dict[str, Any] = {}
    for parameter, hint in init_parameters(cls):
        kind = json_type(hint)
        if kind is NO_JSON:
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
    error: Any, prefix: Sequence[Union[str, int]] = (), says_value: Iterable[str] = ("missing", "extra_forbidden")
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
