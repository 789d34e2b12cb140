"""What the frontends' backends speak, besides OpenAI's API: the request bodies and answer shapes
of TabbyAPI's model and token routes, llama.cpp's ``/tokenize`` and ``/detokenize``, and the
KoboldAI API as KoboldCpp serves it (``/api/v1/generate``, ``/api/extra/generate/stream``, ...).

Shapes follow the backends' sources: TabbyAPI ``endpoints/core/router.py`` and
``endpoints/core/types/{model,token}.py``; KoboldCpp ``koboldcpp.py`` (``generate``,
``transform_genparams``, the GET/POST routes); llama.cpp ``tools/server``. The HTTP handlers are in
``frontend_routes``; this module knows nothing about HTTP or the model.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .errors import field_error
from .fields import alias, limits_of, token_ids
from .schemas import CompletionRequest

KOBOLD_API_VERSION = "1.2.5"  # KoboldCpp's /api/v1/info/version
KOBOLDCPP_VERSION = "1.76"  # the KoboldCpp whose API this follows (ST enables features by it)


class KoboldRequest(CompletionRequest):
    """``POST /api/v1/generate`` and ``/api/extra/generate/stream``: KoboldCpp's ``genparams``, with
    its defaults (``max_length`` 180, ``temperature`` 0.7, ``top_k`` 100, ``top_p`` 0.92,
    ``rep_pen_range`` and ``dry_penalty_last_n`` 320). ``memory`` is put before ``prompt``;
    ``banned_tokens`` is a list of phrases (KoboldCpp reads it first, then ``banned_strings``; both
    are banned here); ``use_default_badwordsids`` is ``ban_eos_token``; ``genkey`` names the
    generation for ``/api/extra/generate/check`` and ``/api/extra/abort``. Stop strings are always
    cut from the text (KoboldCpp's ``trim_stop``)."""

    temperature: Optional[float] = Field(0.7, ge=0)
    top_k: Optional[int] = Field(100, ge=0)
    top_p: Optional[float] = Field(0.92, gt=0, le=1)
    ban_eos_token: Optional[bool] = Field(
        None, validation_alias=alias("ban_eos_token", "use_default_badwordsids", "ignore_eos")
    )
    memory: Optional[str] = None
    genkey: Optional[str] = Field(None, max_length=200)
    max_context_length: Optional[int] = Field(None, ge=1)

    default_max_tokens: ClassVar[Optional[int]] = 180
    default_penalty_range: ClassVar[int] = 320
    default_dry_range: ClassVar[int] = 320

    @field_validator("memory")
    @classmethod
    def _memory_size(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        cap = limits_of(info).max_message_chars
        if value and len(value) > cap:
            raise field_error("string_above_max_length", f"memory is at most {cap} characters long, got {len(value)}")
        return value

    @model_validator(mode="after")
    def _with_memory(self) -> KoboldRequest:
        if self.memory and isinstance(self.prompt, str):
            self.prompt = self.memory + self.prompt
        return self


class _TokenRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextToTokens(_TokenRequest):
    """The text of a tokenize request: TabbyAPI's ``text``, llama.cpp's ``content``, KoboldCpp's
    ``prompt``; ``add_bos_token`` (TabbyAPI, default true), ``add_special`` (llama.cpp, default
    false), ``special`` (KoboldCpp, default true) say whether the BOS token is added."""

    text: str = Field(validation_alias=alias("text", "content", "prompt"))
    add_bos_token: Optional[bool] = Field(None, validation_alias=alias("add_bos_token", "add_special", "special"))
    with_pieces: bool = False  # llama.cpp: [{"id", "piece"}] instead of ids

    @field_validator("text")
    @classmethod
    def _size(cls, value: str, info: ValidationInfo) -> str:
        cap = limits_of(info).max_message_chars
        if len(value) > cap:
            raise field_error(
                "string_above_max_length",
                f"the text is at most {cap} characters long (max_message_chars), got {len(value)}",
            )
        return value


class TokensToText(_TokenRequest):
    """Token ids to decode: ``tokens`` (TabbyAPI, llama.cpp) or ``ids`` (KoboldCpp)."""

    tokens: List[int] = Field(validation_alias=alias("tokens", "ids"))

    @field_validator("tokens", mode="before")
    @classmethod
    def _ids(cls, value: Any, info: ValidationInfo) -> Any:
        return token_ids(value, "tokens", limits_of(info).max_token_ids)


class AbortRequest(_TokenRequest):
    """``/api/extra/abort`` and ``/api/extra/generate/check``: an optional ``genkey`` (the body may be
    empty: SillyTavern posts none)."""

    genkey: Optional[str] = Field(None, max_length=200)


# --- answers ------------------------------------------------------------------------------------
def tabby_model_card(name: str, created: int, context_length: int, parallel: int) -> Dict[str, Any]:
    """TabbyAPI's ``ModelCard`` (``GET /v1/model``; ``/v1/model/list`` lists it)."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "backtrack-sampler",
        "parameters": {
            "max_seq_len": context_length,
            "cache_size": context_length,
            "max_batch_size": parallel,
            "prompt_template": None,
        },
    }


def kobold_version(protected: bool) -> Dict[str, Any]:
    """KoboldCpp's ``GET /api/extra/version``."""
    return {
        "result": "KoboldCpp",
        "version": KOBOLDCPP_VERSION,
        "protected": protected,
        "txt2img": False,
        "vision": False,
        "transcribe": False,
        "multiplayer": False,
        "websearch": False,
    }


def kobold_event(token: str, finish_reason: Optional[str] = None) -> str:
    """One event of KoboldCpp's stream (``send_kai_sse_event``)."""
    import json

    return (
        f"event: message\ndata: {json.dumps({'token': token, 'finish_reason': finish_reason}, ensure_ascii=False)}\n\n"
    )


def kobold_error(body: Dict[str, Any]) -> Dict[str, Any]:
    """An OpenAI-shaped error body with KoboldCpp's ``detail`` too (``{"msg", "type"}``, which
    SillyTavern shows)."""
    error = body["error"]
    return {**body, "detail": {"msg": error["message"], "type": error["code"] or error["type"]}}


def kobold_finish(finish: Optional[str]) -> str:
    return "length" if finish == "length" else "stop"


def tokens_answer(kind: str, tokens: List[int], pieces: Optional[List[str]] = None) -> Dict[str, Any]:
    """``kind`` "tabby" ``{"tokens", "length"}``, "llama" ``{"tokens"}`` (with pieces: ``[{"id",
    "piece"}]``), "kobold" ``{"value", "ids"}``."""
    if kind == "tabby":
        return {"tokens": tokens, "length": len(tokens)}
    if kind == "kobold":
        return {"value": len(tokens), "ids": tokens}
    if pieces is not None:
        return {"tokens": [{"id": t, "piece": p} for t, p in zip(tokens, pieces)]}
    return {"tokens": tokens}


def text_answer(kind: str, text: str) -> Dict[str, Any]:
    """Decoded text: TabbyAPI ``{"text"}``, llama.cpp ``{"content"}``, KoboldCpp ``{"result", "success"}``."""
    return {"tabby": {"text": text}, "llama": {"content": text}}.get(kind) or {"result": text, "success": True}


__all__ = [
    "AbortRequest",
    "KoboldRequest",
    "TextToTokens",
    "TokensToText",
    "kobold_error",
    "kobold_event",
    "kobold_finish",
    "kobold_version",
    "tabby_model_card",
    "text_answer",
    "tokens_answer",
]
