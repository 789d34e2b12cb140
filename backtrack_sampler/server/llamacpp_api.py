"""llama-server's native API, as SillyTavern's "llama.cpp" text-completion type and llama.cpp's own
web UI use it: ``POST /completion`` (and ``/completions``), ``GET /props``, ``GET /slots``.

Request fields and answer shapes follow llama.cpp's ``tools/server`` (``server-task.cpp``:
``params_from_json_cmpl``, ``to_json_non_oaicompat``, ``probs_vector_to_json``; the README's
``/completion``, ``/props`` and ``/slots``). A ``/completion`` request is a ``CompletionRequest``
with llama.cpp's defaults and names, and goes through the same pipeline as every other route
(``pipeline.start_generations``); the answer is one JSON object, or with ``stream`` Server-Sent
Events ``data: {...}`` (one per piece of final text, the last one with ``"stop": true`` and the
totals; no ``[DONE]``, as llama-server). Each object carries the ``backtrack`` extension too.

``completion_probabilities`` (``n_probs``) entries have today's fields (``id``, ``token``,
``bytes``, ``logprob`` and ``top_logprobs``, or ``prob`` and ``top_probs`` with
``post_sampling_probs``) and the older ``content`` and ``probs: [{"tok_str", "prob"}]`` that
SillyTavern 1.12 reads. The probabilities are the model's (after the request's bans and biases,
before top-k/top-p/min-p), with or without ``post_sampling_probs``."""

from __future__ import annotations

import json
import math
import time
from typing import Any, AsyncIterator, ClassVar, Dict, List, Optional

from pydantic import Field, field_validator, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..core.generation import TokenLogprob
from ..provider.chat import chat_template
from .errors import APIError, field_error
from .fields import alias
from .openai import Reply, backtrack_info
from .pipeline import read_request, start_generations
from .runner import Answer, Plan, Runner
from .schemas import MAX_LOGPROBS, CompletionRequest

