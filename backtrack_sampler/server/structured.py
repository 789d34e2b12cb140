"""Structured output: OpenAI's ``response_format`` models, the fields that ask for a grammar
(``STRUCTURED_FIELDS``: llama-server's and TabbyAPI's too), and the size limit of a grammar
(``check_grammar_size``; its compile-time limit is checked when the strategy is built, see
``plan``). This module knows nothing about HTTP or the model."""

from __future__ import annotations

import json
from typing import Any, Dict, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..strategy.registry import StrategyType
from .errors import field_error
from .limits import Limits

STRUCTURED_FIELDS = ("response_format", "json_schema", "grammar", "grammar_string", "regex_pattern")
GRAMMAR_KEYS = ("json_schema", "grammar", "regex")  # GrammarStrategy's grammar parameters


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: ``{"name", "description", "schema", "strict"}`` (OpenAI's
    shape; the schema is always enforced, ``strict`` or not)."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[Dict[str, Any]] = Field(default=None, alias="schema")
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
            raise field_error("missing", 'response_format of type "json_schema" needs json_schema.schema')
        return self


def is_grammar(kind: StrategyType) -> bool:
    """Whether the strategy is a ``GrammarStrategy`` (its grammar is then checked like
    ``response_format``'s)."""
    from ..strategy.grammar_strategy import GrammarStrategy

    return isinstance(kind.cls, type) and issubclass(kind.cls, GrammarStrategy)


def check_grammar_size(params: Dict[str, Any], limits: Limits) -> None:
    """``max_grammar_chars`` for a GrammarStrategy's ``json_schema`` / ``grammar`` / ``regex``
    (the compile-time limit is checked when the strategy is built, off the event loop)."""
    for key in GRAMMAR_KEYS:
        value = params.get(key)
        if value is None:
            continue
        size = len(value) if isinstance(value, str) else len(json.dumps(value, separators=(",", ":")))
        if size > limits.max_grammar_chars:
            raise field_error(
                "string_above_max_length",
                f"the {key} is {size} characters long; this server takes at "
                f"most {limits.max_grammar_chars} (max_grammar_chars)",
            )
