"""An OpenAI-compatible HTTP server (Starlette + uvicorn) for BacktrackSampler.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``, ``GET /v1/backtrack/strategies`` (the strategies a
request may name, with the JSON Schema of their parameters), and the playground: ``GET /`` (a
page, see ``playground``) and ``POST /v1/backtrack/candidates`` (its human-guidance mode), and the
frontends' backends' routes (shapes in ``frontends``): TabbyAPI's ``GET /v1/model``,
``/v1/model/list``, ``POST /v1/token/encode|decode``; llama.cpp's ``POST /tokenize``,
``/detokenize``; the KoboldAI API (``/api/v1/generate``, ``/api/extra/generate/stream``,
``/api/extra/generate/check``, ``/api/extra/abort``, ``/api/extra/tokencount``, the version and
config GETs). One model is loaded at start. Streams are Server-Sent Events in OpenAI's shape ending with ``data: [DONE]``;
they carry only final text (the sampler never yields text it may still rewind), plus, with
``stream_options: {"include_backtrack": true}``, extension chunks with the generation's events
(``events``). A client that disconnects stops its generation at the next token.

A request goes through three steps, each its own piece below:

1. **validate** (``schemas``): the body, read up to ``Limits.max_body_bytes``, becomes a pydantic
   request; any problem is a 400/413 in OpenAI's error shape;
2. **plan** (``plan_request``, off the event loop): prompt tokens, the strategy built, sampling
   arguments, stop strings, the token and time limits: a ``Plan``; still before any waiting;
3. **execute** (``runner.Runner``): a ``BatchScheduler`` stepped by one background thread runs up to
   ``parallel`` generations at once (one backend call per step for all of them) and reports text
   to each request's ``Job``; more wait in a bounded first-come-first-served queue (beyond it: 429
   with ``Retry-After``). A client that disconnects, running or queued, frees its place at the
   next step.

Extra request fields: the frontends' samplers and aliases (``schemas._Request``: ``rep_pen``, DRY,
XTC, ``typical_p``, ``logit_bias``, token bans ...), ``top_k``, ``min_p``, ``banned_strings`` (list of phrases),
``banned_regex`` (a pattern or a list), ``strategy`` (a name, ``{"name": ..., params...}``, or a
list of those, chained; a name is a built-in or a strategy the server loaded: ``serve
--load-strategy my_strategy.py:NoDigits``, ``create_app(..., strategies=[NoDigits])``; never a
module or file path). Start it with ``backtrack-sampler serve`` or ``serve(...)``; embed it with
``create_app(Runner(provider, parallel=N), api_key=..., limits=Limits(...), strategies=...)``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import time
import uuid
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..core.batch import default_parallel
from ..core.generation import TokenLogprob
from ..errors import UsageError
from ..provider.base_provider import BaseProvider
from ..provider.chat import chat_prompt_tokens
from ..provider.models import default_model, load_provider
from ..strategy.base_strategy import BaseStrategy
from ..strategy.registry import StrategyRegistry, as_registry, chain
from . import frontends, playground
from .runner import Job, Plan, QueueFull, Runner, StopFilter, _ClientGone  # noqa: F401 (re-exported)
from .schemas import (
    BUILTIN_STRATEGIES,
    GRAMMAR_KEYS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    Limits,
    _is_grammar,
    parse_request,
)

Engine = Runner  # the old name of the local runner (the remote serving engines are ``engine/``)

__all__ = [
    "APIError",
    "Engine",
    "Limits",
    "Plan",
    "QueueFull",
    "StopFilter",
    "create_app",
    "default_parallel",
    "plan_request",
    "serve",
]


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


# --------------------------------------------------------------------------------------------
# 1. validate: the body, within its size limit, as a pydantic request (schemas.py)
# --------------------------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    """The request body; a 413 as soon as it is known to exceed ``limit`` bytes (from its
    Content-Length, else while it streams in), without reading the rest."""
    too_large = APIError(
        f"the request body is larger than this server's limit of {limit} bytes (max_body_bytes)",
        None,
        "request_too_large",
        status=413,
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


# --------------------------------------------------------------------------------------------
# 2. plan: a validated request becomes the tokens, strategy and limits of one generation
# --------------------------------------------------------------------------------------------
def plan_request(
    provider: BaseProvider, request: Union[CompletionRequest, ChatCompletionRequest], limits: Limits, index: int = 0
) -> Plan:
    """Tokens, strategy and limits for ``request``; raises ``APIError`` (400). Blocking (it
    tokenizes and builds the strategy): the server runs it in a worker thread. ``index``: which of
    the request's ``n`` generations (its seed is the request's + index)."""
    chat = isinstance(request, ChatCompletionRequest)
    prompt = _chat_tokens(provider, request) if chat else _prompt_tokens(provider, request.prompt)
    sampling = dict(request.sampling(), max_new_tokens=_token_limit(provider, len(prompt), request, limits))
    if index and sampling["seed"] is not None:
        sampling["seed"] += index
    strategy = build_strategy(provider, request, limits, prompt)
    return Plan(
        chat,
        prompt,
        strategy,
        sampling,
        request.stop or [],
        limits.max_seconds,
        bool(request.stream),
        request.include_usage,
        request.include_backtrack,
        request.logprob_count,
        tuple(getattr(request, "ignored_fields", ())),
    )


def _prompt_tokens(provider: BaseProvider, prompt: Union[str, List[int]]) -> List[int]:
    if isinstance(prompt, str):
        tokens = provider.encode(prompt, add_special_tokens=True)
    else:
        if min(prompt) < 0 or max(prompt) >= provider.vocab_size:
            raise APIError(f"prompt token ids must be in [0, {provider.vocab_size})", "prompt", "invalid_value")
        tokens = list(prompt)
    return _check_room(provider, tokens, "prompt")


def _chat_tokens(provider: BaseProvider, request: ChatCompletionRequest) -> List[int]:
    try:
        tokens = chat_prompt_tokens(provider, request.message_dicts())
    except Exception as error:  # a template that rejects the conversation (raise_exception, ...)
        raise APIError(f"the chat template rejected the messages: {error}", "messages", "invalid_value") from None
    return _check_room(provider, tokens, "messages")


def _check_room(provider: BaseProvider, tokens: List[int], param: str) -> List[int]:
    context = provider.context_length
    if len(tokens) >= context:
        raise APIError(
            f"the prompt is {len(tokens)} tokens long, which leaves no room in the model's context of {context} tokens",
            param,
            "context_length_exceeded",
        )
    return tokens


def _token_limit(provider: BaseProvider, prompt_length: int, request, limits: Limits) -> int:
    """max_tokens, checked against the room the context leaves (OpenAI's context_length_exceeded)."""
    room = provider.context_length - prompt_length
    asked = request.token_limit()
    if asked is not None and asked > room:
        param = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) is not None else "max_tokens"
        raise APIError(
            f"This model's maximum context length is {provider.context_length} tokens. However, you requested "
            f"{prompt_length + asked} tokens ({prompt_length} in the prompt, {asked} for the completion). "
            "Please reduce the prompt or the completion length.",
            param,
            "context_length_exceeded",
        )
    limit = min(room, request.default_max_tokens or room) if asked is None else asked
    return limit if limits.max_tokens is None else min(limit, limits.max_tokens)


