"""The server's errors in OpenAI's shape: ``APIError`` (``{"error": {"message", "type", "param",
"code"}}`` with an HTTP status), and the one mapping from pydantic's validation errors to it
(``validation_error``; ``field_error`` is the error a request model's own check raises, with an OpenAI
code as its type). This module knows nothing about HTTP or the model."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from ..strategy.registry import describe_error


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
        self.headers: Dict[str, str] = {}  # sent with the answer (QueueFull: Retry-After)

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# pydantic's error types -> OpenAI's error codes (``field_error``s use OpenAI's codes as their type)
PYDANTIC_CODES = {
    "missing": "missing_required_parameter",
    "extra_forbidden": "unknown_parameter",
    "json_invalid": "invalid_json",
    "too_long": "array_above_max_length",
    "string_too_long": "string_above_max_length",
    "too_short": "invalid_value",
    "string_too_short": "invalid_value",
}

OPENAI_CODES = {
    "invalid_value",
    "invalid_type",
    "unsupported_value",
    "array_above_max_length",
    "string_above_max_length",
    "integer_above_max_value",
}  # the codes the request models' own checks raise (``field_error``)


def openai_code(kind: str) -> str:
    """OpenAI's error code for a pydantic error type (or one of ``OPENAI_CODES``, kept)."""
    if kind in PYDANTIC_CODES or kind in OPENAI_CODES:
        return PYDANTIC_CODES.get(kind, kind)
    return "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"


def field_error(code: str, message: str) -> PydanticCustomError:
    """The error a request model's check raises: ``code`` (one of ``OPENAI_CODES``) becomes the
    answer's code, ``message`` its message (braces kept as they are)."""
    return PydanticCustomError(code, message.replace("{", "{{").replace("}", "}}"))


def validation_error(error: ValidationError, prefix: Sequence[Union[str, int]] = ()) -> APIError:
    """The one mapping from pydantic's errors to OpenAI's shape: the first error, its field as
    ``param`` (``messages[0].role``, under ``prefix``), a code in OpenAI's vocabulary."""
    param, message, kind = describe_error(error, prefix, OPENAI_CODES | {"missing"})
    return APIError(f"{param}: {message}" if param else message, param, openai_code(kind))
