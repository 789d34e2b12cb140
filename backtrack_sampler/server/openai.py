"""Answers in OpenAI's shapes: a completion or chat completion (``Reply``: choices, logprobs, usage,
and the ``backtrack`` extension: rewinds, the constraint that failed, the fields that had no
effect), read whole from the generations' ``Answer`` s (``whole_answer``) or streamed as Server-Sent
Events (``streamed_answer``: final text only, ending with ``data: [DONE]``; with
``stream_options.include_backtrack`` extension chunks carry the generation's events), and errors
(``error_response``)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
import uuid
from typing import Any, AsyncGenerator, AsyncIterator, Dict, List, Optional, Tuple

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from ..core.generation import TokenLogprob
from .errors import APIError
from .runner import Answer, Plan, Runner

Result = Tuple[str, Dict[str, Any], List[TokenLogprob]]  # a generation's text, its "done" report, its logprobs


def error_response(error: APIError) -> JSONResponse:
    """``error`` as OpenAI's error body, with its status."""
    return JSONResponse(error.body(), status_code=error.status)


class Reply:
    """The OpenAI objects of one answer (completion, chunks, usage) with one choice per generation."""

    def __init__(self, runner: Runner, plan: Plan):
        self.model, self.plan, self.decode = runner.name, plan, runner.provider.decode
        self.id = ("chatcmpl-" if plan.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.offsets: Dict[int, int] = collections.defaultdict(int)  # text_offset of each choice's next token

    def logprobs(
        self, entries: List[TokenLogprob], text: Optional[str] = None, index: int = 0
    ) -> Optional[Dict[str, Any]]:
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

            def item(token: str, logprob: float) -> Dict[str, Any]:
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

    def covering(self, entries: List[TokenLogprob], text: str) -> Tuple[List[TokenLogprob], List[TokenLogprob]]:
        """``(the first entries, the rest)``: as many tokens as it takes to cover ``text`` (the
        others are held-back text, or a stop string's, which never reaches the client)."""
        start, keep = 0, 0
        while keep < len(entries) and start < len(text):
            start, keep = start + len(self.decode([entries[keep].token])), keep + 1
        return entries[:keep], entries[keep:]

    def _head(self, obj: str) -> Dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, dones: List[Dict[str, Any]]) -> Dict[str, Any]:
        """OpenAI's usage; ``prompt_tokens_details.cached_tokens``: the prompt tokens the prompt
        cache held (of the choice that found the fewest)."""
        prompt, completion = len(self.plan.prompt), sum(done["completion_tokens"] for done in dones)
        cached = min((done.get("cached_tokens", 0) for done in dones), default=0)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def completion(self, results: List[Result]) -> Dict[str, Any]:
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
        info = backtrack_info(self.plan, dones)
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
    ) -> Dict[str, Any]:
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

    def usage_chunk(self, dones: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {**self._head(self.chunk_object), "choices": [], "usage": self.usage(dones)}


def openai_finish(finish: Optional[str]) -> Optional[str]:
    """OpenAI's ``finish_reason`` for ours: a hard constraint that could not hold ("constraint":
    the text stops before what the strategy could not prevent) is "content_filter", OpenAI's
    reason for "content was omitted"; ``backtrack.constraint`` then says which strategy and why."""
    return "content_filter" if finish == "constraint" else finish


def backtrack_info(plan: Plan, dones: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The ``backtrack`` object of a whole answer: the rewinds of its generations (summed), the
    first constraint that failed, the request's fields that had no effect (``ignored``) and what
    the server noticed about it (``warnings``)."""
    info: Dict[str, Any] = {
        "rewound_tokens": sum(d["rewound_tokens"] for d in dones),
        "rewinds": sum(d["rewinds"] for d in dones),
    }
    constraint = next((d["constraint"] for d in dones if d.get("constraint")), None)
    if constraint:
        info["constraint"] = constraint
    if plan.ignored:
        info["ignored"] = list(plan.ignored)
    if plan.warnings:
        info["warnings"] = list(plan.warnings)
    return info


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _collect(answer: Answer, request: Request) -> Result:
    """``(text, done, logprobs)`` of one generation, read to its end."""
    parts: List[str] = []
    logprobs: List[TokenLogprob] = []
    while True:
        kind, value = await answer.next(request.is_disconnected)
        if kind == "text":
            parts.append(value)
        elif kind == "logprobs":
            logprobs += value
        elif kind == "error":
            raise value
        elif kind == "done":
            return "".join(parts), value, logprobs


async def whole_answer(answers: List[Answer], request: Request, reply: Reply) -> JSONResponse:
    """The answer once every generation is done (``stream`` false)."""
    try:
        results = [await _collect(answer, request) for answer in answers]  # they run at once; read in turn
        return JSONResponse(reply.completion(results))
    finally:
        for answer in answers:
            answer.cancel()  # a no-op when done; stops the worker if we were interrupted


async def _reports(answers: List[Answer]) -> AsyncGenerator[Tuple[int, str, Any], None]:
    """``(index, kind, value)`` of every answer's reports as they come, until each is done or failed."""
    waiting: Dict[asyncio.Future[Tuple[str, Any]], int] = {
        asyncio.ensure_future(answer.queue.get()): i for i, answer in enumerate(answers)
    }
    try:
        while waiting:
            ready, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(ready, key=lambda done: waiting[done]):
                index = waiting.pop(future)
                kind, value = future.result()
                yield index, kind, value
                if kind not in ("done", "error"):
                    waiting[asyncio.ensure_future(answers[index].queue.get())] = index
    finally:
        for future in waiting:
            future.cancel()


def streamed_answer(answers: List[Answer], reply: Reply) -> StreamingResponse:
    """The answer as Server-Sent Events (``stream`` true), as the generations make it."""

    async def events() -> AsyncIterator[str]:
        try:
            if reply.plan.chat:
                for index in range(len(answers)):
                    yield _sse(reply.chunk("", first=True, index=index))
            logprobs: Dict[int, List[TokenLogprob]] = collections.defaultdict(list)  # whose text comes next
            dones: List[Dict[str, Any]] = []
            async with contextlib.aclosing(_reports(answers)) as reports:
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
                        if reply.plan.warnings:
                            last.setdefault("backtrack", {})["warnings"] = list(reply.plan.warnings)
                        yield _sse(last)
                        dones.append(value)
            if len(dones) == len(answers) and reply.plan.include_usage:  # with the answer's rewinds, as unstreamed
                yield _sse({**reply.usage_chunk(dones), "backtrack": backtrack_info(reply.plan, dones)})
            yield "data: [DONE]\n\n"
        finally:
            for answer in answers:
                answer.cancel()  # the client went away (or we are done): free the model for the next request

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
