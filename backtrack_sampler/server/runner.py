"""The server's local runner: every request's generation in one scheduler, stepped by one
background thread; its text, stop strings, time limit and events reported to the request's ``Answer``.

``Runner`` (``server.app.Engine`` is its old name) is what ``create_app`` serves; the HTTP layer
(``app``, ``pipeline``, ``plan``) validates and plans a request, the runner executes the ``Plan``. It
knows nothing about HTTP: a ``Answer`` is told how to check its client (``Answer.next(is_disconnected)``).
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..core.batch import BatchJob, BatchScheduler
from ..core.events import Done, Event, Final, event_dict
from ..core.sampler import BacktrackSampler, Generation
from ..core.scheduler import Policy, Update
from ..provider.base_provider import BaseProvider
from ..provider.models import provider_name
from ..provider.text import TextView
from ..strategy.base_strategy import BaseStrategy
from . import playground
from .errors import APIError


@dataclass
class Plan:
    """One validated request, ready to run."""

    chat: bool
    prompt: List[int]
    strategy: BaseStrategy
    sampling: Dict[str, Any]  # BacktrackSampler.generate's keyword arguments, max_new_tokens included
    stop: List[str]
    max_seconds: float  # wall-clock limit of the generation: then it ends with finish_reason "length"
    stream: bool = False
    include_usage: bool = False
    include_backtrack: bool = False  # stream the generation's events too (stream_options extension)
    logprobs: Optional[int] = None  # report each final token's log-probability and this many alternatives
    ignored: Tuple[str, ...] = ()  # request fields that have no effect here (named in the answer)
    warnings: Tuple[str, ...] = ()  # what the server noticed about the request (``backtrack.warnings``)


class ClientGone(Exception):
    """The client disconnected before the answer was ready (``Answer.next`` raises it; the app answers
    499, which nobody reads)."""


class QueueFull(APIError):
    """429: every slot is busy and the queue is full; ``Retry-After`` says when to try again."""

    def __init__(self, running: int, queued: int, retry_after: int = 1):
        super().__init__(
            f"the server is busy ({running} generations running, {queued} queued, the most it queues): retry later",
            None,
            "rate_limit_exceeded",
            429,
            "rate_limit_error",
        )
        self.headers = {"Retry-After": str(retry_after)}


class StopFilter:
    """Cuts a text stream before the first stop string; holds back any tail that could be the
    start of one, so no part of a stop string is ever sent."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.found = ""  # the stop string that was found (llama.cpp's ``stopping_word``)

    def push(self, text: str) -> Tuple[str, bool]:
        """Returns ``(text to send, whether a stop string was found)``."""
        if not self.stops:
            return text, False
        buffer = self.held + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            at = min(hits)
            self.held, self.found = "", next(s for s in self.stops if buffer.find(s) == at)
            return buffer[:at], True
        keep = max(
            (k for s in self.stops for k in range(min(len(s) - 1, len(buffer)), 0, -1) if buffer.endswith(s[:k])),
            default=0,
        )
        self.held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class Answer:
    """One request's answer as the event loop sees it (``job``: its generation's place in the
    scheduler): the runner's thread puts
    ``(kind, value)`` reports on ``queue``: ``("started", None)`` when it leaves the queue,
    ``("text", str)``, then ``("done", dict)`` or ``("error", APIError)``."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[Tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.checked = loop.time()  # when the client's connection was last checked
        self.job: Optional[BatchJob] = None  # its place in the scheduler
        self.aborted = False

    def put(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel()

    def cancel(self) -> None:
        """Free the slot (or the place in the queue) at the next step."""
        self.cancelled.set()
        if self.job is not None:
            self.job.cancel()

    def abort(self) -> None:
        """End the generation at the next step as if it had finished there (KoboldAI's abort): the
        final text so far is the answer, with finish_reason "stop"."""
        self.aborted = True
        self.cancel()

    async def next(self, is_disconnected: Callable[[], Awaitable[bool]]) -> Tuple[str, Any]:
        """The next report; cancels the job and raises ``ClientGone`` if the client goes away
        meanwhile (``is_disconnected``, e.g. Starlette's ``request.is_disconnected``: checked at least
        every quarter second, also while reports keep coming)."""
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() - self.checked >= 0.25:
                self.checked = loop.time()
                if await is_disconnected():
                    self.cancel()
                    raise ClientGone()
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                pass


class _Output:
    """A generation's ``Update``s (the scheduler's one way out) as reports to its ``Answer``: text of
    whole characters only, cut before any stop string (which ends the generation with
    finish_reason "stop"). With ``plan.include_backtrack`` the text comes from the update's
    events, and the other events are reported too."""

    def __init__(self, provider: BaseProvider, answer: Answer, plan: Plan):
        self.provider, self.answer, self.plan = provider, answer, plan
        self.stops = StopFilter(plan.stop)
        self.view = TextView(provider.decode)  # the final tokens' text (without include_backtrack)
        self.stopped = self.started = False
        self.events = plan.include_backtrack

    def apply(self, update: Update) -> None:
        """Report what one step did: started, final tokens (and their logprobs), events, the end."""
        batch = update.job
        if update.started:
            self.on_start(batch)
        if update.tokens:
            self.on_tokens(batch, update.tokens)
        if update.events:
            self.on_events(batch, update.events)
        if update.finished:
            self.on_finish(batch)

    def on_start(self, batch: BatchJob) -> None:
        self.started = True
        self.answer.put("started")

    def on_tokens(self, batch: BatchJob, tokens: List[int]) -> None:
        if self.plan.logprobs is not None and not self.stopped:  # before the text they make
            end = len(batch.tokens)
            self.answer.put("logprobs", batch.generation.token_logprobs[end - len(tokens) : end])
        if self.stopped or self.events:
            return
        piece = self.view.update(batch.tokens)
        if piece:
            self._send(piece, batch)

    def on_events(self, batch: BatchJob, events: List[Event]) -> None:
        """include_backtrack: the step's events; final text goes in the ordinary chunks."""
        if self.stopped:
            return
        for event in events:
            if isinstance(event, Final):
                self._send(event.text, batch, event.tokens)
                if self.stopped:
                    return
            elif not isinstance(event, Done):  # the server reports its own end (stop strings, time limit)
                self.answer.put("backtrack", playground.backtrack_payload(event, self.stops.held))

    def on_finish(self, batch: BatchJob) -> None:
        if self.stopped:
            return
        error = batch.error
        if error is not None:  # a strategy failed mid-generation
            status = getattr(error, "http_status", 500)  # engine.EngineError (the serving engine failed): 502
            self.answer.put(
                "error",
                APIError(
                    f"generation failed: {type(error).__name__}: {error}",
                    status=status,
                    type="server_error",
                    code="engine_error" if status == 502 else "generation_failed",
                ),
            )
            return
        if batch.stats.finish_reason is None:  # cancelled: the client went away, or an abort
            if not self.answer.aborted:
                return
            if not self.started:
                self.on_start(batch)
        if not self.events:  # (with events, the last step's arrived in on_events)
            self._send(self.view.update(batch.tokens, at_end=True), batch)
        if not self.stopped:
            self._text(self.stops.flush(), 0)
            self._done(batch, batch.stats.finish_reason or "stop")

    def _send(self, text: str, batch: BatchJob, tokens: int = 0) -> None:
        out, hit = self.stops.push(text)
        self._text(out, tokens)
        if hit:
            self.stopped = True
            batch.cancel()  # its slot is free at the next step
            self._done(batch, "stop")

    def _text(self, text: str, tokens: int) -> None:
        if not self.events:
            if text:
                self.answer.put("text", text)
        elif text or tokens:
            self.answer.put("final", {"type": "final", "text": text, "tokens": tokens})

    def _done(self, batch: BatchJob, finish: str) -> None:
        stats = batch.stats
        if self.events:
            self.answer.put(
                "backtrack",
                event_dict(
                    Done(finish, stats.delivered, stats.rewound, stats.rewinds, stats.steps, round(stats.seconds, 4))
                ),
            )
        self.answer.put(
            "done",
            {
                "finish_reason": finish,
                "completion_tokens": stats.delivered,
                "rewound_tokens": stats.rewound,
                "rewinds": stats.rewinds,
                "cached_tokens": stats.cached_tokens,
                "constraint": stats.constraint if finish == "constraint" else None,
                "stopping_word": self.stops.found,
            },
        )


