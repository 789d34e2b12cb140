"""``GenerationRequest``: the fields every generating route takes (the OpenAI routes', the KoboldAI
API's, the playground's), the frontends' names for them, and their checks against the server's
``Limits``; then what the server reads from it: the sampling arguments, the token limit, the
samplers (``samplers``), the phrases and grammar it bans or asks for. Unknown fields are ignored (as
OpenAI-compatible servers do); known ones it cannot honour are rejected. This module knows nothing
about HTTP or the model; ``plan`` turns a request into tokens and a strategy."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, Iterable, List, Literal, Optional, Sequence, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator
from pydantic_core.core_schema import ValidatorFunctionWrapHandler

from ..strategy.sampling import check_sampling_args
from .errors import field_error
from .fields import alias, check_regex, check_strings, limits_of, one_or_many, sequence_breakers, token_ids
from .samplers import IGNORED_FIELDS, SamplerStrategy, sampler_strategies
from .strategy_specs import StrategySpec
from .structured import STRUCTURED_FIELDS, ResponseFormat, check_grammar_size

MAX_STRATEGIES = 8  # strategies in one request's chain


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False
    include_backtrack: bool = False  # extension: provisional text and every rewind (README: live events)


class GenerationRequest(BaseModel):
    """Fields both endpoints take. Unknown fields are ignored (as OpenAI-compatible servers do);
    known ones we cannot honour are rejected. ``ignored_fields``: the frontends' samplers the request
    turns on that have no effect here (``IGNORED_FIELDS``)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    model: Optional[str] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(
        None, ge=0, validation_alias=alias("max_tokens", "max_new_tokens", "max_length", "n_predict")
    )
    temperature: Optional[float] = Field(1.0, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(50, ge=0, description="0 (or -1) turns it off")
    min_p: Optional[float] = Field(None, ge=0, le=1)
    seed: Optional[int] = Field(None, validation_alias=alias("seed", "sampler_seed"), description="negative: random")
    n: Optional[int] = 1
    stop: Optional[List[str]] = Field(None, validation_alias=alias("stop", "stop_sequence", "stopping_strings"))
    banned_strings: Optional[List[str]] = None
    banned_regex: Optional[List[str]] = None
    strategy: Optional[List[StrategySpec]] = None
    # the samplers the frontends send (each becomes a strategy of the chain, see ``samplers``)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(
        None, gt=0, validation_alias=alias("repetition_penalty", "rep_pen", "repeat_penalty")
    )
    penalty_range: Optional[int] = Field(
        None,
        ge=-1,
        validation_alias=alias(
            "penalty_range", "repetition_penalty_range", "rep_pen_range", "repetition_range", "repeat_last_n"
        ),
    )
    dry_multiplier: Optional[float] = Field(None, ge=0)
    dry_base: Optional[float] = Field(None, ge=0)
    dry_allowed_length: Optional[int] = Field(None, ge=0)
    dry_penalty_last_n: Optional[int] = Field(None, ge=-1, validation_alias=alias("dry_penalty_last_n", "dry_range"))
    dry_sequence_breakers: Optional[List[str]] = None
    xtc_threshold: Optional[float] = Field(None, ge=0, le=1)
    xtc_probability: Optional[float] = Field(None, ge=0, le=1)
    typical_p: Optional[float] = Field(None, gt=0, le=1, validation_alias=alias("typical_p", "typical"))
    logit_bias: Optional[Dict[str, Union[float, bool]]] = None
    banned_tokens: Optional[Union[List[int], List[str]]] = None  # ids (TabbyAPI), or phrases (KoboldCpp)
    custom_token_bans: Optional[List[int]] = None
    ban_eos_token: Optional[bool] = Field(None, validation_alias=alias("ban_eos_token", "ignore_eos"))
    # structured output (one of them; see ``structured_output``)
    response_format: Optional[ResponseFormat] = None
    json_schema: Optional[Dict[str, Any]] = None  # llama-server, TabbyAPI: the schema itself
    grammar: Optional[str] = None  # llama-server: GBNF (Lark is accepted too)
    grammar_string: Optional[str] = None  # TabbyAPI's name for it
    regex_pattern: Optional[str] = None  # TabbyAPI: the whole output matches it
    # on a reasoning model: where the bans and the structured output act (see strategy.scope)
    ban_scope: Optional[Literal["reasoning", "answer", "both"]] = None  # default: both
    grammar_scope: Optional[Literal["reasoning", "answer", "both"]] = None  # default: answer, on a reasoning model

    _ignored: List[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _note_ignored(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
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
        return one_or_many(value)

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
        value = sequence_breakers(value)
        if isinstance(value, list) and all(isinstance(b, str) for b in value):
            limits = limits_of(info)
            check_strings(value, "dry_sequence_breakers", limits.max_sequence_breakers, limits.max_banned_string_chars)
        return value

    @field_validator("banned_tokens", mode="before")
    @classmethod
    def _banned_tokens(cls, value: Any, info: ValidationInfo) -> Any:
        limits = limits_of(info)
        if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
            return check_strings(
                value, "banned_tokens phrases", limits.max_banned_strings, limits.max_banned_string_chars
            )
        return None if value is None else token_ids(value, "banned_tokens", limits.max_token_ids)

    @field_validator("custom_token_bans", mode="before")
    @classmethod
    def _custom_token_bans(cls, value: Any, info: ValidationInfo) -> Any:
        return None if value is None else token_ids(value, "custom_token_bans", limits_of(info).max_token_ids)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, list):  # llama.cpp's form: [[id, bias], ...], false for a ban
            if not all(isinstance(pair, list) and len(pair) == 2 for pair in value):
                raise field_error("invalid_type", "logit_bias must be {token id: bias} or [[token id, bias], ...]")
            value = {str(k) if isinstance(k, int) and not isinstance(k, bool) else k: v for k, v in value}
        if isinstance(value, dict):
            cap = limits_of(info).max_token_ids
            if len(value) > cap:
                raise field_error(
                    "array_above_max_length", f"at most {cap} token ids in logit_bias (max_token_ids), got {len(value)}"
                )
            for key, bias in value.items():
                if not (isinstance(key, str) and key.isdigit()):
                    raise field_error("invalid_value", f"logit_bias keys are token ids, got {key!r}")
                if bias is True or not (isinstance(bias, (int, float)) and math.isfinite(bias)) and bias is not False:
                    raise field_error(
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
            raise field_error(
                "invalid_type", 'strategy must be a name, {"name": ..., parameters...} or a list of those'
            )
        if len(items) > MAX_STRATEGIES:
            raise field_error("array_above_max_length", f"at most {MAX_STRATEGIES} strategies per request")
        return None if value is None else [{"name": item} if isinstance(item, str) else item for item in items]

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Optional[List[str]], info: ValidationInfo) -> Optional[List[str]]:
        limits = limits_of(info)
        return value and check_strings(value, "stop strings", limits.max_stop, limits.max_stop_chars)

    @field_validator("banned_strings")
    @classmethod
    def _banned(cls, value: Optional[List[str]], info: ValidationInfo) -> Optional[List[str]]:
        limits = limits_of(info)
        return value and check_strings(
            value, "banned strings", limits.max_banned_strings, limits.max_banned_string_chars
        )

    @field_validator("banned_regex")
    @classmethod
    def _regexes(cls, value: Optional[List[str]], info: ValidationInfo) -> Optional[List[str]]:
        if value:
            limits = limits_of(info)
            for pattern in check_strings(value, "patterns", limits.max_regexes, limits.max_regex_chars):
                check_regex(pattern)
        return value

    @field_validator("max_tokens", "max_completion_tokens", check_fields=False)
    @classmethod
    def _max_tokens(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        cap = limits_of(info).max_tokens
        if value is not None and cap is not None and value > cap:
            raise field_error(
                "integer_above_max_value", f"{info.field_name} is at most {cap} on this server, got {value}"
            )
        return value

    @field_validator("n")
    @classmethod
    def _n(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        cap = limits_of(info).max_choices
        if value is not None and value < 1:
            raise field_error("invalid_value", f"n must be at least 1, got {value}")
        if value is not None and value > cap:
            raise field_error(
                "integer_above_max_value", f"n is at most {cap} on this server (max_choices), got {value}"
            )
        return value

    @model_validator(mode="after")
    def _dry_base(self) -> GenerationRequest:
        if self.dry_multiplier and self.dry_base is not None and self.dry_base < 1:
            raise field_error("invalid_value", f"dry_base must be >= 1 when dry_multiplier is set, got {self.dry_base}")
        return self

    @model_validator(mode="after")
    def _one_structured_output(self) -> GenerationRequest:
        given = [
            name
            for name in STRUCTURED_FIELDS
            if getattr(self, name) is not None
            and not (
                name == "response_format" and self.response_format is not None and self.response_format.type == "text"
            )
        ]
        if len(given) > 1:
            raise field_error("invalid_value", f"give one of {', '.join(given)} (each asks for structured output)")
        return self

    @field_validator("response_format", "json_schema", "grammar", "grammar_string", "regex_pattern")
    @classmethod
    def _grammar_size(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, ResponseFormat):
            schema = (
                value.json_schema.schema_ if value.type == "json_schema" and value.json_schema is not None else None
            )
            params = {"json_schema": schema}
        else:
            params = {
                "regex"
                if info.field_name == "regex_pattern"
                else "json_schema"
                if info.field_name == "json_schema"
                else "grammar": value
            }
        check_grammar_size(params, limits_of(info))
        return value

    @property
    def structured_output(self) -> Optional[Tuple[str, Dict[str, Any]]]:
        """``(field, GrammarStrategy parameters)`` for the structured output the request asks for,
        or None."""
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            return "response_format", {"json_schema": {"type": "object"}}
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
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
    def _sampling_args(self) -> GenerationRequest:
        try:
            check_sampling_args(
                self.temperature if self.temperature is not None else 1.0, self.top_k, self.top_p, self.min_p
            )
        except ValueError as error:
            raise field_error("invalid_value", str(error)) from None
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

    def samplers(self, prompt: Sequence[int] = (), eos: Iterable[int] = ()) -> List[SamplerStrategy]:
        """``(strategy name, parameters, field)`` for the samplers the request turns on
        (``samplers.sampler_strategies``); ``prompt`` counts toward the penalties, ``eos``: the ids
        ``ban_eos_token`` bans."""
        return sampler_strategies(self, prompt, eos)

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

    @property
    def logprob_count(self) -> Optional[int]:
        """Alternatives to report per token, None for no logprobs (the routes that report them say
        how many)."""
        return None

    def token_limit(self) -> Optional[int]:
        """The max_tokens the request gave (None: not given)."""
        return self.max_tokens
