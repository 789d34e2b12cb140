"""The frontends' backends' routes, thin adapters over the same pipeline as the OpenAI routes (the
shapes are in ``frontends``): TabbyAPI's ``GET /v1/model``, ``/v1/model/list``, ``POST
/v1/token/encode|decode``; llama.cpp's ``POST /tokenize``, ``/detokenize`` (and its native
``/completion``, ``/props``, ``/slots``: ``llamacpp_api``); the KoboldAI API as
KoboldCpp serves it (``/api/v1/generate``, ``/api/extra/generate/stream``,
``/api/extra/generate/check``, ``/api/extra/abort``, ``/api/extra/tokencount``, the version and
config GETs, served without the API key: ``KOBOLD_INFO``). ``ROUTES`` lists them for ``create_app``."""

from __future__ import annotations

import hmac
import json
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, Type, TypeVar

from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import frontends, llamacpp_api
from .errors import APIError
from .limits import Limits
from .pipeline import read_body, start_generations
from .runner import Runner
from .schemas import parse_request

Handler = Callable[[Request], Awaitable[Response]]
M = TypeVar("M", bound=BaseModel)


def _kobold_text(kind: str, value: Any) -> str:
    return value if kind == "text" else value["text"] if kind == "final" else ""


async def kobold_generate(request: Request) -> Response:
    """``POST /api/v1/generate``: ``{"results": [{"text", "finish_reason"}]}``."""
    _, (answer,), (live,) = await start_generations(request, frontends.KoboldRequest, kobold=True)
    try:
        while True:
            kind, value = await answer.next(request.is_disconnected)
            live.parts.append(_kobold_text(kind, value))
            if kind == "error":
                raise value
            if kind == "done":
                return JSONResponse(
                    {
                        "results": [
                            {
                                "text": "".join(live.parts),
                                "finish_reason": frontends.kobold_finish(value["finish_reason"]),
                            }
                        ]
                    }
                )
    finally:
        answer.cancel()


async def kobold_stream(request: Request) -> Response:
    """``POST /api/extra/generate/stream``: KoboldCpp's events, ``event: message`` / ``data: {"token",
    "finish_reason"}``, the last one with the finish reason and no text."""
    _, (answer,), (live,) = await start_generations(request, frontends.KoboldRequest, kobold=True)

    async def events() -> AsyncIterator[str]:
        try:
            while True:
                kind, value = await answer.queue.get()
                text = _kobold_text(kind, value)
                if text:
                    live.parts.append(text)
                    yield frontends.kobold_event(text)
                elif kind == "error":
                    yield f"event: message\ndata: {json.dumps(frontends.kobold_error(value.body()))}\n\n"
                    break
                elif kind == "done":
                    yield frontends.kobold_event("", frontends.kobold_finish(value["finish_reason"]))
                    break
        finally:
            answer.cancel()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )


async def _small_body(request: Request, schema: Type[M], optional: bool = False) -> M:
    """A small request's body (tokenize, abort ...) as ``schema``; an empty one is ``schema()``
    when ``optional``."""
    limits: Limits = request.app.state.limits
    raw = await read_body(request, limits.max_body_bytes)
    if optional and not raw.strip():
        return schema()
    return parse_request(schema, raw, limits)


async def kobold_check(request: Request) -> Response:
    """``POST|GET /api/extra/generate/check``: the text of the latest generation with this ``genkey``
    (none: one without) so far, ``{"results": [{"text"}]}``."""
    body = await _small_body(request, frontends.AbortRequest, optional=True)
    genkey = body.genkey or ""
    live = next((live for live in reversed(request.app.state.live) if live.kobold and live.genkey == genkey), None)
    return JSONResponse({"results": [{"text": "".join(live.parts) if live else ""}]})


async def kobold_abort(request: Request) -> Response:
    """``POST /api/extra/abort``: ends generations at the next step, each answering with its text so
    far, by KoboldCpp's rule: with a ``genkey``, those with it (``{"success": "false", "done":
    "false"}`` when there is none); without (SillyTavern posts no body), the current generation
    whatever its genkey, unless other users' generations run or wait too (several genkeys): then
    only those without one, and nothing else."""
    body = await _small_body(request, frontends.AbortRequest, optional=True)
    unfinished = [live for live in request.app.state.live if not live.answer.job.done]
    users = {live.genkey for live in unfinished}
    if body.genkey:
        hits = [live for live in unfinished if live.genkey == body.genkey]
    else:
        hits = unfinished if len(users) <= 1 else [live for live in unfinished if not live.genkey]
    for live in hits:
        live.answer.abort()
    done = bool(hits) or (not body.genkey and len(users) <= 1)  # KoboldCpp: "done" unless it had to refuse
    return JSONResponse({"success": "true" if hits else "false", "done": "true" if done else "false"})