class Runner:
    """The loaded model and the ``BatchScheduler`` (the one driver, on ``provider.backend``: a
    local model's batch of sequences or a serving engine) that runs up to ``parallel`` generations
    at once (default and maximum: ``provider.max_sequences``), one backend call per step, in one
    background thread; the time limit (``Plan.max_seconds``) is the scheduler's; up to ``max_queue`` more (default: 4 x parallel) wait first come, first
    served, and a request beyond that gets a 429 with ``Retry-After``. The event loop (and
    ``/health``) never waits for the model. ``close()`` stops the thread."""

    def __init__(
        self,
        provider: BaseProvider,
        name: Optional[str] = None,
        parallel: Optional[int] = None,
        max_queue: Optional[int] = None,
    ):
        self.provider = provider
        self.name = name or provider_name(provider)
        self.created = int(time.time())
        self.scheduler = BatchScheduler(provider, parallel)  # any provider: its backend() (an engine's too)
        self.parallel = self.scheduler.parallel
        self.max_queue = 4 * self.parallel if max_queue is None else max_queue
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self._sampler = BacktrackSampler(provider, BaseStrategy())
        self._reports: Dict[BatchJob, Callable[[Update], None]] = {}  # who reads each job's updates
        self._lock = threading.Lock()  # a job and its reader are registered together
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="backtrack-sampler-engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        return self.scheduler.running

    @property
    def queued(self) -> int:
        return self.scheduler.queued

    @property
    def busy(self) -> bool:
        return self.scheduler.pending

    @property
    def alive(self) -> bool:
        """Whether the generation thread runs (it ends only on ``close()`` or a fault)."""
        return self._thread.is_alive()

    def start(self, plan: Plan) -> Answer:
        """Queue ``plan``; its reports arrive on the returned ``Answer``. Raises ``QueueFull`` (429)
        when every slot is busy and the queue is full."""
        if self._closed:
            raise APIError("the server is shutting down", None, "server_shutting_down", 503, "server_error")
        scheduler = self.scheduler
        if scheduler.running + scheduler.queued >= self.parallel + self.max_queue:
            raise QueueFull(scheduler.running, scheduler.queued)
        answer = Answer(asyncio.get_running_loop())
        try:
            generation = self._sampler.start(plan.prompt, strategy=plan.strategy, **plan.sampling)
        except ValueError as error:
            raise APIError(str(error), None, "invalid_value") from None
        generation.logprobs = plan.logprobs
        output = _Output(self.provider, answer, plan)
        answer.job = self._add(generation, output.apply, max_seconds=plan.max_seconds, events=plan.include_backtrack)
        return answer

    def _add(self, generation: Union[Generation, Policy], report: Callable[[Update], None], **options) -> BatchJob:
        with self._lock:
            batch = self.scheduler.add(generation, **options)
            self._reports[batch] = report
        self._wake.set()
        return batch

    async def finish(self, generation: Union[Generation, Policy]) -> BatchJob:
        """Run ``generation``, or a policy that holds one (``playground.CandidateSearch``), in the
        scheduler to its end and return its job; cancelled if the caller is (e.g. its client went
        away)."""
        if self._closed:
            raise APIError("the server is shutting down", None, "server_shutting_down", 503, "server_error")
        scheduler = self.scheduler
        if scheduler.running + scheduler.queued >= self.parallel + self.max_queue:
            raise QueueFull(scheduler.running, scheduler.queued)
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[BatchJob] = loop.create_future()

        def resolve(batch: BatchJob) -> None:
            if not finished.done():
                finished.set_result(batch)

        def report(update: Update) -> None:
            if update.finished:
                try:
                    loop.call_soon_threadsafe(resolve, update.job)
                except RuntimeError:  # the event loop is closed
                    pass

        batch = self._add(generation, report)
        try:
            return await finished
        finally:
            batch.cancel()  # a no-op once done

    def _report(self, updates: List[Update]) -> None:
        """Hand each update to its job's reader (the one way out of the scheduler)."""
        with self._lock:
            readers = [(self._reports.get(u.job), u) for u in updates]
            for update in updates:
                if update.finished:
                    self._reports.pop(update.job, None)
        for report, update in readers:
            if report is None:
                continue
            try:
                report(update)
            except Exception:  # a bug in reporting one request: the others go on
                traceback.print_exc()
                update.job.cancel()

    def close(self) -> None:
        """Cancel every generation and stop the background thread."""
        self._closed = True
        self.scheduler.cancel_all()
        self._wake.set()
        self._thread.join(30)

    def _loop(self) -> None:
        scheduler = self.scheduler
        while True:
            if scheduler.pending:
                try:
                    self._report(scheduler.step())
                except Exception:  # a bug, not a request's fault (those end their own job): keep serving
                    traceback.print_exc()
                    scheduler.cancel_all()
            elif self._closed:
                return
            else:
                self._wake.wait(0.5)
                self._wake.clear()
