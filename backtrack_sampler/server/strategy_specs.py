"""The ``strategy`` field of a request: ``StrategySpec`` (a strategy the server offers, by name, and
its parameters), the registry a request names them from when none is given
(``BUILTIN_STRATEGIES``), and ``check_strategies``, which validates each spec's parameters with
the strategy's own model and the server's ``Limits``. A request never names a module or a file."""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from ..errors import UsageError
from ..strategy.registry import StrategyCall, StrategyRegistry, is_reference
from .errors import OPENAI_CODES, APIError, field_error, openai_code
from .fields import check_regex, check_strings, phrases
from .limits import Limits
from .structured import check_grammar_size, is_grammar

BUILTIN_STRATEGIES = StrategyRegistry()  # what a request may name when no registry is given


def _strategies(info: ValidationInfo) -> StrategyRegistry:
    return (info.context or {}).get("strategies") or BUILTIN_STRATEGIES


class StrategySpec(BaseModel):
    """One strategy of a request: ``{"name": "creative", "top_p_flat": 0.6}`` (a bare name is
    ``{"name": name}``). ``name`` must be one the server offers (a built-in or one it loaded):
    a request never names a module or a file. Its parameters are checked by ``parse_request``
    against the strategy's own model (``call`` then holds the strategy and its arguments).
    ``scope``: where it acts on a reasoning model's output ("reasoning", "answer", "both")."""

    model_config = ConfigDict(extra="allow")

    name: str
    scope: Optional[Literal["reasoning", "answer", "both"]] = None
    _call: Optional[StrategyCall] = PrivateAttr(None)

    @field_validator("name")
    @classmethod
    def _offered(cls, name: str, info: ValidationInfo) -> str:
        strategies = _strategies(info)
        offered = ", ".join(strategies.names(per_request=True))
        if is_reference(name):
            raise field_error(
                "invalid_value",
                f"a request names a strategy this server offers ({offered}), never a module "
                "or a file: start the server with --load-strategy to offer one",
            )
        try:
            strategies.get(name, per_request=True)
        except UsageError as error:
            raise field_error("invalid_value", str(error)) from None
        return name

    @property
    def params(self) -> Dict[str, Any]:
        """The parameters as the request gave them."""
        return dict(self.model_extra or {})

    @property
    def call(self) -> StrategyCall:
        """The strategy and its validated arguments (checked now against the built-ins when the
        request did not come through ``parse_request``)."""
        if self._call is None:
            kind = BUILTIN_STRATEGIES.get(self.name)
            self._call = StrategyCall(kind, kind.validate(self.params), scope=self.scope)
        return self._call


def check_strategies(specs: Sequence[StrategySpec], strategies: StrategyRegistry, limits: Limits) -> None:
    """Validate each spec's parameters (a request's ``strategy``) with its strategy's model (the same
    check as the command line's) and this server's limits (``max_banned_strings`` for ``slops``
    and ``find``, ``max_regexes`` for ``regexes``); raises ``APIError`` naming the parameter
    (``strategy[0].max_bans``)."""
    for i, spec in enumerate(specs):
        kind = strategies.get(spec.name, per_request=True)
        try:
            kwargs = kind.validate(spec.params)
        except ValidationError as error:
            param, message, code = kind.explain(error, ("strategy", i), OPENAI_CODES)
            raise APIError(f"{param}: {message}", param, openai_code(code)) from None
        try:
            if is_grammar(kind):
                check_grammar_size(kwargs, limits)
            for key in ("slops", "find"):
                if key in kwargs:
                    check_strings(phrases(kwargs[key]), key, limits.max_banned_strings, limits.max_banned_string_chars)
            regexes = kwargs.get("regexes")
            if isinstance(regexes, list) and all(isinstance(p, str) for p in regexes):
                for pattern in check_strings(regexes, "regexes", limits.max_regexes, limits.max_regex_chars):
                    check_regex(pattern)
        except PydanticCustomError as error:
            raise APIError(f"strategy[{i}]: {error.message()}", f"strategy[{i}]", openai_code(error.type)) from None
        spec._call = StrategyCall(kind, kwargs, scope=spec.scope)
