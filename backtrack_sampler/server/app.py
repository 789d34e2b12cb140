"""An OpenAI-compatible HTTP server (Starlette + uvicorn) for BacktrackSampler.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``, ``GET /v1/backtrack/strategies`` (the strategies a
request may name, with the JSON Schema of their parameters), and the playground: ``GET /`` (a
page, see ``playground``) and ``POST /v1/backtrack/candidates`` (its human-guidance mode), and the
frontends' backends' routes (``frontend_routes``, shapes in ``frontends``): TabbyAPI's ``GET
/v1/model``, ``/v1/model/list``, ``POST /v1/token/encode|decode``; llama.cpp's ``POST /tokenize``,
``/detokenize``; the KoboldAI API (``/api/v1/generate``, ``/api/extra/generate/stream``,
``/api/extra/generate/check``, ``/api/extra/abort``, ``/api/extra/tokencount``, the version and
config GETs). One model is loaded at start. Streams are Server-Sent Events in OpenAI's shape ending
with ``data: [DONE]`` (``openai``); they carry only final text (the sampler never yields text it may
still rewind), plus, with ``stream_options: {"include_backtrack": true}``, extension chunks with the
generation's events (``events``). A client that disconnects stops its generation at the next token.

A request goes through three steps (``pipeline.start_generations`` runs them), each its own module:

1. **validate** (``schemas``, ``request``): the body, read up to ``Limits.max_body_bytes``, becomes
   a pydantic request; any problem is a 400/413 in OpenAI's error shape (``errors``);
2. **plan** (``plan.plan_request``, off the event loop): prompt tokens, the strategy built
   (``plan.build_strategy``: the frontends' samplers, banned phrases, ``strategy`` specs, grammar),
   sampling arguments, stop strings, the token and time limits: a ``Plan``; still before any waiting;
3. **execute** (``runner.Runner``): a ``BatchScheduler`` stepped by one background thread runs up to
   ``parallel`` generations at once (one backend call per step for all of them) and reports text
   to each request's ``Answer``; more wait in a bounded first-come-first-served queue (beyond it: 429
   with ``Retry-After``). A client that disconnects, running or queued, frees its place at the
   next step.

Extra request fields: the frontends' samplers and aliases (``request.GenerationRequest``,
``samplers``: ``rep_pen``, DRY, XTC, ``typical_p``, ``logit_bias``, token bans ...), ``top_k``,
``min_p``, ``banned_strings`` (list of phrases), ``banned_regex`` (a pattern or a list), ``strategy``
(a name, ``{"name": ..., params...}``, or a list of those, chained; a name is a built-in or a
strategy the server loaded: ``serve --load-strategy my_strategy.py:NoDigits``, ``create_app(...,
strategies=[NoDigits])``; never a module or file path). Start it with ``backtrack-sampler serve`` or
``serve(...)``; embed it with ``create_app(Runner(provider, parallel=N), api_key=...,
limits=Limits(...), strategies=...)``. This module holds the OpenAI and playground routes, the
error handlers, the API key check, ``create_app`` and ``serve``.
"""

from __future__ import annotations

import collections
import hmac
from typing import Any, Dict, Iterable, Optional, Union

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..core.batch import default_parallel
from ..provider.base_provider import BaseProvider
from ..provider.models import default_model, load_provider
from ..strategy.registry import StrategyRegistry, as_registry
from . import frontend_routes, frontends, playground
from .errors import APIError
from .limits import Limits
from .openai import Reply, error_response, streamed_answer, whole_answer
from .pipeline import GenerationSchema, read_body, start_generations
from .plan import build_strategy, chat_tokens, plan_request, prompt_tokens, token_limit
from .runner import ClientGone, Plan, QueueFull, Runner, StopFilter
from .schemas import ChatCompletionRequest, CompletionRequest, parse_request

Engine = Runner  # the old name of the local runner (the remote serving engines are ``engine/``)

__all__ = [
    "APIError",
    "Engine",
    "Limits",
    "Plan",
    "QueueFull",
    "StopFilter",
    "build_strategy",
    "create_app",
    "default_parallel",
    "plan_request",
    "serve",
]