def build_strategy(
    provider: BaseProvider, request, limits: Optional[Limits] = None, prompt: Sequence[int] = ()
) -> BaseStrategy:
    """The request's strategy: first the samplers it turns on (``request.samplers``: logit bias
    and token bans, penalties, DRY, typical-p, XTC; ``prompt`` counts toward the penalties), then
    AntiSlop for ``banned_strings``/``banned_regex`` (and KoboldCpp's ``banned_tokens`` phrases),
    then the ``strategy`` specs (validated by ``parse_request``), then the grammar of its
    structured output (``response_format``, ``json_schema``, ``grammar``/``grammar_string``,
    ``regex_pattern``), last so that its mask has the last word; chained. Every grammar is
    compiled within ``limits.max_grammar_seconds`` first (a 400 beyond it)."""
    limits = limits or Limits()
    strategies = []
    samplers = getattr(request, "samplers", None)
    for name, params, param in samplers(prompt, provider.eos_token_ids) if samplers else ():
        strategies.append(_built(lambda: BUILTIN_STRATEGIES.get(name).build(provider, params), param))
    phrases = getattr(request, "banned_phrases", request.banned_strings)
    if phrases or request.banned_regex:
        params: Dict[str, Any] = {"slops": phrases or []}
        if request.banned_regex:
            params["regexes"] = request.banned_regex
        param = "banned_strings" if phrases else "banned_regex"
        strategies.append(_built(lambda: BUILTIN_STRATEGIES.get("antislop").build(provider, params), param))
    for i, spec in enumerate(request.strategy or []):
        if _is_grammar(spec.call.type):
            _checked_grammar(spec.call.kwargs, limits, f"strategy[{i}]")
        strategies.append(_built(lambda: spec.call.build(provider), f"strategy[{i}]"))
    structured = getattr(request, "structured_output", None)
    if structured is not None:
        field, params = structured
        _checked_grammar(params, limits, field)
        strategies.append(_built(lambda: BUILTIN_STRATEGIES.get("grammar").build(provider, params), field))
    try:
        return chain(strategies)
    except UsageError as error:
        raise APIError(str(error), "strategy", "invalid_value") from None


