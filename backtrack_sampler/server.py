"""An OpenAI-compatible HTTP server (Starlette + uvicorn) for BacktrackSampler.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``. One model is loaded at start; a lock serialises
generation, so concurrent requests wait their turn. Streams are Server-Sent Events in OpenAI's
shape ending with ``data: [DONE]``; they carry only final text (the sampler never yields text it
may still rewind). A client that disconnects stops its generation at the next token.

Extra request fields: ``top_k``, ``min_p``, ``banned_strings`` (list of phrases),
``banned_regex`` (a pattern or a list), ``strategy`` (a name, ``{"name": ..., params...}``, or a
list of those, chained). Start it with ``backtrack-sampler serve`` or ``serve(...)``; embed it
with ``create_app(Engine(provider), api_key=...)``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import re
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .backtrack_sampler import BacktrackSampler
from .chat import chat_prompt_tokens
from .errors import UsageError
from .events import Done, event_dict, stream_events
from . import playground
from .playground import backtrack_payload
from .models import load_provider, provider_name
from .registry import chain, make_strategy, strategy_parameters
from .provider.base_provider import BaseProvider
from .sampling import check_sampling_args
from .strategy.base_strategy import BaseStrategy

STRATEGIES = ("none", "antislop", "creative", "adaptive", "replace")  # per request ("debug"/"human" need a terminal)
MAX_STOP = 16
ROLES = ("system", "developer", "user", "assistant")
NOT_FROM_JSON = {"provider", "file", "choose", "on_accept"}  # constructor parameters that take objects


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` in OpenAI's shape."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 status: int = 400, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type)


def error_response(status: int, message: str, param=None, code=None, type: str = "invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# --------------------------------------------------------------------------------------------
# generation in a worker thread
# --------------------------------------------------------------------------------------------
class _Cancelled(Exception):
    pass


class _ClientGone(Exception):
    """The client disconnected before the answer was ready."""


class _Guard(BaseStrategy):
    """Delegates to ``inner`` and stops the generation (at the next token) once ``cancelled`` is
    set, also while the strategy is rewinding and no text comes out."""

    def __init__(self, inner: BaseStrategy, cancelled: threading.Event):
        self.inner, self.cancelled = inner, cancelled

    @property
    def rewind_reason(self):
        return self.inner.rewind_reason

    def get_keep_index(self):
        return self.inner.get_keep_index()

    def on_logits(self, logits, continuation_tokens):
        if self.cancelled.is_set():
            raise _Cancelled()
        return self.inner.on_logits(logits, continuation_tokens)

    def on_probs(self, probs, continuation_tokens):
        return self.inner.on_probs(probs, continuation_tokens)

    def on_next_token(self, continuation_tokens, probs):
        self.inner.on_next_token(continuation_tokens, probs)

    def backtrack(self, continuation_tokens):
        return self.inner.backtrack(continuation_tokens)

    def reset(self):
        self.inner.reset()


class StopFilter:
    """Cuts a text stream before the first stop string; holds back any tail that could be the
    start of one, so no part of a stop string is ever sent."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, text: str) -> Tuple[str, bool]:
        """Returns ``(text to send, whether a stop string was found)``."""
        if not self.stops:
            return text, False
        buffer = self.held + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buffer[: min(hits)], True
        keep = max(
            (k for s in self.stops for k in range(min(len(s) - 1, len(buffer)), 0, -1) if buffer.endswith(s[:k])),
            default=0,
        )
        self.held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class _Job:
    """One request's generation: the worker thread puts ``(kind, value)`` items on ``queue``."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.checked = loop.time()  # when the client's connection was last checked

    def put(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """The loaded model plus the lock that serialises generation."""

    def __init__(self, provider: BaseProvider, name: Optional[str] = None):
        self.provider = provider
        self.name = name or provider_name(provider)
        self.created = int(time.time())
        self.lock = threading.Lock()
        self.busy = False

    # request -> tokens and strategy -----------------------------------------------------------
    def prompt_tokens(self, prompt: Any) -> List[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise APIError("prompt is empty", "prompt")
            tokens = self.provider.encode(prompt, add_special_tokens=True)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if min(prompt) < 0 or max(prompt) >= self.provider.vocab_size:
                raise APIError(f"prompt token ids must be in [0, {self.provider.vocab_size})", "prompt")
            tokens = list(prompt)
        elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise APIError("only one prompt per request is supported", "prompt", "unsupported_value")
        else:
            raise APIError("prompt must be a non-empty string or a list of token ids", "prompt", "invalid_type")
        return self._check_length(tokens, "prompt")

    def chat_tokens(self, messages: List[Dict[str, str]]) -> List[int]:
        try:
            tokens = chat_prompt_tokens(self.provider, messages)
        except Exception as error:  # a template that rejects the conversation (raise_exception, ...)
            raise APIError(f"the chat template rejected the messages: {error}", "messages") from None
        return self._check_length(tokens, "messages")

    def _check_length(self, tokens: List[int], param: str) -> List[int]:
        context = self.provider.context_length
        if len(tokens) >= context:
            raise APIError(
                f"the prompt is {len(tokens)} tokens long, which leaves no room in the model's context of "
                f"{context} tokens", param, "context_length_exceeded",
            )
        return tokens

    def build_strategy(self, spec: Any, banned: List[str], regexes: List[str]) -> BaseStrategy:
        strategies = []
        if banned or regexes:
            params: Dict[str, Any] = {"slops": banned}
            if regexes:
                params["regexes"] = regexes
            strategies.append(self._make("antislop", params, "banned_strings"))
        strategies.extend(self._from_spec(spec))
        try:
            return chain(strategies)
        except UsageError as error:
            raise APIError(str(error), "strategy") from None

    def _from_spec(self, spec: Any) -> List[BaseStrategy]:
        if spec is None:
            return []
        if isinstance(spec, list):
            if not all(isinstance(item, (str, dict)) for item in spec):
                raise APIError("strategy list items must be names or objects", "strategy", "invalid_type")
            return [s for item in spec for s in self._from_spec(item)]
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict):
            raise APIError('strategy must be a name, {"name": ..., parameters...} or a list of those', "strategy", "invalid_type")
        name = spec.get("name")
        if name not in STRATEGIES:
            raise APIError(f"unknown strategy {name!r}: choose one of {', '.join(STRATEGIES)}", "strategy.name", "invalid_value")
        params = {key: value for key, value in spec.items() if key != "name"}
        return [self._make(name, params, "strategy")]

    def _make(self, name: str, params: Dict[str, Any], param: str) -> BaseStrategy:
        known = strategy_parameters(name)
        for key, value in params.items():
            if key not in known or key in NOT_FROM_JSON:
                raise APIError(f"strategy {name!r} has no parameter {key!r}", f"{param}.{key}", "invalid_value")
            expected = _type_of(known[key].default)
            if expected is not None and not _is_type(value, expected):
                raise APIError(f"strategy {name!r}: {key} must be {expected}, got {value!r}", f"{param}.{key}", "invalid_type")
        try:
            return make_strategy(name, self.provider, **params)
        except UsageError as error:
            raise APIError(str(error), param, "invalid_value") from None

    # the worker -----------------------------------------------------------------------------
    def run(self, job: _Job, prompt: List[int], spec: Tuple, sampling: Dict[str, Any], stop: List[str]) -> None:
        """Runs in its own thread: waits for the lock (giving up if the request is cancelled),
        builds the strategy, generates, and reports to ``job``."""
        while not self.lock.acquire(timeout=0.05):
            if job.cancelled.is_set():
                return
        self.busy = True
        try:
            if job.cancelled.is_set():
                return
            try:
                strategy = self.build_strategy(*spec)
            except APIError as error:
                job.put("error", error)
                return
            job.put("started")
            sampler = BacktrackSampler(self.provider, _Guard(strategy, job.cancelled))
            stops = StopFilter(stop)
            finish = None
            sampling = dict(sampling)
            backtrack = sampling.pop("include_backtrack", False)
            chunks = stream_events(sampler, prompt, **sampling) if backtrack else sampler.generate_text(prompt, **sampling)
            try:
                for chunk in chunks:
                    if backtrack:  # an event: final text goes in the usual chunks, the rest in extension chunks
                        if chunk.type != "final":
                            if chunk.type != "done":
                                job.put("backtrack", backtrack_payload(chunk, stops.held))
                            continue
                        text, hit = stops.push(chunk.text)
                        job.put("final", (text, {"type": "final", "text": text, "tokens": chunk.tokens}))
                    else:
                        text, hit = stops.push(chunk)
                    if text and not backtrack:
                        job.put("text", text)
                    if hit:
                        finish = "stop"
                        break
                    if job.cancelled.is_set():
                        return
            finally:
                chunks.close()
            if finish is None:
                rest = stops.flush()
                if rest:
                    job.put("final", (rest, {"type": "final", "text": rest, "tokens": 0})) if backtrack else job.put("text", rest)
            stats = sampler.stats
            if backtrack:
                job.put("backtrack", event_dict(Done(finish or stats.finish_reason, stats.delivered, stats.rewound,
                                                     stats.rewinds, stats.steps, round(stats.seconds, 4))))
            job.put("done", {
                "finish_reason": finish or stats.finish_reason or "length",
                "completion_tokens": stats.delivered, "rewound_tokens": stats.rewound, "rewinds": stats.rewinds,
            })
        except _Cancelled:
            pass
        except Exception as error:  # a strategy failed mid-generation
            job.put("error", APIError(f"generation failed: {type(error).__name__}: {error}", status=500,
                                      type="server_error", code="generation_failed"))
        finally:
            self.busy = False
            self.lock.release()


def _type_of(default) -> Optional[str]:
    if isinstance(default, bool):
        return "a boolean"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "a string"
    return None


def _is_type(value, expected: str) -> bool:
    if expected == "a boolean":
        return isinstance(value, bool)
    if expected == "an integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == "a number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, str)


# --------------------------------------------------------------------------------------------
# request validation
# --------------------------------------------------------------------------------------------
def _number(body: dict, key: str, default=None, low=None, high=None, integer=False):
    value = body.get(key, default)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise APIError(f"{key} must be {kind}, got {json.dumps(value)}", key, "invalid_type")
    if not integer and not math.isfinite(value):
        raise APIError(f"{key} must be a finite number", key, "invalid_value")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise APIError(f"{key} must be {bounds}, got {value}", key, "invalid_value")
    return value


def _strings(body: dict, key: str, limit: Optional[int] = None) -> List[str]:
    value = body.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise APIError(f"{key} must be a string or a list of strings", key, "invalid_type")
    if any(not v for v in value):
        raise APIError(f"{key} must not contain empty strings", key, "invalid_value")
    if limit is not None and len(value) > limit:
        raise APIError(f"{key} takes at most {limit} strings, got {len(value)}", key, "invalid_value")
    return value


def _sampling(body: dict, max_tokens_default: Optional[int]) -> Dict[str, Any]:
    max_tokens = _number(body, "max_tokens", None, low=0, integer=True)
    if "max_completion_tokens" in body:
        max_tokens = _number(body, "max_completion_tokens", None, low=0, integer=True)
    sampling = {
        "temperature": _number(body, "temperature", 1.0, low=0),
        "top_p": _number(body, "top_p", None, low=0, high=1),
        "top_k": _number(body, "top_k", 50, low=0, integer=True),
        "min_p": _number(body, "min_p", None, low=0, high=1),
        "seed": _number(body, "seed", None, integer=True),
        "max_new_tokens": max_tokens_default if max_tokens is None else max_tokens,
    }
    if sampling["top_p"] == 0:
        raise APIError("top_p must be in (0, 1]", "top_p", "invalid_value")
    try:
        check_sampling_args(sampling["temperature"], sampling["top_k"], sampling["top_p"], sampling["min_p"])
    except ValueError as error:
        raise APIError(str(error), None, "invalid_value") from None
    if _number(body, "n", 1, integer=True) != 1:
        raise APIError("only n=1 is supported", "n", "unsupported_value")
    for key in ("echo", "logprobs", "suffix"):
        if body.get(key) not in (None, False, 0, ""):
            raise APIError(f"{key} is not supported", key, "unsupported_value")
    if _number(body, "best_of", 1, integer=True) != 1:
        raise APIError("only best_of=1 is supported", "best_of", "unsupported_value")
    return sampling


def _common(body: dict) -> Tuple[Dict[str, Any], bool, bool, List[str], List[str], List[str]]:
    if "model" in body and not isinstance(body["model"], str):
        raise APIError("model must be a string", "model", "invalid_type")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise APIError("stream must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not all(isinstance(options.get(k, False), bool) for k in ("include_usage", "include_backtrack")):
        raise APIError('stream_options must be an object like {"include_usage": true, "include_backtrack": true}',
                       "stream_options", "invalid_type")
    stop = _strings(body, "stop", MAX_STOP)
    banned = _strings(body, "banned_strings")
    regexes = _strings(body, "banned_regex")
    for pattern in regexes:
        try:
            re.compile(pattern)
        except re.error as error:
            raise APIError(f"invalid regular expression {pattern!r}: {error}", "banned_regex", "invalid_value") from None
    return options, bool(stream), bool(options.get("include_usage", False)), stop, banned, regexes


def _messages(body: dict) -> List[Dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list", "messages", "invalid_type")
    result = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(f"{param} must be an object", param, "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise APIError(f"{param}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{param}.role", "invalid_value")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise APIError(f"{param}.content: only text parts are supported", f"{param}.content", "invalid_value")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise APIError(f"{param}.content must be a string or a list of text parts", f"{param}.content", "invalid_type")
        result.append({"role": role, "content": content})
    return result


# --------------------------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------------------------
async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(f"the request body is not valid JSON: {error}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object", None, "invalid_type")
    return body


async def _next_item(job: _Job, request: Request) -> Tuple[str, Any]:
    """The worker's next report; cancels the job if the client goes away meanwhile (checked at
    least every quarter second, also while reports keep coming)."""
    loop = asyncio.get_running_loop()
    while True:
        if loop.time() - job.checked >= 0.25:
            job.checked = loop.time()
            if await request.is_disconnected():
                job.cancel()
                raise _ClientGone()
        try:
            return await asyncio.wait_for(job.queue.get(), timeout=0.25)
        except asyncio.TimeoutError:
            pass


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, api_key: Optional[str] = None) -> Starlette:
    """The Starlette application serving ``engine``; ``api_key`` (optional) is then required as
    ``Authorization: Bearer KEY`` on every route except ``/health``."""

    async def completions(request: Request) -> Response:
        return await _generate(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await _generate(request, chat=True)

    async def _generate(request: Request, chat: bool) -> Response:
        body = await _json_body(request)
        options, stream, include_usage, stop, banned, regexes = _common(body)
        sampling = _sampling(body, None if chat else 16)
        if stream and options.get("include_backtrack"):
            sampling["include_backtrack"] = True
        spec = body.get("strategy")
        if chat:
            messages = _messages(body)
            prompt = await run_in_threadpool(engine.chat_tokens, messages)
        else:
            if "prompt" not in body:
                raise APIError("prompt is required", "prompt", "missing_required_parameter")
            prompt = await run_in_threadpool(engine.prompt_tokens, body["prompt"])
        if not isinstance(spec, (type(None), str, dict, list)):
            raise APIError('strategy must be a name, {"name": ..., parameters...} or a list of those', "strategy", "invalid_type")

        job = _Job(asyncio.get_running_loop())
        worker = threading.Thread(
            target=engine.run, args=(job, prompt, (spec, banned, regexes), sampling, stop),
            name="backtrack-sampler-generate", daemon=True,
        )
        worker.start()
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        try:
            kind, value = await _next_item(job, request)  # waits for our turn at the lock
        except BaseException:
            job.cancel()
            raise
        if kind == "error":
            raise value

        def usage(done: dict) -> dict:
            completion = done["completion_tokens"]
            return {"prompt_tokens": len(prompt), "completion_tokens": completion, "total_tokens": len(prompt) + completion}

        if not stream:
            parts = []
            try:
                while True:
                    kind, value = await _next_item(job, request)
                    if kind == "text":
                        parts.append(value)
                    elif kind == "error":
                        raise value
                    elif kind == "done":
                        break
            finally:
                job.cancel()  # a no-op when done; stops the worker if we were interrupted
            text = "".join(parts)
            choice: Dict[str, Any] = {"index": 0, "finish_reason": value["finish_reason"], "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            return JSONResponse({
                "id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": engine.name, "choices": [choice], "usage": usage(value),
                "backtrack": {"rewound_tokens": value["rewound_tokens"], "rewinds": value["rewinds"]},
            })

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: Optional[str], finish: Optional[str] = None, first: bool = False) -> dict:
            if chat:
                delta: Dict[str, Any] = {} if text is None else {"content": text}
                if first:
                    delta["role"] = "assistant"
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            data = {"id": ident, "object": obj, "created": created, "model": engine.name, "choices": [choice]}
            if include_usage:
                data["usage"] = None
            return data

        async def events():
            try:
                if chat:
                    yield _sse(chunk("", first=True))
                while True:
                    kind, value = await job.queue.get()
                    if kind == "text":
                        yield _sse(chunk(value))
                    elif kind == "final":  # final text with its extension object (include_backtrack)
                        data = chunk(value[0])
                        data["backtrack"] = value[1]
                        yield _sse(data)
                    elif kind == "backtrack":
                        yield _sse({"id": ident, "object": obj, "created": created, "model": engine.name,
                                    "choices": [], "backtrack": value})
                    elif kind == "error":
                        yield _sse({"error": {"message": value.message, "type": value.type, "param": value.param, "code": value.code}})
                        break
                    elif kind == "done":
                        yield _sse(chunk(None, value["finish_reason"]))
                        if include_usage:
                            yield _sse({"id": ident, "object": obj, "created": created, "model": engine.name,
                                        "choices": [], "usage": usage(value)})
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # the client went away (or we are done): free the model for the next request

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def candidates(request: Request) -> Response:
        body = await _json_body(request)
        _, _, _, _, banned, regexes = _common(body)
        sampling = _sampling(body, None)
        top_n = _number(body, "top_n", 5, low=1, high=playground.MAX_TOP_N, integer=True)
        tokens = body.get("tokens", [])
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise APIError("tokens must be a list of token ids", "tokens", "invalid_type")
        if len(tokens) > playground.MAX_CHOSEN:
            raise APIError(f"tokens takes at most {playground.MAX_CHOSEN} token ids, got {len(tokens)}", "tokens", "invalid_value")
        if tokens and (min(tokens) < 0 or max(tokens) >= engine.provider.vocab_size):
            raise APIError(f"token ids must be in [0, {engine.provider.vocab_size})", "tokens", "invalid_value")
        if "messages" in body:
            prompt = await run_in_threadpool(engine.chat_tokens, _messages(body))
        elif "prompt" in body:
            prompt = await run_in_threadpool(engine.prompt_tokens, body["prompt"])
        else:
            raise APIError("prompt or messages is required", "prompt", "missing_required_parameter")
        spec = body.get("strategy")
        if not isinstance(spec, (type(None), str, dict, list)):
            raise APIError('strategy must be a name, {"name": ..., parameters...} or a list of those', "strategy", "invalid_type")

        def work():
            with engine.lock:
                strategy = engine.build_strategy(spec, banned, regexes)
                engine.busy = True
                try:
                    return playground.candidates(
                        engine.provider, strategy, prompt, tokens, top_n, sampling["temperature"], sampling["top_k"],
                        sampling["top_p"], sampling["min_p"], sampling["max_new_tokens"])
                finally:
                    engine.busy = False

        return JSONResponse(await run_in_threadpool(work))

    def model_card() -> dict:
        return {"id": engine.name, "object": "model", "created": engine.created, "owned_by": "backtrack-sampler"}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        if request.path_params["model"] != engine.name:
            raise APIError(f"the model {request.path_params['model']!r} does not exist", "model", "model_not_found", 404)
        return JSONResponse(model_card())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": engine.name, "busy": engine.busy})

    async def api_error(request: Request, error: APIError) -> Response:
        return error.response()

    async def http_error(request: Request, error: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return error_response(error.status_code, str(error.detail), None, code)

    async def client_gone(request: Request, error: _ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it

    async def server_error(request: Request, error: Exception) -> Response:
        return error_response(500, f"internal error: {type(error).__name__}: {error}", None, None, "server_error")

    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/v1/backtrack/candidates", candidates, methods=["POST"]),
            *playground.routes(),
        ],
        exception_handlers={APIError: api_error, HTTPException: http_error, _ClientGone: client_gone, Exception: server_error},
    )
    app.state.engine = engine
    return _ApiKey(app, api_key) if api_key else app


class _ApiKey:
    """ASGI middleware: ``Authorization: Bearer KEY`` on every HTTP route except /health."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()
        self.state = getattr(app, "state", None)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") != "/health" and not playground.public_path(scope.get("path", "")):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "invalid API key" if given else "missing API key: send 'Authorization: Bearer KEY'"
                await error_response(401, message, None, "invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def serve(host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None, backend: str = "llamacpp",
          model: Optional[str] = None, n_ctx: Optional[int] = None, threads: Optional[int] = None,
          model_name: Optional[str] = None, log_level: str = "info") -> None:
    """Load the model and serve it until interrupted (Ctrl-C)."""
    import uvicorn

    provider = load_provider(backend, model, n_ctx, threads)
    app = create_app(Engine(provider, model_name), api_key)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
