"""What one request may ask for: the server's ``Limits`` (each a ``serve`` option and a
``create_app(engine, limits=Limits(...))`` argument), checked while a body is validated and planned."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class Limits(BaseModel):
    """What one request may ask for. Each is a ``serve`` option (``--max-body-bytes`` ...) and a
    ``create_app(engine, limits=Limits(...))`` argument; a request beyond one gets a 400 (413 for
    the body size) in OpenAI's error shape before it waits for the model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_body_bytes: int = Field(default=4 * 2**20, gt=0, description="request body size in bytes (413 beyond it)")
    max_banned_strings: int = Field(
        default=10_000, gt=0, description="banned_strings per request (also a strategy's slops/find)"
    )
    max_banned_string_chars: int = Field(default=200, gt=0, description="characters in one banned string")
    max_regexes: int = Field(default=32, gt=0, description="banned_regex patterns per request")
    max_regex_chars: int = Field(default=500, gt=0, description="characters in one pattern")
    max_stop: int = Field(default=16, gt=0, description="stop strings per request")
    max_stop_chars: int = Field(default=500, gt=0, description="characters in one stop string")
    max_messages: int = Field(default=1000, gt=0, description="messages in one chat request")
    max_message_chars: int = Field(default=200_000, gt=0, description="characters in one message")
    max_tokens: Optional[int] = Field(
        default=None,
        gt=0,
        description="largest max_tokens (default: the room the context "
        "leaves after the prompt; beyond that room: context_length_exceeded)",
    )
    max_seconds: float = Field(
        default=300.0,
        gt=0,
        description="wall-clock seconds one generation may run, from when it "
        'starts; then it ends with finish_reason "length"',
    )
    max_grammar_chars: int = Field(
        default=100_000,
        gt=0,
        description="characters in one structured-output JSON Schema "
        "(as compact JSON), grammar or regex (response_format, json_schema, grammar, ...)",
    )
    max_grammar_seconds: float = Field(
        default=2.0,
        gt=0,
        description="seconds a structured-output grammar may take to compile (in a child process, killed beyond it)",
    )
    max_token_ids: int = Field(
        default=10_000,
        gt=0,
        description="token ids in one request's logit_bias, banned_tokens "
        "and custom_token_bans (each), and in a tokenize/detokenize request",
    )
    max_sequence_breakers: int = Field(
        default=64,
        gt=0,
        description="dry_sequence_breakers per request (each at most max_banned_string_chars characters)",
    )
    max_choices: int = Field(
        default=8, gt=0, description="n: generations of one request (each takes a slot or a place in the queue)"
    )