def _checked_grammar(params: Dict[str, Any], limits: Limits, param: str) -> None:
    """A request's grammar within ``max_grammar_chars`` and compiled within ``max_grammar_seconds``
    (``grammar_strategy.check_grammar``: a child process, killed beyond it); else a 400 naming it."""
    from ..strategy.grammar_strategy import GrammarError, check_grammar

    grammar = {key: params.get(key) for key in GRAMMAR_KEYS}
    try:
        check_grammar(
            **grammar,
            whitespace_flexible=bool(params.get("whitespace_flexible")),
            max_chars=limits.max_grammar_chars,
            timeout=limits.max_grammar_seconds,
        )
    except GrammarError as error:
        message = str(error) if str(error).startswith(f"{param}: ") else f"{param}: {error}"
        raise APIError(message, param, "invalid_value") from None
    except ImportError as error:
        raise APIError(
            f"{param}: structured output is not available on this server ({error})", param, "unsupported_value"
        ) from None


def _built(build, param: str) -> BaseStrategy:
    """``build()``, with a constructor's refusal as a 400 naming ``param``."""
    try:
        return build()
    except UsageError as error:
        raise APIError(str(error), param, "invalid_value") from None


# --------------------------------------------------------------------------------------------
# responses in OpenAI's shapes
# --------------------------------------------------------------------------------------------
class _Reply:
    """The OpenAI objects of one answer (completion, chunks, usage) with one choice per generation."""

    def __init__(self, engine: Engine, plan: Plan):
        self.model, self.plan, self.decode = engine.name, plan, engine.provider.decode
        self.id = ("chatcmpl-" if plan.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.offsets: Dict[int, int] = collections.defaultdict(int)  # text_offset of each choice's next token

    def logprobs(self, entries: List[TokenLogprob], text: Optional[str] = None, index: int = 0) -> Optional[dict]:
        """OpenAI's logprobs object of these final tokens (None when the request asked for none):
        completions' ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, chat's
        ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``. ``text``: the answer's
        whole text; tokens that start past its end (cut by a stop string) are left out."""
        if self.plan.logprobs is None:
            return None
        if text is not None:
            entries = self.covering(entries, text)[0]
        pieces = [self.decode([entry.token]) for entry in entries]
        if self.plan.chat:

            def item(token: str, logprob: float) -> dict:
                return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

            return {
                "content": [
                    {**item(piece, entry.logprob), "top_logprobs": [item(self.decode([t]), lp) for t, lp in entry.top]}
                    for entry, piece in zip(entries, pieces)
                ]
            }
        offsets = []
        for piece in pieces:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(piece)
        return {
            "tokens": pieces,
            "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [{self.decode([t]): lp for t, lp in entry.top} for entry in entries],
            "text_offset": offsets,
        }

    def covering(self, entries: List[TokenLogprob], text: str) -> tuple:
        """``(the first entries, the rest)``: as many tokens as it takes to cover ``text`` (the
        others are held-back text, or a stop string's, which never reaches the client)."""
        start, keep = 0, 0
        while keep < len(entries) and start < len(text):
            start, keep = start + len(self.decode([entries[keep].token])), keep + 1
        return entries[:keep], entries[keep:]

    def _head(self, obj: str) -> Dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, dones: List[dict]) -> dict:
        prompt, completion = len(self.plan.prompt), sum(done["completion_tokens"] for done in dones)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def completion(self, results: List[tuple]) -> dict:
        """``results``: ``(text, done, logprobs)`` of each generation."""
        choices = []
        for index, (text, done, logprobs) in enumerate(results):
            choice: Dict[str, Any] = {
                "index": index,
                "finish_reason": openai_finish(done["finish_reason"]),
                "logprobs": self.logprobs(logprobs, text, index),
            }
            if self.plan.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        dones = [done for _, done, _ in results]
        info = _backtrack_info(dones)
        if self.plan.ignored:
            info["ignored"] = list(self.plan.ignored)
        return {
            **self._head("chat.completion" if self.plan.chat else "text_completion"),
            "choices": choices,
            "usage": self.usage(dones),
            "backtrack": info,
        }

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.plan.chat else "text_completion"

    def chunk(
        self,
        text: Optional[str],
        finish: Optional[str] = None,
        first: bool = False,
        logprobs: Optional[List[TokenLogprob]] = None,
        index: int = 0,
    ) -> dict:
        report = self.logprobs(logprobs, index=index) if logprobs else None
        if self.plan.chat:
            delta: Dict[str, Any] = {} if text is None else {"content": text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": report}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": report}
        data = {**self._head(self.chunk_object), "choices": [choice]}
        if self.plan.include_usage:
            data["usage"] = None
        return data

    def usage_chunk(self, dones: List[dict]) -> dict:
        return {**self._head(self.chunk_object), "choices": [], "usage": self.usage(dones)}


