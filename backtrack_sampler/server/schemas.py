"""The OpenAI routes' request models (pydantic v2) and ``parse_request``, which reads any route's body.

``CompletionRequest`` and ``ChatCompletionRequest`` are ``request.GenerationRequest`` (the OpenAI
fields the server supports plus its own: ``top_k``, ``min_p``, ``banned_strings``, ``banned_regex``,
``strategy``, the frontends' samplers) with their prompt. Parse a body with ``parse_request(model,
raw, limits, strategies)``: every problem, pydantic's, a limit's or a strategy parameter's (checked
by the strategy's own model, see ``strategy_specs``), comes back as one ``APIError`` in OpenAI's
shape (``{"error": {"message", "type", "param", "code"}}``). A request names only strategies the
``StrategyRegistry`` offers: never a module or a file. This module knows nothing about HTTP or the
model; ``plan`` turns a parsed request into tokens and a strategy.

The names this module had before the server was split (``Limits``, ``APIError``,
``BUILTIN_STRATEGIES``, ``StrategySpec``, ...) are importable from it still.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Literal, Optional, Type, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ..strategy.registry import StrategyRegistry
from .errors import APIError, field_error, validation_error
from .fields import check_regex, limits_of
from .limits import Limits
from .request import MAX_STRATEGIES, GenerationRequest, StreamOptions
from .samplers import IGNORED_FIELDS
from .strategy_specs import BUILTIN_STRATEGIES, StrategySpec, check_strategies
from .structured import GRAMMAR_KEYS, STRUCTURED_FIELDS, JsonSchemaFormat, ResponseFormat, check_grammar_size

MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's top_logprobs maximum)

R = TypeVar("R", bound=BaseModel)


def parse_request(model: Type[R], raw: bytes, limits: Limits, strategies: Optional[StrategyRegistry] = None) -> R:
    """``raw`` (a JSON body) as a ``model``, checked against ``limits``; its ``strategy`` specs
    may name what ``strategies`` offers (default: the built-ins). Raises ``APIError``."""
    strategies = strategies or BUILTIN_STRATEGIES
    try:
        request = model.model_validate_json(raw, context={"limits": limits, "strategies": strategies})
    except ValidationError as error:
        raise validation_error(error) from None
    if isinstance(request, GenerationRequest):
        check_strategies(request.strategy or [], strategies, limits)
    return request


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: ``prompt`` is a string or a list of token ids (a batch of one of
    either is accepted too); ``max_tokens`` defaults to 16, as OpenAI's does."""

    prompt: Union[str, List[int]]
    echo: Optional[bool] = None
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, value: Any) -> Union[str, List[int]]:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]  # a batch of one
        if isinstance(value, str):
            if not value:
                raise field_error("invalid_value", "prompt is empty")
            return value
        if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
            raise field_error("unsupported_value", "only one prompt per request is supported")
        raise field_error("invalid_type", "prompt must be a non-empty string or a list of token ids")

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, False, ""):
            raise field_error("unsupported_value", f"{info.field_name} is not supported")
        return value

    @property
    def logprob_count(self) -> Optional[int]:
        """Alternatives to report per token (None: no logprobs; 0 is off too, as TabbyAPI reads it)."""
        return self.logprobs or None

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: Optional[int]) -> Optional[int]:
        if value not in (None, 1):
            raise field_error("unsupported_value", "only best_of=1 is supported")
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
                    raise field_error("invalid_value", "only text content parts are supported")
                parts.append(part["text"])
            value = "".join(parts)
        if isinstance(value, str) and len(value) > limits_of(info).max_message_chars:
            cap = limits_of(info).max_message_chars
            raise field_error(
                "string_above_max_length", f"a message is at most {cap} characters long, got {len(value)}"
            )
        return value

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.content is None:
            if self.role != "assistant":
                raise field_error("invalid_type", "content must be a string or a list of text parts")
            self.content = ""
        return self


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``: ``messages`` rendered with the model's chat template;
    ``max_completion_tokens`` is ``max_tokens``' newer name."""

    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=0)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @property
    def logprob_count(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("messages", mode="before")
    @classmethod
    def _count(cls, value: Any, info: ValidationInfo) -> Any:
        cap = limits_of(info).max_messages
        if isinstance(value, list) and len(value) > cap:
            raise field_error("array_above_max_length", f"at most {cap} messages per request, got {len(value)}")
        return value

    def token_limit(self) -> Optional[int]:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens

    def message_dicts(self) -> List[Dict[str, str]]:
        return [{"role": m.role, "content": m.content or ""} for m in self.messages]


__all__ = [
    "BUILTIN_STRATEGIES",
    "GRAMMAR_KEYS",
    "IGNORED_FIELDS",
    "MAX_LOGPROBS",
    "MAX_STRATEGIES",
    "STRUCTURED_FIELDS",
    "APIError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "GenerationRequest",
    "JsonSchemaFormat",
    "Limits",
    "ResponseFormat",
    "StrategySpec",
    "StreamOptions",
    "TextPart",
    "check_grammar_size",
    "check_regex",
    "check_strategies",
    "parse_request",
    "validation_error",
]