async def _generate(request: Request, schema: GenerationSchema) -> Response:
    plan, answers, _ = await start_generations(request, schema, choices=True)
    reply = Reply(request.app.state.runner, plan)
    return streamed_answer(answers, reply) if plan.stream else await whole_answer(answers, request, reply)


async def completions(request: Request) -> Response:
    return await _generate(request, CompletionRequest)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, ChatCompletionRequest)


def _model_card(runner: Runner) -> Dict[str, Any]:
    return {"id": runner.name, "object": "model", "created": runner.created, "owned_by": "backtrack-sampler"}


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(request.app.state.runner)]})


async def model(request: Request) -> Response:
    runner, name = request.app.state.runner, request.path_params["model"]
    if name != runner.name:
        raise APIError(f"the model {name!r} does not exist", "model", "model_not_found", 404)
    return JSONResponse(_model_card(runner))


async def health(request: Request) -> Response:
    """Answers at once, whatever the model is doing: how many generations run and wait. 503 with
    ``"status": "error"`` and why when the model cannot serve: an engine behind the server that
    is down (``provider.health()``, asked in a worker thread: an HTTP engine's own ``/health``
    with a short timeout) or the scheduler's thread gone; a load balancer then takes this server
    out of rotation."""
    runner: Runner = request.app.state.runner
    check = getattr(runner.provider, "health", None)
    problem = await run_in_threadpool(check) if check is not None else None
    if problem is None and not runner.alive:
        problem = "the generation thread has stopped"
    if problem is not None:
        return JSONResponse({"status": "error", "model": runner.name, "error": problem}, status_code=503)
    return JSONResponse(
        {
            "status": "ok",
            "model": runner.name,
            "busy": runner.busy,
            "running": runner.running,
            "queued": runner.queued,
            "parallel": runner.parallel,
            "max_queue": runner.max_queue,
        }
    )


# Starlette calls a handler with the exception class it was registered for (its stubs type every
# handler's argument as Exception): each checks, and re-raises anything else.
async def _api_error(request: Request, error: Exception) -> Response:
    if not isinstance(error, APIError):
        raise error
    response = error_response(error)
    if request.url.path.startswith("/api/"):  # the KoboldAI API: KoboldCpp's "detail" too
        response = JSONResponse(frontends.kobold_error(error.body()), status_code=error.status)
    response.headers.update(error.headers)
    return response


async def _http_error(request: Request, error: Exception) -> Response:
    if not isinstance(error, HTTPException):
        raise error
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    return error_response(APIError(str(error.detail), None, code, error.status_code))