def openai_finish(finish: Optional[str]) -> Optional[str]:
    """OpenAI's ``finish_reason`` for ours: a hard constraint that could not hold ("constraint":
    the text stops before what the strategy could not prevent) is "content_filter", OpenAI's
    reason for "content was omitted"; ``backtrack.constraint`` then says which strategy and why."""
    return "content_filter" if finish == "constraint" else finish


def _backtrack_info(dones: List[dict]) -> Dict[str, Any]:
    """The rewinds of the answer's generations (summed), and the first constraint that failed."""
    info = {"rewound_tokens": sum(d["rewound_tokens"] for d in dones), "rewinds": sum(d["rewinds"] for d in dones)}
    constraint = next((d["constraint"] for d in dones if d.get("constraint")), None)
    if constraint:
        info["constraint"] = constraint
    return info


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _collect(job: Job, request: Request) -> tuple:
    """``(text, done, logprobs)`` of one generation, read to its end."""
    parts, logprobs = [], []
    while True:
        kind, value = await job.next(request)
        if kind == "text":
            parts.append(value)
        elif kind == "logprobs":
            logprobs += value
        elif kind == "error":
            raise value
        elif kind == "done":
            return "".join(parts), value, logprobs


async def _whole_answer(jobs: List[Job], request: Request, reply: _Reply) -> JSONResponse:
    try:
        results = [await _collect(job, request) for job in jobs]  # they run at once; read in turn
        return JSONResponse(reply.completion(results))
    finally:
        for job in jobs:
            job.cancel()  # a no-op when done; stops the worker if we were interrupted


async def _reports(jobs: List[Job]):
    """``(index, kind, value)`` of every job's reports as they come, until each is done or failed."""
    waiting = {asyncio.ensure_future(job.queue.get()): i for i, job in enumerate(jobs)}
    try:
        while waiting:
            ready, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(ready, key=waiting.get):
                index = waiting.pop(future)
                kind, value = future.result()
                yield index, kind, value
                if kind not in ("done", "error"):
                    waiting[asyncio.ensure_future(jobs[index].queue.get())] = index
    finally:
        for future in waiting:
            future.cancel()


