"""Steps 1 to 3 of a generating request on the event loop (see ``app``): read the body within its
size limit (``read_body``), validate it (``schemas.parse_request``), plan it in a worker thread
(``plan.plan_request``) and queue its generations on the runner (``start_generations``), waiting
until each has its turn at the model. The routes (``app``, ``frontend_routes``) then read the
generations' reports and shape the answer."""

from __future__ import annotations

from typing import List, Optional, Tuple, Type, TypeVar, Union

from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from .errors import APIError
from .limits import Limits
from .plan import plan_request
from .runner import Answer, Plan, Runner
from .schemas import ChatCompletionRequest, CompletionRequest, parse_request

GenerationSchema = Union[Type[CompletionRequest], Type[ChatCompletionRequest]]
R = TypeVar("R", bound=BaseModel)


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


class Live:
    """A generation the KoboldAI routes can check (its text so far) and abort, by ``genkey``
    (``app.state.live`` keeps the latest)."""

    def __init__(self, answer: Answer, genkey: Optional[str], kobold: bool):
        self.answer, self.genkey, self.kobold = answer, genkey or "", kobold
        self.parts: List[str] = []  # the text sent so far (KoboldAI routes)


async def read_request(request: Request, schema: Type[R]) -> R:
    """The request's body, read within ``max_body_bytes`` and validated as ``schema``."""
    limits: Limits = request.app.state.limits
    return parse_request(schema, await read_body(request, limits.max_body_bytes), limits, request.app.state.strategies)


async def start_generations(
    request: Request,
    schema: GenerationSchema,
    choices: bool = False,
    kobold: bool = False,
    body: Optional[Union[CompletionRequest, ChatCompletionRequest]] = None,
) -> Tuple[Plan, List[Answer], List[Live]]:
    """Validate, plan and queue a request's generations (``n`` of them when ``choices``); returns
    ``(plan, answers, lives)`` once every one has started. ``kobold``: the KoboldAI API's (its
    ``/api/extra/generate/check`` reads them); ``body``: the request already read (``read_request``)."""
    runner: Runner = request.app.state.runner
    limits: Limits = request.app.state.limits
    if body is None:
        body = await read_request(request, schema)
    count = (body.n or 1) if choices else 1
    plans = [await run_in_threadpool(plan_request, runner.provider, body, limits, i) for i in range(count)]
    answers: List[Answer] = []
    try:
        for plan in plans:
            answers.append(runner.start(plan))
        lives = [Live(answer, getattr(body, "genkey", None), kobold) for answer in answers]
        request.app.state.live.extend(lives)
        for answer in answers:
            kind, value = await answer.next(request.is_disconnected)  # waits for its turn at the model
            if kind == "error":
                raise value
    except BaseException:
        for answer in answers:
            answer.cancel()
        raise
    return plans[0], answers, lives