async def _client_gone(request: Request, error: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it


async def _server_error(request: Request, error: Exception) -> Response:
    return error_response(APIError(f"internal error: {type(error).__name__}: {error}", status=500, type="server_error"))


async def backtrack_candidates(request: Request) -> Response:
    """The playground's human guidance: the next-token candidates after the chosen tokens (a
    ``playground.CandidateSearch`` run by the runner's scheduler like any generation)."""
    runner: Runner = request.app.state.runner
    limits: Limits = request.app.state.limits
    body = parse_request(
        playground.CandidatesRequest,
        await read_body(request, limits.max_body_bytes),
        limits,
        request.app.state.strategies,
    )

    def plan() -> playground.CandidateSearch:
        provider = runner.provider
        if body.messages is not None:
            prompt = chat_tokens(provider, body.message_dicts())
        else:
            assert body.prompt is not None  # CandidatesRequest: prompt or messages
            prompt = prompt_tokens(provider, body.prompt)
        if body.tokens and max(body.tokens) >= provider.vocab_size:
            raise APIError(f"token ids must be in [0, {provider.vocab_size})", "tokens", "invalid_value")
        sampling = {key: value for key, value in body.sampling().items() if key != "seed"}
        return playground.CandidateSearch(
            provider,
            build_strategy(provider, body, limits),
            prompt,
            body.tokens,
            body.top_n,
            token_limit(provider, len(prompt), body, limits),
            **sampling,
        )

    search = await run_in_threadpool(plan)
    batch = await runner.finish(search)
    if batch.error is not None:
        raise APIError(
            f"generation failed: {type(batch.error).__name__}: {batch.error}",
            status=500,
            type="server_error",
            code="generation_failed",
        )
    return JSONResponse(search.result)


async def backtrack_strategies(request: Request) -> Response:
    """``GET /v1/backtrack/strategies``: every strategy a request may name (the built-ins and
    those loaded with ``--load-strategy``), each with its description, declared capabilities and
    the JSON Schema of its parameters."""
    return JSONResponse({"object": "list", "data": request.app.state.strategy_list})


ROUTES = [
    Route("/v1/backtrack/strategies", backtrack_strategies, methods=["GET"]),
    Route("/v1/backtrack/candidates", backtrack_candidates, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/models/{model:path}", model, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    *frontend_routes.ROUTES,
]
LIVE = 256  # generations the KoboldAI routes remember for check and abort (the latest)


def create_app(
    runner: Runner,
    api_key: Optional[str] = None,
    limits: Optional[Limits] = None,
    strategies: Union[None, StrategyRegistry, Iterable[Union[str, type]]] = None,
) -> Union[Starlette, ApiKeyCheck]:
    """The Starlette application serving ``runner`` (behind an ``ApiKeyCheck`` with ``api_key``). ``api_key`` (optional) is then required as
    ``Authorization: Bearer KEY`` on every route except ``/health``; ``limits``: what one request
    may ask for (default: ``Limits()``); ``strategies``: what a request may name, a
    ``StrategyRegistry`` or strategy classes / references to add to the built-ins (default: the
    built-ins). UsageError when one cannot be loaded or described."""
    registry = as_registry(strategies)
    strategy_list = [kind.schema() for kind in registry if kind.per_request]  # fails now, not on a request
    app = Starlette(
        routes=list(ROUTES) + playground.routes(),
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            ClientGone: _client_gone,
            Exception: _server_error,
        },
    )
    app.state.runner = runner
    app.state.limits = limits or Limits()
    app.state.api_key = api_key
    app.state.live = collections.deque(maxlen=LIVE)
    app.state.strategies, app.state.strategy_list = registry, strategy_list
    return ApiKeyCheck(app, api_key) if api_key else app


class ApiKeyCheck:
    """ASGI middleware: ``Authorization: Bearer KEY`` on every HTTP route except /health, the
    playground's page and files (the page asks for the key) and the KoboldAI API's GETs
    (``frontend_routes.KOBOLD_INFO``); ``state`` is the app's."""

    def __init__(self, app: Starlette, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()
        self.state = app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] == "http"
            and path != "/health"
            and not playground.public_path(path)
            and not (path.rstrip("/") in frontend_routes.KOBOLD_INFO and scope.get("method") == "GET")
        ):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "invalid API key" if given else "missing API key: send 'Authorization: Bearer KEY'"
                await error_response(APIError(message, None, "invalid_api_key", 401))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    backend: str = "llamacpp",
    model: Optional[str] = None,
    n_ctx: Optional[int] = None,
    threads: Optional[int] = None,
    model_name: Optional[str] = None,
    log_level: str = "info",
    limits: Optional[Limits] = None,
    parallel: Optional[int] = None,
    max_queue: Optional[int] = None,
    provider: Optional[BaseProvider] = None,
    strategies: Union[None, StrategyRegistry, Iterable[Union[str, type]]] = None,
) -> None:
    """Load the model (default: the embedded instruct model, for chat clients), or use ``provider``
    (e.g. an ``engine.EngineProvider``), and serve it until interrupted (Ctrl-C). ``parallel``:
    generations run at once (default: ``default_parallel()``; with an engine provider, its
    ``max_sequences``); ``max_queue``: requests that may wait (default 4 x parallel);
    ``strategies``: what requests may name besides the built-ins (see ``create_app``)."""
    import uvicorn

    strategies = as_registry(strategies)  # a strategy that cannot load fails before the model loads

    if provider is None:
        parallel = default_parallel() if parallel is None else parallel
        provider = load_provider(backend, model or default_model(chat=True), n_ctx, threads, slots=parallel)
    runner = Runner(provider, model_name, parallel, max_queue)
    try:
        uvicorn.run(
            create_app(runner, api_key, limits, strategies),
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=5,
        )
    finally:
        runner.close()
