"""The checks the request models share (the OpenAI routes', the frontends', the playground's):
strings within their limits, token ids in any of the frontends' forms, DRY sequence breakers,
banned regexes, field aliases, and the ``Limits`` a validation runs under (``limits_of``). Each
raises ``errors.field_error`` with an OpenAI code, which ``parse_request`` turns into an ``APIError``."""

from __future__ import annotations

import json
from typing import Any, List

from pydantic import AliasChoices, ValidationInfo

from ..strategy._regex import compile_regex
from .errors import field_error
from .limits import Limits


def limits_of(info: ValidationInfo) -> Limits:
    """The ``Limits`` the validation runs under (``parse_request``'s context; default: ``Limits()``)."""
    return (info.context or {}).get("limits") or Limits()


def check_strings(values: List[str], what: str, max_count: int, max_chars: int) -> List[str]:
    """``values`` when there are at most ``max_count`` of them, none empty and none longer than
    ``max_chars`` characters; ``what`` names them in the error."""
    if len(values) > max_count:
        raise field_error("array_above_max_length", f"at most {max_count} {what} per request, got {len(values)}")
    for i, value in enumerate(values):
        if not value:
            raise field_error("invalid_value", f"{what} must not be empty (item {i})")
        if len(value) > max_chars:
            raise field_error(
                "string_above_max_length", f"{what} are at most {max_chars} characters long, item {i} has {len(value)}"
            )
    return values


def one_or_many(value: Any) -> Any:
    """A string as a list of one (``stop: "END"``); anything else as it is."""
    return [value] if isinstance(value, str) else value


def alias(*names: str) -> AliasChoices:
    """A field read from the first of ``names`` the request has (the frontends' names for it)."""
    return AliasChoices(*names)


def token_ids(value: Any, what: str, limit: int) -> List[int]:
    """Token ids given as a list of ints or a comma-separated string ("1, 2,3": SillyTavern,
    KoboldCpp, TabbyAPI); empty pieces are skipped. At most ``limit`` of them."""
    if isinstance(value, str):
        pieces = [piece.strip() for piece in value.split(",")]
        if not all(piece.isdigit() for piece in pieces if piece):
            raise field_error(
                "invalid_value", f"{what} must be token ids: a list of integers or a comma-separated string of them"
            )
        value = [int(piece) for piece in pieces if piece]
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise field_error(
            "invalid_type", f"{what} must be token ids: a list of integers >= 0 or a comma-separated string"
        )
    if len(value) > limit:
        raise field_error(
            "array_above_max_length", f"at most {limit} token ids in {what} (max_token_ids), got {len(value)}"
        )
    return value


def sequence_breakers(value: Any) -> Any:
    """DRY sequence breakers: a list, a JSON array in a string (SillyTavern sends '["\\n", ":"]'), or
    the items of one without the brackets ('"\\n", ":"', as TabbyAPI reads it)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text if text.startswith("[") else f"[{text}]")
        except ValueError:
            raise field_error(
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
        raise field_error("invalid_value", str(error)) from None


def phrases(value: Any) -> List[Any]:
    """The phrases in a strategy's ``slops``/``find`` value (strings or [phrase, multiplier] pairs),
    as given (strings, once the strategy's own model has validated them)."""
    items = [value] if isinstance(value, str) else list(value.keys()) if isinstance(value, dict) else value
    if not isinstance(items, list):
        return []
    return [item[0] if isinstance(item, list) and item else item for item in items if isinstance(item, (str, list))]