def _tokenizer(kind: str) -> Handler:
    async def tokenize(request: Request) -> Response:
        body = await _small_body(request, frontends.TextToTokens)
        provider = request.app.state.runner.provider
        add_bos = (kind != "llama") if body.add_bos_token is None else body.add_bos_token
        tokens = await run_in_threadpool(provider.encode, body.text, add_bos)
        pieces = [provider.decode([t]) for t in tokens] if body.with_pieces and kind == "llama" else None
        return JSONResponse(frontends.tokens_answer(kind, tokens, pieces))

    return tokenize


def _detokenizer(kind: str) -> Handler:
    async def detokenize(request: Request) -> Response:
        body = await _small_body(request, frontends.TokensToText)
        provider = request.app.state.runner.provider
        if body.tokens and max(body.tokens) >= provider.vocab_size:
            raise APIError(f"token ids must be in [0, {provider.vocab_size})", "tokens", "invalid_value")
        return JSONResponse(frontends.text_answer(kind, await run_in_threadpool(provider.decode, body.tokens)))

    return detokenize


def _tabby_card(request: Request) -> Dict[str, Any]:
    runner: Runner = request.app.state.runner
    return frontends.tabby_model_card(runner.name, runner.created, runner.provider.context_length, runner.parallel)


async def tabby_model(request: Request) -> Response:
    return JSONResponse(_tabby_card(request))


async def tabby_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_tabby_card(request)]})


async def kobold_info(request: Request) -> Response:
    """The KoboldAI API's GET routes (served without the key, as KoboldCpp does: SillyTavern's status
    check sends none): the model, the versions, the context and generation lengths."""
    runner: Runner = request.app.state.runner
    path, context = request.url.path.rstrip("/"), runner.provider.context_length
    if path.endswith("/model"):
        hidden = request.app.state.api_key and not _authorized(
            request.headers.get("authorization", ""), request.app.state.api_key
        )
        return JSONResponse({"result": "koboldcpp/protected-model" if hidden else runner.name})
    if path.endswith("/info/version"):
        return JSONResponse({"result": frontends.KOBOLD_API_VERSION})
    if path.endswith("/extra/version"):
        return JSONResponse(frontends.kobold_version(bool(request.app.state.api_key)))
    if path.endswith("/max_length"):
        return JSONResponse({"value": request.app.state.limits.max_tokens or context})
    return JSONResponse({"value": context})  # max_context_length, true_max_context_length


KOBOLD_INFO = (
    "/api/v1/model",
    "/api/v1/info/version",
    "/api/extra/version",
    "/api/v1/config/max_context_length",
    "/api/v1/config/max_length",
    "/api/extra/true_max_context_length",
)


def _authorized(header: str, api_key: str) -> bool:
    return hmac.compare_digest(header.encode(), f"Bearer {api_key}".encode())


ROUTES = [
    # TabbyAPI
    Route("/v1/model", tabby_model, methods=["GET"]),
    Route("/v1/model/list", tabby_models, methods=["GET"]),
    Route("/v1/token/encode", _tokenizer("tabby"), methods=["POST"]),
    Route("/v1/token/decode", _detokenizer("tabby"), methods=["POST"]),
    # llama.cpp
    Route("/tokenize", _tokenizer("llama"), methods=["POST"]),
    Route("/detokenize", _detokenizer("llama"), methods=["POST"]),
    *llamacpp_api.ROUTES,
    # KoboldAI API (KoboldCpp)
    Route("/api/v1/generate", kobold_generate, methods=["POST"]),
    Route("/api/extra/generate/stream", kobold_stream, methods=["POST"]),
    Route("/api/extra/generate/check", kobold_check, methods=["GET", "POST"]),
    Route("/api/extra/abort", kobold_abort, methods=["POST"]),
    Route("/api/extra/tokencount", _tokenizer("kobold"), methods=["POST"]),
    Route("/api/extra/detokenize", _detokenizer("kobold"), methods=["POST"]),
    *(Route(path, kobold_info, methods=["GET"]) for path in KOBOLD_INFO),
]