DEFAULT_SEED = 4294967295  # LLAMA_DEFAULT_SEED: what llama-server reports for a random seed
SAMPLERS = ["penalties", "dry", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"]  # the order applied here


class LlamaCompletionRequest(CompletionRequest):
    """``POST /completion``: llama-server's fields and defaults (``temperature`` 0.8, ``top_k`` 40,
    ``top_p`` 0.95, ``min_p`` 0.05, ``repeat_last_n`` 64, ``n_predict`` -1: as many as fit). A
    negative ``n_predict`` is no limit, a negative temperature greedy; ``repeat_last_n`` 0 turns the
    repetition penalties off and ``dry_penalty_last_n`` 0 DRY (llama.cpp's meaning of 0).
    ``n_probs``: alternatives per token (``logprobs`` when it is not given); ``return_tokens``:
    the ids in ``tokens``; ``id_slot``: -1 or a slot (the scheduler places sequences itself);
    ``cache_prompt`` is accepted (the prompt is evaluated as the providers do)."""

    temperature: Optional[float] = Field(0.8, ge=0)
    top_k: Optional[int] = Field(40, ge=0)
    top_p: Optional[float] = Field(0.95, gt=0, le=1)
    min_p: Optional[float] = Field(0.05, ge=0, le=1)
    n_probs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    post_sampling_probs: bool = False
    return_tokens: bool = False
    cache_prompt: bool = True
    id_slot: int = Field(-1, ge=-1)
    n: Optional[int] = Field(1, validation_alias=alias("n_cmpl", "n"))

    default_max_tokens: ClassVar[Optional[int]] = None
    default_penalty_range: ClassVar[int] = 64
    default_dry_range: ClassVar[int] = -1

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _no_limit(cls, value: Any) -> Any:
        return None if isinstance(value, int) and not isinstance(value, bool) and value < 0 else value

    @field_validator("temperature", mode="before")
    @classmethod
    def _greedy(cls, value: Any) -> Any:
        return 0.0 if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0 else value

    @field_validator("n")
    @classmethod
    def _one(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value > 1:
            raise field_error(
                "unsupported_value", "one completion per /completion request (n_cmpl > 1 is not supported)"
            )
        return value

    @model_validator(mode="after")
    def _llama_meanings(self) -> LlamaCompletionRequest:
        if self.penalty_range == 0:
            self.repetition_penalty = self.frequency_penalty = self.presence_penalty = None
        if self.dry_penalty_last_n == 0:
            self.dry_multiplier = None
        return self

    @property
    def logprob_count(self) -> Optional[int]:
        """Always a count (0: none shown): the final tokens' ids come with their log-probabilities."""
        return self.n_probs if self.n_probs is not None else (self.logprobs or 0)

    def settings(self, n_ctx: int) -> Dict[str, Any]:
        """llama.cpp's ``generation_settings`` (``task_params::to_json``) for these fields."""
        return {
            "n_predict": -1 if self.max_tokens is None else self.max_tokens,
            "seed": DEFAULT_SEED if self.seed is None else self.seed,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "min_p": self.min_p or 0.0,
            "xtc_probability": self.xtc_probability or 0.0,
            "xtc_threshold": 0.1 if self.xtc_threshold is None else self.xtc_threshold,
            "typical_p": 1.0 if self.typical_p is None else self.typical_p,
            "repeat_last_n": self.default_penalty_range if self.penalty_range is None else self.penalty_range,
            "repeat_penalty": self.repetition_penalty or 1.0,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "dry_multiplier": self.dry_multiplier or 0.0,
            "dry_base": 1.75 if self.dry_base is None else self.dry_base,
            "dry_allowed_length": 2 if self.dry_allowed_length is None else self.dry_allowed_length,
            "dry_penalty_last_n": n_ctx if self.dry_penalty_last_n in (None, -1) else self.dry_penalty_last_n,
            "stop": list(self.stop or []),
            "max_tokens": -1 if self.max_tokens is None else self.max_tokens,
            "n_keep": 0,
            "ignore_eos": bool(self.ban_eos_token),
            "stream": bool(self.stream),
            "n_probs": self.n_probs or 0,
            "min_keep": 0,
            "grammar": self.grammar or "",
            "samplers": SAMPLERS,
            "post_sampling_probs": self.post_sampling_probs,
        }


# --- answers ------------------------------------------------------------------------------------
def probabilities(entries: List[TokenLogprob], decode: Any, post: bool) -> List[Dict[str, Any]]:
    """``completion_probabilities`` of these tokens (``probs_vector_to_json``), with the older
    ``content`` / ``probs`` fields too."""

    def item(token: int, logprob: float) -> Dict[str, Any]:
        text = decode([token])
        value = math.exp(logprob) if post else max(logprob, -3.4e38)
        return {"id": token, "token": text, "bytes": list(text.encode()), "prob" if post else "logprob": value}

    out = []
    for entry in entries:
        top = [item(t, lp) for t, lp in entry.top]
        head = item(entry.token, entry.logprob)
        legacy = [{"tok_str": t["token"], "prob": math.exp(lp)} for t, (_, lp) in zip(top, entry.top)]
        out.append({**head, "top_probs" if post else "top_logprobs": top, "content": head["token"], "probs": legacy})
    return out


def timings(prompt_n: int, predicted_n: int, started: float, first: float, end: float) -> Dict[str, Any]:
    """llama.cpp's ``timings``, from the route's clock: the prompt until the first final token, then
    the rest (``cache_n`` 0: the prompt is evaluated whole)."""
    prompt_ms, predicted_ms = (first - started) * 1000, (end - first) * 1000
    return {
        "cache_n": 0,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": prompt_n / prompt_ms * 1000 if prompt_ms > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": predicted_n / predicted_ms * 1000 if predicted_ms > 0 else 0.0,
    }


def stop_type(done: Dict[str, Any]) -> str:
    """``word`` (a stop string), ``limit`` (n_predict, the context or the time limit), else ``eos``."""
    if done["finish_reason"] == "length":
        return "limit"
    return "word" if done.get("stopping_word") else "eos"


class Completion:
    """The objects of one ``/completion`` answer."""

    def __init__(self, runner: Runner, plan: Plan, body: LlamaCompletionRequest):
        self.runner, self.plan, self.body = runner, plan, body
        self.reply = Reply(runner, plan)  # its ``covering``: the tokens of each piece of text
        self.slot = max(body.id_slot, 0)
        self.started = self.first = time.perf_counter()
        self.predicted = 0

    def partial(self, text: str, entries: List[TokenLogprob]) -> Dict[str, Any]:
        self.predicted += len(entries)
        data = {
            "index": 0,
            "content": text,
            "tokens": [e.token for e in entries],
            "stop": False,
            "id_slot": self.slot,
            "tokens_predicted": self.predicted,
            "tokens_evaluated": len(self.plan.prompt),
        }
        if self.body.n_probs:
            data["completion_probabilities"] = self.probs(entries)
        return data

    def probs(self, entries: List[TokenLogprob]) -> List[Dict[str, Any]]:
        return probabilities(entries, self.runner.provider.decode, self.body.post_sampling_probs)

    def final(self, text: str, entries: List[TokenLogprob], done: Dict[str, Any]) -> Dict[str, Any]:
        provider, prompt = self.runner.provider, self.plan.prompt
        data: Dict[str, Any] = {
            "index": 0,
            "content": text,
            "tokens": [e.token for e in entries] if self.body.return_tokens else [],
            "id_slot": self.slot,
            "stop": True,
            "model": self.runner.name,
            "tokens_predicted": done["completion_tokens"],
            "tokens_evaluated": len(prompt),
            "generation_settings": self.body.settings(provider.context_length),
            "prompt": provider.decode(prompt),
            "has_new_line": "\n" in text,
            "truncated": False,
            "stop_type": stop_type(done),
            "stopping_word": done.get("stopping_word") or "",
            "tokens_cached": 0,
            "timings": timings(len(prompt), done["completion_tokens"], self.started, self.first, time.perf_counter()),
        }
        if self.body.n_probs and not self.body.stream:
            data["completion_probabilities"] = self.probs(entries)
        data["backtrack"] = backtrack_info(self.plan, [done])
        return data


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def completion(request: Request) -> Response:
    """``POST /completion``: llama-server's native completion, whole or streamed."""
    runner: Runner = request.app.state.runner
    body = await read_request(request, LlamaCompletionRequest)
    if body.id_slot >= runner.parallel:
        raise APIError(
            f"id_slot must be -1 or a slot in [0, {runner.parallel}), got {body.id_slot}", "id_slot", "invalid_value"
        )
    plan, (answer,), _ = await start_generations(request, LlamaCompletionRequest, body=body)
    out = Completion(runner, plan, body)
    if plan.stream:
        return StreamingResponse(
            _events(answer, out),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
    try:
        parts: List[str] = []
        entries: List[TokenLogprob] = []
        while True:
            kind, value = await answer.next(request.is_disconnected)
            if kind in ("text", "logprobs") and out.first == out.started:
                out.first = time.perf_counter()
            if kind == "text":
                parts.append(value)
            elif kind == "logprobs":
                entries += value
            elif kind == "error":
                raise value
            elif kind == "done":
                text = "".join(parts)
                return JSONResponse(out.final(text, out.reply.covering(entries, text)[0], value))
    finally:
        answer.cancel()


async def _events(answer: Answer, out: Completion) -> AsyncIterator[str]:
    pending: List[TokenLogprob] = []  # final tokens whose text has not come yet
    try:
        while True:
            kind, value = await answer.queue.get()
            if kind in ("text", "logprobs") and out.first == out.started:
                out.first = time.perf_counter()
            if kind == "logprobs":
                pending += value
            elif kind == "text":
                used, pending = out.reply.covering(pending, value)
                yield _sse(out.partial(value, used))
            elif kind == "error":
                yield _sse(value.body())
                return
            elif kind == "done":
                yield _sse(out.final("", [], value))
                return
    finally:
        answer.cancel()


def _slot(runner: Runner, index: int, processing: bool) -> Dict[str, Any]:
    """One slot as llama-server's ``/slots`` and ``/props`` show it (the default settings)."""
    n_ctx = runner.provider.context_length
    return {
        "id": index,
        "id_task": -1,
        "n_ctx": n_ctx,
        "speculative": False,
        "is_processing": processing,
        "params": LlamaCompletionRequest.model_construct(prompt="").settings(n_ctx),
        "prompt": "",
        "next_token": {
            "has_next_token": processing,
            "has_new_line": False,
            "n_remain": -1,
            "n_decoded": 0,
            "stopping_word": "",
        },
    }


async def props(request: Request) -> Response:
    """``GET /props``: the server's properties (read-only, as llama-server without ``--props``)."""
    runner: Runner = request.app.state.runner
    return JSONResponse(
        {
            "default_generation_settings": _slot(runner, 0, False),
            "total_slots": runner.parallel,
            "model_alias": runner.name,
            "model_path": runner.name,
            "modalities": {"vision": False, "audio": False},
            "endpoint_slots": True,
            "endpoint_props": False,
            "endpoint_metrics": False,
            "chat_template": chat_template(runner.provider) or "",
            "chat_template_caps": {},
            "build_info": f"backtrack-sampler {__version__}",
            "is_sleeping": False,
        }
    )


async def slots(request: Request) -> Response:
    """``GET /slots``: one entry per slot (``parallel``), the first ``running`` ones processing;
    ``?fail_on_no_slot=1``: 503 when none is idle."""
    runner: Runner = request.app.state.runner
    running = min(runner.running, runner.parallel)
    if request.query_params.get("fail_on_no_slot") in ("1", "true") and running >= runner.parallel:
        raise APIError("no slot available", None, "unavailable_error", 503, "unavailable_error")
    return JSONResponse([_slot(runner, i, i < running) for i in range(runner.parallel)])


ROUTES = [
    Route("/completion", completion, methods=["POST"]),
    Route("/completions", completion, methods=["POST"]),
    Route("/props", props, methods=["GET"]),
    Route("/slots", slots, methods=["GET"]),
]