def _streamed_answer(jobs: List[Job], reply: _Reply) -> StreamingResponse:
    async def events():
        try:
            if reply.plan.chat:
                for index in range(len(jobs)):
                    yield _sse(reply.chunk("", first=True, index=index))
            logprobs: Dict[int, List[TokenLogprob]] = collections.defaultdict(list)  # whose text comes next
            dones: List[dict] = []
            async with contextlib.aclosing(_reports(jobs)) as reports:
                async for index, kind, value in reports:
                    if kind == "logprobs":
                        logprobs[index] += value
                    elif kind == "text":
                        used, logprobs[index] = reply.covering(logprobs[index], value)
                        yield _sse(reply.chunk(value, logprobs=used, index=index))
                    elif kind == "final":  # include_backtrack: final text, with its event
                        yield _sse({**reply.chunk(value["text"], index=index), "backtrack": value})
                    elif kind == "backtrack":  # include_backtrack: provisional text, rewinds, ...
                        yield _sse({**reply._head(reply.chunk_object), "choices": [], "backtrack": value})
                    elif kind == "error":
                        yield _sse(value.body())
                        break
                    elif kind == "done":
                        last = reply.chunk(None, openai_finish(value["finish_reason"]), index=index)
                        if value.get("constraint"):
                            last["backtrack"] = {"constraint": value["constraint"]}
                        if reply.plan.ignored:
                            last.setdefault("backtrack", {})["ignored"] = list(reply.plan.ignored)
                        yield _sse(last)
                        dones.append(value)
            if len(dones) == len(jobs) and reply.plan.include_usage:
                yield _sse(reply.usage_chunk(dones))
            yield "data: [DONE]\n\n"
        finally:
            for job in jobs:
                job.cancel()  # the client went away (or we are done): free the model for the next request

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )


# --------------------------------------------------------------------------------------------
# routes and the app
# --------------------------------------------------------------------------------------------
class _Live:
    """A generation the KoboldAI routes can check (its text so far) and abort, by ``genkey``."""

    def __init__(self, job: Job, genkey: Optional[str], kobold: bool):
        self.job, self.genkey, self.kobold = job, genkey or "", kobold
        self.parts: List[str] = []  # the text sent so far (KoboldAI routes)


async def _start(request: Request, schema, choices: bool = False):
    """Validate, plan and queue a request's generations (``n`` of them when ``choices``); returns
    ``(plan, jobs, lives)`` once every one has started."""
    engine: Engine = request.app.state.engine
    limits: Limits = request.app.state.limits
    body = parse_request(schema, await read_body(request, limits.max_body_bytes), limits, request.app.state.strategies)
    count = (body.n or 1) if choices else 1
    plans = [await run_in_threadpool(plan_request, engine.provider, body, limits, i) for i in range(count)]
    jobs: List[Job] = []
    try:
        for plan in plans:
            jobs.append(engine.start(plan))
        lives = [_Live(job, getattr(body, "genkey", None), schema is frontends.KoboldRequest) for job in jobs]
        request.app.state.live.extend(lives)
        for job in jobs:
            kind, value = await job.next(request)  # waits for its turn at the model
            if kind == "error":
                raise value
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    return plans[0], jobs, lives


async def _generate(request: Request, schema) -> Response:
    plan, jobs, _ = await _start(request, schema, choices=True)
    reply = _Reply(request.app.state.engine, plan)
    return _streamed_answer(jobs, reply) if plan.stream else await _whole_answer(jobs, request, reply)


async def completions(request: Request) -> Response:
    return await _generate(request, CompletionRequest)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, ChatCompletionRequest)


def _model_card(engine: Engine) -> dict:
    return {"id": engine.name, "object": "model", "created": engine.created, "owned_by": "backtrack-sampler"}


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(request.app.state.engine)]})


async def model(request: Request) -> Response:
    engine, name = request.app.state.engine, request.path_params["model"]
    if name != engine.name:
        raise APIError(f"the model {name!r} does not exist", "model", "model_not_found", 404)
    return JSONResponse(_model_card(engine))


async def health(request: Request) -> Response:
    """Answers at once, whatever the model is doing: how many generations run and wait."""
    engine: Engine = request.app.state.engine
    return JSONResponse(
        {
            "status": "ok",
            "model": engine.name,
            "busy": engine.busy,
            "running": engine.running,
            "queued": engine.queued,
            "parallel": engine.parallel,
            "max_queue": engine.max_queue,
        }
    )


