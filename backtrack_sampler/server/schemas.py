"""The server's request schemas (pydantic v2), its limits, and OpenAI's error shape.

``CompletionRequest`` and ``ChatCompletionRequest`` hold the OpenAI fields the server supports
plus its own (``top_k``, ``min_p``, ``banned_strings``, ``banned_regex``, ``strategy``). Parse a
body with ``parse_request(model, raw, limits, strategies)``: every problem, pydantic's, a limit's
or a strategy parameter's (checked by the strategy's own model, see ``registry``), comes back as
one ``APIError`` in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``). A
request names only strategies the ``StrategyRegistry`` offers: never a module or a file.
This module knows nothing about HTTP or the model; the server turns a parsed request into tokens
and a strategy.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, List, Literal, Optional, Sequence, Type, TypeVar, Union

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..errors import UsageError
from ..strategy._regex import compile_regex
from ..strategy.registry import StrategyCall, StrategyRegistry, describe_error, is_reference
from ..strategy.sampling import check_sampling_args

MAX_STRATEGIES = 8  # strategies in one request's chain
MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's top_logprobs maximum)


class Limits(BaseModel):
    """What one request may ask for. Each is a ``serve`` option (``--max-body-bytes`` ...) and a
    ``create_app(engine, limits=Limits(...))`` argument; a request beyond one gets a 400 (413 for
    the body size) in OpenAI's error shape before it waits for the model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_body_bytes: int = Field(4 * 2**20, gt=0, description="request body size in bytes (413 beyond it)")
    max_banned_strings: int = Field(
        10_000, gt=0, description="banned_strings per request (also a strategy's slops/find)"
    )
    max_banned_string_chars: int = Field(200, gt=0, description="characters in one banned string")
    max_regexes: int = Field(32, gt=0, description="banned_regex patterns per request")
    max_regex_chars: int = Field(500, gt=0, description="characters in one pattern")
    max_stop: int = Field(16, gt=0, description="stop strings per request")
    max_stop_chars: int = Field(500, gt=0, description="characters in one stop string")
    max_messages: int = Field(1000, gt=0, description="messages in one chat request")
    max_message_chars: int = Field(200_000, gt=0, description="characters in one message")
    max_tokens: Optional[int] = Field(
        None,
        gt=0,
        description="largest max_tokens (default: the room the context "
        "leaves after the prompt; beyond that room: context_length_exceeded)",
    )
    max_seconds: float = Field(
        300.0,
        gt=0,
        description="wall-clock seconds one generation may run, from when it "
        'starts; then it ends with finish_reason "length"',
    )
    max_grammar_chars: int = Field(
        100_000,
        gt=0,
        description="characters in one structured-output JSON Schema "
        "(as compact JSON), grammar or regex (response_format, json_schema, grammar, ...)",
    )
    max_grammar_seconds: float = Field(
        2.0,
        gt=0,
        description="seconds a structured-output grammar may take to compile (in a child process, killed beyond it)",
    )
    max_token_ids: int = Field(
        10_000,
        gt=0,
        description="token ids in one request's logit_bias, banned_tokens "
        "and custom_token_bans (each), and in a tokenize/detokenize request",
    )
    max_sequence_breakers: int = Field(
        64, gt=0, description="dry_sequence_breakers per request (each at most max_banned_string_chars characters)"
    )
    max_choices: int = Field(
        8, gt=0, description="n: generations of one request (each takes a slot or a place in the queue)"
    )


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(
        self,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        status: int = 400,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# pydantic's error types -> OpenAI's error codes (custom errors below use OpenAI's codes as their type)
_CODES = {
    "missing": "missing_required_parameter",
    "extra_forbidden": "unknown_parameter",
    "json_invalid": "invalid_json",
    "too_long": "array_above_max_length",
    "string_too_long": "string_above_max_length",
    "too_short": "invalid_value",
    "string_too_short": "invalid_value",
}


_OURS = {
    "invalid_value",
    "invalid_type",
    "unsupported_value",
    "array_above_max_length",
    "string_above_max_length",
    "integer_above_max_value",
}  # the codes of the errors raised below


def _code(kind: str) -> str:
    if kind in _CODES or kind in _OURS:
        return _CODES.get(kind, kind)
    return "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"


def validation_error(error: ValidationError, prefix: Sequence[Union[str, int]] = ()) -> APIError:
    """The one mapping from pydantic's errors to OpenAI's shape: the first error, its field as
    ``param`` (``messages[0].role``, under ``prefix``), a code in OpenAI's vocabulary."""
    param, message, kind = describe_error(error, prefix, _OURS | {"missing"})
    return APIError(f"{param}: {message}" if param else message, param, _code(kind))


R = TypeVar("R", bound=BaseModel)


def parse_request(model: Type[R], raw: bytes, limits: Limits, strategies: Optional[StrategyRegistry] = None) -> R:
    """``raw`` (a JSON body) as a ``model``, checked against ``limits``; its ``strategy`` specs
    may name what ``strategies`` offers (default: the built-ins). Raises ``APIError``."""
    strategies = strategies or BUILTIN_STRATEGIES
    try:
        request = model.model_validate_json(raw, context={"limits": limits, "strategies": strategies})
    except ValidationError as error:
        raise validation_error(error) from None
    if isinstance(request, _Request):
        check_strategies(request, strategies, limits)
    return request


# --------------------------------------------------------------------------------------------
# field checks
# --------------------------------------------------------------------------------------------
def _error(code: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(code, message.replace("{", "{{").replace("}", "}}"))


def _limits(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits") or Limits()


def _check_strings(values: List[str], what: str, max_count: int, max_chars: int) -> List[str]:
    if len(values) > max_count:
        raise _error("array_above_max_length", f"at most {max_count} {what} per request, got {len(values)}")
    for i, value in enumerate(values):
        if not value:
            raise _error("invalid_value", f"{what} must not be empty (item {i})")
        if len(value) > max_chars:
            raise _error(
                "string_above_max_length", f"{what} are at most {max_chars} characters long, item {i} has {len(value)}"
            )
    return values


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _alias(*names: str) -> AliasChoices:
    """A field read from the first of ``names`` the request has (the frontends' names for it)."""
    return AliasChoices(*names)


def _token_ids(value: Any, what: str, limit: int) -> List[int]:
    """Token ids given as a list of ints or a comma-separated string ("1, 2,3": SillyTavern,
    KoboldCpp, TabbyAPI); empty pieces are skipped."""
    if isinstance(value, str):
        pieces = [piece.strip() for piece in value.split(",")]
        if not all(piece.isdigit() for piece in pieces if piece):
            raise _error(
                "invalid_value", f"{what} must be token ids: a list of integers or a comma-separated string of them"
            )
        value = [int(piece) for piece in pieces if piece]
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise _error("invalid_type", f"{what} must be token ids: a list of integers >= 0 or a comma-separated string")
    if len(value) > limit:
        raise _error("array_above_max_length", f"at most {limit} token ids in {what} (max_token_ids), got {len(value)}")
    return value


def _breakers(value: Any) -> Any:
    """DRY sequence breakers: a list, a JSON array in a string (SillyTavern sends '["\\n", ":"]'), or
    the items of one without the brackets ('"\\n", ":"', as TabbyAPI reads it)."""
    if isinstance(value, str):
        import json

        text = value.strip()
        try:
            value = json.loads(text if text.startswith("[") else f"[{text}]")
        except ValueError:
            raise _error(
                "invalid_value",
                "dry_sequence_breakers must be a list of strings or a JSON array of them "
                'in a string (\'["\\n", ":"]\')',
            ) from None
    return value


def check_regex(pattern: str) -> None:
    """Raises ``PydanticCustomError`` when ``pattern`` cannot be used as a banned regex: the one
    place a request's patterns are checked, with the compiler AntiSlop runs them with (RE2, linear
    time; a backreference, lookaround ... is rejected with a message naming it)."""
    try:
        compile_regex(pattern)
    except ValueError as error:
        raise _error("invalid_value", str(error)) from None


def _phrases(value: Any) -> List[str]:
    """The phrases in a strategy's ``slops``/``find`` value (strings or [phrase, multiplier] pairs)."""
    items = [value] if isinstance(value, str) else list(value.keys()) if isinstance(value, dict) else value
    if not isinstance(items, list):
        return []
    return [item[0] if isinstance(item, list) and item else item for item in items if isinstance(item, (str, list))]


# --------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------
BUILTIN_STRATEGIES = StrategyRegistry()  # what a request may name when no registry is given


def _strategies(info: ValidationInfo) -> StrategyRegistry:
    return (info.context or {}).get("strategies") or BUILTIN_STRATEGIES


class StrategySpec(BaseModel):
    """One strategy of a request: ``{"name": "creative", "top_p_flat": 0.6}`` (a bare name is
    ``{"name": name}``). ``name`` must be one the server offers (a built-in or one it loaded):
    a request never names a module or a file. Its parameters are checked by ``parse_request``
    against the strategy's own model (``call`` then holds the strategy and its arguments)."""

    model_config = ConfigDict(extra="allow")

    name: str
    _call: Optional[StrategyCall] = PrivateAttr(None)

    @field_validator("name")
    @classmethod
    def _offered(cls, name: str, info: ValidationInfo) -> str:
        strategies = _strategies(info)
        offered = ", ".join(strategies.names(per_request=True))
        if is_reference(name):
            raise _error(
                "invalid_value",
                f"a request names a strategy this server offers ({offered}), never a module "
                "or a file: start the server with --load-strategy to offer one",
            )
        try:
            strategies.get(name, per_request=True)
        except UsageError as error:
            raise _error("invalid_value", str(error)) from None
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
            self._call = StrategyCall(kind, kind.validate(self.params))
        return self._call


def check_strategies(request: _Request, strategies: StrategyRegistry, limits: Limits) -> None:
    """Validate each ``request.strategy`` spec's parameters with its strategy's model (the same
    check as the command line's) and this server's limits (``max_banned_strings`` for ``slops``
    and ``find``, ``max_regexes`` for ``regexes``); raises ``APIError`` naming the parameter
    (``strategy[0].max_bans``)."""
    for i, spec in enumerate(request.strategy or []):
        kind = strategies.get(spec.name, per_request=True)
        try:
            kwargs = kind.validate(spec.params)
        except ValidationError as error:
            param, message, code = kind.explain(error, ("strategy", i), _OURS)
            raise APIError(f"{param}: {message}", param, _code(code)) from None
        try:
            if _is_grammar(kind):
                check_grammar_size(kwargs, limits)
            for key in ("slops", "find"):
                if key in kwargs:
                    _check_strings(
                        _phrases(kwargs[key]), key, limits.max_banned_strings, limits.max_banned_string_chars
                    )
            regexes = kwargs.get("regexes")
            if isinstance(regexes, list) and all(isinstance(p, str) for p in regexes):
                for pattern in _check_strings(regexes, "regexes", limits.max_regexes, limits.max_regex_chars):
                    check_regex(pattern)
        except PydanticCustomError as error:
            raise APIError(f"strategy[{i}]: {error.message()}", f"strategy[{i}]", _code(error.type)) from None
        spec._call = StrategyCall(kind, kwargs)


def _is_grammar(kind) -> bool:
    from ..strategy.grammar_strategy import GrammarStrategy

    return isinstance(kind.cls, type) and issubclass(kind.cls, GrammarStrategy)


GRAMMAR_KEYS = ("json_schema", "grammar", "regex")  # GrammarStrategy's grammar parameters


def check_grammar_size(params: Dict[str, Any], limits: Limits) -> None:
    """``max_grammar_chars`` for a GrammarStrategy's ``json_schema`` / ``grammar`` / ``regex``
    (the compile-time limit is checked when the strategy is built, off the event loop)."""
    import json

    for key in GRAMMAR_KEYS:
        value = params.get(key)
        if value is None:
            continue
        size = len(value) if isinstance(value, str) else len(json.dumps(value, separators=(",", ":")))
        if size > limits.max_grammar_chars:
            raise _error(
                "string_above_max_length",
                f"the {key} is {size} characters long; this server takes at "
                f"most {limits.max_grammar_chars} (max_grammar_chars)",
            )


# --------------------------------------------------------------------------------------------
# structured output: OpenAI's response_format, llama-server's and TabbyAPI's fields
# --------------------------------------------------------------------------------------------
class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: ``{"name", "description", "schema", "strict"}`` (OpenAI's
    shape; the schema is always enforced, ``strict`` or not)."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[Dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``{"type": "text"}``, ``{"type": "json_object"}`` (any JSON
    object) or ``{"type": "json_schema", "json_schema": {...}}``."""

    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _needs_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise _error("missing", 'response_format of type "json_schema" needs json_schema.schema')
        return self


STRUCTURED_FIELDS = ("response_format", "json_schema", "grammar", "grammar_string", "regex_pattern")


# --------------------------------------------------------------------------------------------
# requests
# --------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False
    include_backtrack: bool = False  # extension: provisional text and every rewind (README: live events)


# samplers and options the frontends send that have no effect here, with the values that mean "off":
# accepted (as TabbyAPI accepts what its backend lacks) and, when set otherwise, named in the answer
IGNORED_FIELDS = {
    "top_a": 0,
    "tfs": 1,
    "tfs_z": 1,
    "mirostat_mode": 0,
    "mirostat": 0,
    "smoothing_factor": 0,
    "skew": 0,
    "dynamic_temperature": False,
    "dynatemp_range": 0,
    "min_tokens": 0,
    "min_length": 0,
    "rep_pen_slope": 1,
    "repetition_decay": 0,
    "guidance_scale": 1,
    "negative_prompt": "",
    "max_tokens_second": 0,
    "epsilon_cutoff": 0,
    "eta_cutoff": 0,
    "num_beams": 1,
    "penalty_alpha": 0,
    "encoder_repetition_penalty": 1,
    "no_repeat_ngram_size": 0,
}


class _Request(BaseModel):
    """Fields both endpoints take. Unknown fields are ignored (as OpenAI-compatible servers do);
    known ones we cannot honour are rejected. ``ignored_fields``: the frontends' samplers the request
    turns on that have no effect here (``IGNORED_FIELDS``)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    model: Optional[str] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(
        None, ge=0, validation_alias=_alias("max_tokens", "max_new_tokens", "max_length", "n_predict")
    )
    temperature: Optional[float] = Field(1.0, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(50, ge=0, description="0 (or -1) turns it off")
    min_p: Optional[float] = Field(None, ge=0, le=1)
    seed: Optional[int] = Field(None, validation_alias=_alias("seed", "sampler_seed"), description="negative: random")
    n: Optional[int] = 1
    stop: Optional[List[str]] = Field(None, validation_alias=_alias("stop", "stop_sequence", "stopping_strings"))
    banned_strings: Optional[List[str]] = None
    banned_regex: Optional[List[str]] = None
    strategy: Optional[List[StrategySpec]] = None
    # the samplers the frontends send (each becomes a strategy of the chain, see ``samplers``)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(
        None, gt=0, validation_alias=_alias("repetition_penalty", "rep_pen", "repeat_penalty")
    )
    penalty_range: Optional[int] = Field(
        None,
        ge=-1,
        validation_alias=_alias(
            "penalty_range", "repetition_penalty_range", "rep_pen_range", "repetition_range", "repeat_last_n"
        ),
    )
    dry_multiplier: Optional[float] = Field(None, ge=0)
    dry_base: Optional[float] = Field(None, ge=0)
    dry_allowed_length: Optional[int] = Field(None, ge=0)
    dry_penalty_last_n: Optional[int] = Field(None, ge=-1, validation_alias=_alias("dry_penalty_last_n", "dry_range"))
    dry_sequence_breakers: Optional[List[str]] = None
    xtc_threshold: Optional[float] = Field(None, ge=0, le=1)
    xtc_probability: Optional[float] = Field(None, ge=0, le=1)
    typical_p: Optional[float] = Field(None, gt=0, le=1, validation_alias=_alias("typical_p", "typical"))
    logit_bias: Optional[Dict[str, Union[float, bool]]] = None
    banned_tokens: Optional[Union[List[int], List[str]]] = None  # ids (TabbyAPI), or phrases (KoboldCpp)
    custom_token_bans: Optional[List[int]] = None
    ban_eos_token: Optional[bool] = Field(None, validation_alias=_alias("ban_eos_token", "ignore_eos"))
    # structured output (one of them; see ``structured_output``)
    response_format: Optional[ResponseFormat] = None
    json_schema: Optional[Dict[str, Any]] = None  # llama-server, TabbyAPI: the schema itself
    grammar: Optional[str] = None  # llama-server: GBNF (Lark is accepted too)
    grammar_string: Optional[str] = None  # TabbyAPI's name for it
    regex_pattern: Optional[str] = None  # TabbyAPI: the whole output matches it

    _ignored: List[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _note_ignored(cls, data: Any, handler) -> Any:
        request = handler(data)
        if isinstance(data, dict):
            request._ignored = [key for key, off in IGNORED_FIELDS.items() if data.get(key, off) not in (off, None)]
        return request

    @property
    def ignored_fields(self) -> List[str]:
        return list(self._ignored)

    @field_validator("stop", "banned_strings", "banned_regex", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _one_or_many(value)

    @field_validator("seed", mode="before")
    @classmethod
    def _random_seed(cls, value: Any) -> Any:
        return None if isinstance(value, int) and not isinstance(value, bool) and value < 0 else value  # -1: random

    @field_validator("top_k", mode="before")
    @classmethod
    def _top_k_off(cls, value: Any) -> Any:
        return 0 if value == -1 and not isinstance(value, bool) else value  # TabbyAPI, llama.cpp: -1 is off

    @field_validator("json_schema", "grammar", "grammar_string", "regex_pattern", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value in ("", {}) else value  # SillyTavern sends grammar_string "" and json_schema {}

    @field_validator("dry_sequence_breakers", mode="before")
    @classmethod
    def _dry_breakers(cls, value: Any, info: ValidationInfo) -> Any:
        value = _breakers(value)
        if isinstance(value, list) and all(isinstance(b, str) for b in value):
            limits = _limits(info)
            _check_strings(value, "dry_sequence_breakers", limits.max_sequence_breakers, limits.max_banned_string_chars)
        return value

    @field_validator("banned_tokens", mode="before")
    @classmethod
    def _banned_tokens(cls, value: Any, info: ValidationInfo) -> Any:
        limits = _limits(info)
        if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
            return _check_strings(
                value, "banned_tokens phrases", limits.max_banned_strings, limits.max_banned_string_chars
            )
        return None if value is None else _token_ids(value, "banned_tokens", limits.max_token_ids)

    @field_validator("custom_token_bans", mode="before")
    @classmethod
    def _custom_token_bans(cls, value: Any, info: ValidationInfo) -> Any:
        return None if value is None else _token_ids(value, "custom_token_bans", _limits(info).max_token_ids)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, list):  # llama.cpp's form: [[id, bias], ...], false for a ban
            if not all(isinstance(pair, list) and len(pair) == 2 for pair in value):
                raise _error("invalid_type", "logit_bias must be {token id: bias} or [[token id, bias], ...]")
            value = {str(k) if isinstance(k, int) and not isinstance(k, bool) else k: v for k, v in value}
        if isinstance(value, dict):
            cap = _limits(info).max_token_ids
            if len(value) > cap:
                raise _error(
                    "array_above_max_length", f"at most {cap} token ids in logit_bias (max_token_ids), got {len(value)}"
                )
            for key, bias in value.items():
                if not (isinstance(key, str) and key.isdigit()):
                    raise _error("invalid_value", f"logit_bias keys are token ids, got {key!r}")
                if bias is True or not (isinstance(bias, (int, float)) and math.isfinite(bias)) and bias is not False:
                    raise _error(
                        "invalid_value",
                        f"logit_bias values are numbers (clamped to [-100, 100]) or false (a "
                        f"ban), got {bias!r} for token {key}",
                    )
        return value

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy_list(cls, value: Any) -> Any:
        items = value if isinstance(value, list) else [] if value is None else [value]
        if not all(isinstance(item, (str, dict)) for item in items):
            raise _error("invalid_type", 'strategy must be a name, {"name": ..., parameters...} or a list of those')
        if len(items) > MAX_STRATEGIES:
            raise _error("array_above_max_length", f"at most {MAX_STRATEGIES} strategies per request")
        return None if value is None else [{"name": item} if isinstance(item, str) else item for item in items]

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Optional[List[str]], info: ValidationInfo) -> Optional[List[str]]:
        limits = _limits(info)
        return value and _check_strings(value, "stop strings", limits.max_stop, limits.max_stop_chars)

    @field_validator("banned_strings")
    @classmethod
    def _banned(cls, value: Optional[List[str]], info: ValidationInfo) -> Optional[List[str]]:
        limits = _limits(info)
        return value and _check_strings(
            value, "banned strings", limits.max_banned_strings, limits.max_banned_string_chars
        )

    @field_validator("banned_regex")
    @classmethod
    def _regexes(cls, value: Optional[List[str]], info: ValidationInfo) -> Optional[List[str]]:
        if value:
            limits = _limits(info)
            for pattern in _check_strings(value, "patterns", limits.max_regexes, limits.max_regex_chars):
                check_regex(pattern)
        return value

    @field_validator("max_tokens", "max_completion_tokens", check_fields=False)
    @classmethod
    def _max_tokens(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        cap = _limits(info).max_tokens
        if value is not None and cap is not None and value > cap:
            raise _error("integer_above_max_value", f"{info.field_name} is at most {cap} on this server, got {value}")
        return value

    @field_validator("n")
    @classmethod
    def _n(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        cap = _limits(info).max_choices
        if value is not None and value < 1:
            raise _error("invalid_value", f"n must be at least 1, got {value}")
        if value is not None and value > cap:
            raise _error("integer_above_max_value", f"n is at most {cap} on this server (max_choices), got {value}")
        return value

    @model_validator(mode="after")
    def _dry_base(self) -> _Request:
        if self.dry_multiplier and self.dry_base is not None and self.dry_base < 1:
            raise _error("invalid_value", f"dry_base must be >= 1 when dry_multiplier is set, got {self.dry_base}")
        return self

    @model_validator(mode="after")
    def _one_structured_output(self) -> _Request:
        given = [
            name
            for name in STRUCTURED_FIELDS
            if getattr(self, name) is not None
            and not (name == "response_format" and self.response_format.type == "text")
        ]
        if len(given) > 1:
            raise _error("invalid_value", f"give one of {', '.join(given)} (each asks for structured output)")
        return self

    @field_validator("response_format", "json_schema", "grammar", "grammar_string", "regex_pattern")
    @classmethod
    def _grammar_size(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, ResponseFormat):
            schema = value.json_schema.schema_ if value.type == "json_schema" else None
            params = {"json_schema": schema}
        else:
            params = {
                "regex"
                if info.field_name == "regex_pattern"
                else "json_schema"
                if info.field_name == "json_schema"
                else "grammar": value
            }
        check_grammar_size(params, _limits(info))
        return value

    @property
    def structured_output(self) -> Optional[tuple]:
        """``(field, GrammarStrategy parameters)`` for the structured output the request asks for,
        or None."""
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            return "response_format", {"json_schema": {"type": "object"}}
        if fmt is not None and fmt.type == "json_schema":
            return "response_format", {"json_schema": fmt.json_schema.schema_}
        if self.json_schema is not None:
            return "json_schema", {"json_schema": self.json_schema}
        for name in ("grammar", "grammar_string"):
            if getattr(self, name) is not None:
                return name, {"grammar": getattr(self, name)}
        if self.regex_pattern is not None:
            return "regex_pattern", {"regex": self.regex_pattern}
        return None

    @model_validator(mode="after")
    def _sampling_args(self) -> _Request:
        try:
            check_sampling_args(
                self.temperature if self.temperature is not None else 1.0, self.top_k, self.top_p, self.min_p
            )
        except ValueError as error:
            raise _error("invalid_value", str(error)) from None
        return self

    # what the server reads ---------------------------------------------------------------------
    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def include_backtrack(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_backtrack)

    @property
    def banned_phrases(self) -> List[str]:
        """``banned_strings`` and KoboldCpp's ``banned_tokens`` phrases, once each."""
        phrases = list(self.banned_strings or [])
        if self.banned_tokens and isinstance(self.banned_tokens[0], str):
            phrases += [p for p in self.banned_tokens if p not in phrases]
        return phrases

    def samplers(self, prompt: Sequence[int] = (), eos: Sequence[int] = ()) -> List[tuple]:
        """``(strategy name, parameters, field)`` for the samplers the request turns on, in
        llama.cpp's order (logit bias, penalties, DRY, typical-p, XTC): each is a built-in strategy
        that edits the logits; ``prompt`` counts toward the penalties (as llama.cpp, KoboldCpp and
        TabbyAPI count it); ``eos``: the ids ``ban_eos_token`` bans."""
        out: List[tuple] = []
        bias = {k: float("-inf") if v is False else v for k, v in (self.logit_bias or {}).items()}
        banned = [t for t in self.banned_tokens or [] if isinstance(t, int)] + list(self.custom_token_bans or [])
        banned += list(eos) if self.ban_eos_token else []
        if bias or banned:
            out.append(
                ("logit_bias", {"bias": bias, "banned_tokens": banned}, "logit_bias" if bias else "banned_tokens")
            )
        rep, freq, presence = self.repetition_penalty, self.frequency_penalty or 0.0, self.presence_penalty or 0.0
        if (rep is not None and rep != 1) or freq or presence:
            last_n = self.default_penalty_range if self.penalty_range is None else self.penalty_range
            out.append(
                (
                    "penalties",
                    {
                        "repeat_penalty": 1.0 if rep is None else rep,
                        "frequency_penalty": freq,
                        "presence_penalty": presence,
                        "last_n": last_n,
                        "context": list(prompt),
                    },
                    "repetition_penalty",
                )
            )
        if self.dry_multiplier:
            params: Dict[str, Any] = {
                "multiplier": self.dry_multiplier,
                "context": list(prompt),
                "last_n": self.default_dry_range if self.dry_penalty_last_n is None else self.dry_penalty_last_n,
            }
            for key, value in (
                ("base", self.dry_base),
                ("allowed_length", self.dry_allowed_length),
                ("sequence_breakers", self.dry_sequence_breakers),
            ):
                if value is not None:
                    params[key] = value
            out.append(("dry", params, "dry_multiplier"))
        if self.typical_p is not None and self.typical_p < 1:
            out.append(("typical", {"p": self.typical_p}, "typical_p"))
        if self.xtc_probability:
            out.append(
                (
                    "xtc",
                    {
                        "probability": self.xtc_probability,
                        "seed": self.seed,
                        "threshold": 0.1 if self.xtc_threshold is None else self.xtc_threshold,
                    },
                    "xtc_probability",
                )
            )
        return out

    default_penalty_range: ClassVar[int] = -1  # the whole context, as TabbyAPI (KoboldCpp: 320)
    default_dry_range: ClassVar[int] = -1

    def sampling(self) -> Dict[str, Any]:
        """Keyword arguments for ``BacktrackSampler.generate`` (without the token limit)."""
        return {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "min_p": self.min_p,
            "seed": self.seed,
        }

    default_max_tokens: ClassVar[Optional[int]] = None  # when max_tokens is not given (None: as many as fit)
    logprob_count: ClassVar[Optional[int]] = None  # the routes that report logprobs say how many alternatives

    def token_limit(self) -> Optional[int]:
        """The max_tokens the request gave (None: not given)."""
        return self.max_tokens


class CompletionRequest(_Request):
    """``POST /v1/completions``: ``prompt`` is a string or a list of token ids (a batch of one of
    either is accepted too); ``max_tokens`` defaults to 16, as OpenAI's does."""

    prompt: Union[str, List[int]]
    echo: Optional[bool] = None
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, value: Any) -> Union[str, List[int]]:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]  # a batch of one
        if isinstance(value, str):
            if not value:
                raise _error("invalid_value", "prompt is empty")
            return value
        if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
            raise _error("unsupported_value", "only one prompt per request is supported")
        raise _error("invalid_type", "prompt must be a non-empty string or a list of token ids")

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, False, ""):
            raise _error("unsupported_value", f"{info.field_name} is not supported")
        return value

    @property
    def logprob_count(self) -> Optional[int]:
        """Alternatives to report per token (None: no logprobs; 0 is off too, as TabbyAPI reads it)."""
        return self.logprobs or None

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: Optional[int]) -> Optional[int]:
        if value not in (None, 1):
            raise _error("unsupported_value", "only best_of=1 is supported")
        return value

    default_max_tokens: ClassVar[Optional[int]] = 16


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message; ``content`` is a string or a list of text parts (joined)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, list):
            parts = []
            for part in value:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise _error("invalid_value", "only text content parts are supported")
                parts.append(part["text"])
            value = "".join(parts)
        if isinstance(value, str) and len(value) > _limits(info).max_message_chars:
            cap = _limits(info).max_message_chars
            raise _error("string_above_max_length", f"a message is at most {cap} characters long, got {len(value)}")
        return value

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.content is None:
            if self.role != "assistant":
                raise _error("invalid_type", "content must be a string or a list of text parts")
            self.content = ""
        return self


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``: ``messages`` rendered with the model's chat template;
    ``max_completion_tokens`` is ``max_tokens``' newer name."""

    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)

    @property
    def logprob_count(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("messages", mode="before")
    @classmethod
    def _count(cls, value: Any, info: ValidationInfo) -> Any:
        cap = _limits(info).max_messages
        if isinstance(value, list) and len(value) > cap:
            raise _error("array_above_max_length", f"at most {cap} messages per request, got {len(value)}")
        return value

    def token_limit(self) -> Optional[int]:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens

    def message_dicts(self) -> List[Dict[str, str]]:
        return [{"role": m.role, "content": m.content or ""} for m in self.messages]