async def _api_error(request: Request, error: APIError) -> Response:
    response = error_response(error)
    if request.url.path.startswith("/api/"):  # the KoboldAI API: KoboldCpp's "detail" too
        response = JSONResponse(frontends.kobold_error(error.body()), status_code=error.status)
    response.headers.update(getattr(error, "headers", {}))
    return response


async def _http_error(request: Request, error: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    return error_response(APIError(str(error.detail), None, code, error.status_code))


async def _client_gone(request: Request, error: _ClientGone) -> Response:
    return Response(status_code=499)  # nobody reads it


async def _server_error(request: Request, error: Exception) -> Response:
    return error_response(APIError(f"internal error: {type(error).__name__}: {error}", status=500, type="server_error"))


async def backtrack_candidates(request: Request) -> Response:
    """The playground's human guidance: the next-token candidates after the chosen tokens (a
    ``playground.CandidateSearch`` run by the engine's scheduler like any generation)."""
    engine: Engine = request.app.state.engine
    limits: Limits = request.app.state.limits
    body = parse_request(
        playground.CandidatesRequest,
        await read_body(request, limits.max_body_bytes),
        limits,
        request.app.state.strategies,
    )

    def plan() -> playground.CandidateSearch:
        provider = engine.provider
        prompt = _chat_tokens(provider, body) if body.messages is not None else _prompt_tokens(provider, body.prompt)
        if body.tokens and max(body.tokens) >= provider.vocab_size:
            raise APIError(f"token ids must be in [0, {provider.vocab_size})", "tokens", "invalid_value")
        sampling = {key: value for key, value in body.sampling().items() if key != "seed"}
        return playground.CandidateSearch(
            provider,
            build_strategy(provider, body, limits),
            prompt,
            body.tokens,
            body.top_n,
            _token_limit(provider, len(prompt), body, limits),
            **sampling,
        )

    search = await run_in_threadpool(plan)
    batch = await engine.finish(search)
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


# --------------------------------------------------------------------------------------------
# the frontends' backends: TabbyAPI, llama.cpp and the KoboldAI API (shapes in ``frontends``)
# --------------------------------------------------------------------------------------------
def _kobold_text(kind: str, value: Any) -> str:
    return value if kind == "text" else value["text"] if kind == "final" else ""


async def kobold_generate(request: Request) -> Response:
    """``POST /api/v1/generate``: ``{"results": [{"text", "finish_reason"}]}``."""
    _, (job,), (live,) = await _start(request, frontends.KoboldRequest)
    try:
        while True:
            kind, value = await job.next(request)
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
        job.cancel()


async def kobold_stream(request: Request) -> Response:
    """``POST /api/extra/generate/stream``: KoboldCpp's events, ``event: message`` / ``data: {"token",
    "finish_reason"}``, the last one with the finish reason and no text."""
    _, (job,), (live,) = await _start(request, frontends.KoboldRequest)

    async def events():
        try:
            while True:
                kind, value = await job.queue.get()
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
            job.cancel()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )


async def _small_body(request: Request, schema, optional: bool = False):
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
    """``POST /api/extra/abort``: ends the running generations with this ``genkey`` (none: every one
    without, e.g. SillyTavern's, which posts no body) at the next step; each answers with its text so far."""
    body = await _small_body(request, frontends.AbortRequest, optional=True)
    genkey = body.genkey or ""
    hits = [live for live in request.app.state.live if live.genkey == genkey and not live.job.batch.done]
    for live in hits:
        live.job.abort()
    return JSONResponse({"success": "true" if hits else "false", "done": "true"})


def _tokenizer(kind: str):
    async def tokenize(request: Request) -> Response:
        body = await _small_body(request, frontends.TextToTokens)
        provider = request.app.state.engine.provider
        add_bos = (kind != "llama") if body.add_bos_token is None else body.add_bos_token
        tokens = await run_in_threadpool(provider.encode, body.text, add_bos)
        pieces = [provider.decode([t]) for t in tokens] if body.with_pieces and kind == "llama" else None
        return JSONResponse(frontends.tokens_answer(kind, tokens, pieces))

    return tokenize


def _detokenizer(kind: str):
    async def detokenize(request: Request) -> Response:
        body = await _small_body(request, frontends.TokensToText)
        provider = request.app.state.engine.provider
        if body.tokens and max(body.tokens) >= provider.vocab_size:
            raise APIError(f"token ids must be in [0, {provider.vocab_size})", "tokens", "invalid_value")
        return JSONResponse(frontends.text_answer(kind, await run_in_threadpool(provider.decode, body.tokens)))

    return detokenize


def _tabby_card(request: Request) -> dict:
    engine: Engine = request.app.state.engine
    return frontends.tabby_model_card(engine.name, engine.created, engine.provider.context_length, engine.parallel)


async def tabby_model(request: Request) -> Response:
    return JSONResponse(_tabby_card(request))


async def tabby_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_tabby_card(request)]})


async def kobold_info(request: Request) -> Response:
    """The KoboldAI API's GET routes (served without the key, as KoboldCpp does: SillyTavern's status
    check sends none): the model, the versions, the context and generation lengths."""
    engine: Engine = request.app.state.engine
    path, context = request.url.path.rstrip("/"), engine.provider.context_length
    if path.endswith("/model"):
        hidden = request.app.state.api_key and not _authorized(
            request.headers.get("authorization", ""), request.app.state.api_key
        )
        return JSONResponse({"result": "koboldcpp/protected-model" if hidden else engine.name})
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

ROUTES = [
    Route("/v1/backtrack/strategies", backtrack_strategies, methods=["GET"]),
    Route("/v1/backtrack/candidates", backtrack_candidates, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/models/{model:path}", model, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    # TabbyAPI
    Route("/v1/model", tabby_model, methods=["GET"]),
    Route("/v1/model/list", tabby_models, methods=["GET"]),
    Route("/v1/token/encode", _tokenizer("tabby"), methods=["POST"]),
    Route("/v1/token/decode", _detokenizer("tabby"), methods=["POST"]),
    # llama.cpp
    Route("/tokenize", _tokenizer("llama"), methods=["POST"]),
    Route("/detokenize", _detokenizer("llama"), methods=["POST"]),
    # KoboldAI API (KoboldCpp)
    Route("/api/v1/generate", kobold_generate, methods=["POST"]),
    Route("/api/extra/generate/stream", kobold_stream, methods=["POST"]),
    Route("/api/extra/generate/check", kobold_check, methods=["GET", "POST"]),
    Route("/api/extra/abort", kobold_abort, methods=["POST"]),
    Route("/api/extra/tokencount", _tokenizer("kobold"), methods=["POST"]),
    Route("/api/extra/detokenize", _detokenizer("kobold"), methods=["POST"]),
    *(Route(path, kobold_info, methods=["GET"]) for path in KOBOLD_INFO),
]
LIVE = 256  # generations the KoboldAI routes remember for check and abort (the latest)


def create_app(
    engine: Engine,
    api_key: Optional[str] = None,
    limits: Optional[Limits] = None,
    strategies: Union[None, StrategyRegistry, Iterable[Union[str, type]]] = None,
) -> Starlette:
    """The Starlette application serving ``engine``. ``api_key`` (optional) is then required as
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
            _ClientGone: _client_gone,
            Exception: _server_error,
        },
    )
    app.state.engine = engine
    app.state.limits = limits or Limits()
    app.state.api_key = api_key
    app.state.live = collections.deque(maxlen=LIVE)
    app.state.strategies, app.state.strategy_list = registry, strategy_list
    return _ApiKey(app, api_key) if api_key else app


class _ApiKey:
    """ASGI middleware: ``Authorization: Bearer KEY`` on every HTTP route except /health and the
    playground's page and files (the page asks for the key)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()
        self.state = getattr(app, "state", None)

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if (
            scope["type"] == "http"
            and path != "/health"
            and not playground.public_path(path)
            and not (path.rstrip("/") in KOBOLD_INFO and scope.get("method") == "GET")
        ):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "invalid API key" if given else "missing API key: send 'Authorization: Bearer KEY'"
                await error_response(APIError(message, None, "invalid_api_key", 401))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _authorized(header: str, api_key: str) -> bool:
    return hmac.compare_digest(header.encode(), f"Bearer {api_key}".encode())


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
    engine = Engine(provider, model_name, parallel, max_queue)
    try:
        uvicorn.run(
            create_app(engine, api_key, limits, strategies),
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=5,
        )
    finally:
        engine.close()
