"""The one driver of ``Generation``: a ``Scheduler`` steps every running generation through a
``Backend``, whatever the backend is (a provider's own cache, its batch of sequences, a serving
engine that drafts tokens), and everything else is a view or a policy on top of it:
``BacktrackSampler.generate`` is a scheduler with one generation, ``BatchScheduler`` one with
many, ``events.stream_events`` the same loop with an ``EventTracker`` after every step, the
server's ``Runner`` a scheduler stepped by a background thread, ``playground.CandidateSearch`` a
policy.

The step protocol (``Scheduler.step``)::

    proposals = backend.propose(running_jobs)          # {job: Proposal}, for the jobs that are ready
    for job, proposal in proposals.items():
        final = job.policy.feed(job.generation, proposal)   # default: proposal.take(generation)
        if job.generation.done: finish it (backend.release, generation.close)
    repeat with backend.known(the jobs that rewound)   # their logits need no model work: the next
                                                       # token is drawn now, read next step with the rest
    return [Update(job, final, events, started, finished), ...]   # the one way out

Every view reads the ``Update``s: ``BacktrackSampler.generate`` yields their tokens,
``stream_events`` their events, the server's runner and the batch command send both on; the
callbacks a job may have (``on_start``, ``on_tokens``, ``on_step``, ``on_finish``) are called
from its update, after the step.

What a backend proposes (``Logits``, an engine's ``Draft``, a ``Failure``) is in ``backends``. Rewinds are the generation's own
(``push`` lets the strategy cut; ``rewind`` is the driver's); a backend follows them by comparing
``generation.tokens`` with what it proposed.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Iterator, List, Optional

from .backends import Backend, Proposal, backend_for  # noqa: F401 (backend_for: the drivers' way in)
from .events import Event, EventTracker
from .generation import Generation, GenerationStats

TokensCallback = Callable[["BatchJob", List[int]], None]
JobCallback = Callable[["BatchJob"], None]


# --- what a job does with it ---------------------------------------------------------------------
class Policy:
    """How a job uses the proposals it gets. This one samples: ``proposal.take(generation)``.

    draft_limit: the most tokens a drafting backend (a serving engine) should draft ahead in one
    request (None: as many as the generation may still take)."""

    draft_limit: Optional[int] = None

    def feed(self, generation: Generation, proposal: Proposal) -> List[int]:
        return proposal.take(generation)


SAMPLE = Policy()


# --- what a step did ------------------------------------------------------------------------------
@dataclass
class Update:
    """What one step did to one job: the scheduler's one output (``Scheduler.step``, ``close``).

    job: the job. tokens: the tokens that became final in this step, in order (often none).
    events: for a job added with ``events=True``, this step's typed events (``core.events``:
    ``Rewind``, ``Final``, ``Provisional``, ``Chosen``, and ``Done`` when it ended); else empty.
    started: it left the queue in this step. advanced: it was given a proposal (a token, or a
    rewind). finished: it ended in this step (``job.stats.finish_reason``; ``job.error`` when it
    failed). Unpacks as ``(job, tokens)``, the shape ``run()`` yielded in 4.0.
    """

    job: BatchJob
    tokens: List[int] = field(default_factory=list)
    events: List[Event] = field(default_factory=list)
    started: bool = False
    advanced: bool = False
    finished: bool = False

    def __iter__(self) -> Iterator:
        return iter((self.job, self.tokens))


# --- jobs and the scheduler ----------------------------------------------------------------------
class BatchJob:
    """One generation in a ``Scheduler``: ``"queued"``, then ``"running"``, then ``"done"``.

    ``tokens`` holds the final tokens delivered so far; ``error`` the exception that ended it
    (a strategy that raised, a backend failure), else None; ``stats`` the generation's stats
    (``finish_reason``: "stop", "length", "constraint", or None when cancelled or failed).
    ``policy``: what it does with its proposals (default: sample); ``max_seconds``: the time it
    may run once started (then its tokens that are not final are dropped and it ends with
    finish_reason "length"); ``events``: its updates carry its typed events.
    """

    _ids = itertools.count()

    def __init__(
        self,
        generation: Generation,
        on_tokens: Optional[TokensCallback] = None,
        on_finish: Optional[JobCallback] = None,
        on_start: Optional[JobCallback] = None,
        on_step: Optional[JobCallback] = None,
        policy: Optional[Policy] = None,
        max_seconds: Optional[float] = None,
        events: bool = False,
    ):
        self.generation = generation
        self.tracker = EventTracker(generation) if events else None
        self.on_tokens, self.on_finish, self.on_start, self.on_step = on_tokens, on_finish, on_start, on_step
        self.policy = policy or SAMPLE
        self.max_seconds = max_seconds
        self.deadline = float("inf")  # time.monotonic() when it must end (set when it starts)
        self.tokens: List[int] = []
        self.error: Optional[BaseException] = None
        self.state = "queued"
        self.id = next(self._ids)
        self._cancelled = False
        self._notify: Callable[[], None] = lambda: None
        self._owns_close = True  # the scheduler closes the generation when it ends (drive() does it later)

    @property
    def stats(self) -> GenerationStats:
        return self.generation.stats

    @property
    def done(self) -> bool:
        return self.state == "done"

    @property
    def text(self) -> str:
        """The text of the final tokens delivered so far."""
        return self.generation.provider.decode(self.tokens)

    def cancel(self) -> None:
        """Stop this generation at the next step (queued or running); safe from any thread."""
        self._cancelled = True
        self._notify()

    def __hash__(self) -> int:
        return self.id

    def __repr__(self) -> str:
        return f"<BatchJob {self.id} {self.state}, {len(self.tokens)} tokens>"


class Scheduler:
    """Runs up to ``parallel`` generations at once on ``backend`` (default and maximum: its
    ``max_sequences``); more wait in a first-come-first-served queue. Not thread-safe except for
    ``add`` and ``BatchJob.cancel``, which may be called from other threads while one thread
    steps (this is how the server uses it)."""

    KNOWN_ROUNDS = 4  # times a step draws again for jobs that rewound to logits known without model work

    def __init__(self, backend: Backend, parallel: Optional[int] = None):
        capacity = backend.max_sequences
        parallel = capacity if parallel is None else parallel
        if not isinstance(parallel, int) or isinstance(parallel, bool) or not 1 <= parallel <= capacity:
            raise ValueError(
                f"parallel must be an integer in [1, {capacity}] ({type(backend.provider).__name__}"
                f".max_sequences), got {parallel!r}"
            )
        self.backend, self.provider, self.parallel = backend, backend.provider, parallel
        self._queue: Deque[BatchJob] = collections.deque()
        self._running: List[BatchJob] = []
        self._lock = threading.Lock()

    # --- joining ---------------------------------------------------------------------------------
    def add(
        self,
        generation,
        on_tokens: Optional[TokensCallback] = None,
        on_finish: Optional[JobCallback] = None,
        on_start: Optional[JobCallback] = None,
        on_step: Optional[JobCallback] = None,
        *,
        policy: Optional[Policy] = None,
        max_seconds: Optional[float] = None,
        events: bool = False,
    ) -> BatchJob:
        """Queue a ``Generation`` built elsewhere (``BacktrackSampler.start``) on this provider, or
        a policy that holds one (``playground.CandidateSearch``). What happens to it comes out of
        ``step()`` as ``Update``s (with its typed events when ``events``). Callbacks, called from
        its update after each step, in the thread that steps: ``on_start(job)`` when it leaves the
        queue, ``on_tokens(job, tokens)`` with the tokens that became final, ``on_step(job)`` after
        every step that advanced it, ``on_finish(job)`` once it is done. ``max_seconds``: see
        ``BatchJob``."""
        if isinstance(generation, Policy):  # a policy that holds its own generation (CandidateSearch)
            held = getattr(generation, "generation", None)
            if not isinstance(held, Generation):
                raise TypeError(f"{type(generation).__name__} holds no generation: pass one")
            policy, generation = generation, held
        if generation.provider is not self.provider:
            raise ValueError("the generation was started on another provider")
        job = BatchJob(generation, on_tokens, on_finish, on_start, on_step, policy, max_seconds, events)
        job._notify = self.backend.notify
        with self._lock:
            strategies = {id(j.generation.strategy) for j in itertools.chain(self._queue, self._running)}
            if id(generation.strategy) in strategies:
                raise ValueError("this strategy instance already drives another job: give each its own")
            self._queue.append(job)
        self.backend.notify()
        return job

    @property
    def running(self) -> int:
        """How many generations are running."""
        return len(self._running)

    @property
    def queued(self) -> int:
        """How many generations wait for a slot."""
        return len(self._queue)

    @property
    def pending(self) -> bool:
        """Whether any generation is running or queued."""
        return bool(self._running or self._queue)

    # --- stepping --------------------------------------------------------------------------------
    def run(self) -> Iterator[Update]:
        """Step until every job is done, yielding each step's ``Update``s (they unpack as
        ``(job, tokens that became final)``)."""
        while self.pending:
            yield from self.step()

    def step(self) -> List[Update]:
        """Admit queued jobs into free slots, ask the backend for every running job's next
        position, feed each job what it proposed; returns what happened to each job it touched."""
        updates: Dict[BatchJob, Update] = {}
        running = self._running
        if running:
            now = time.monotonic()
            for job in [j for j in running if j._cancelled or j.deadline < now]:
                if not job._cancelled:
                    try:
                        self._time_up(job)
                    except Exception as error:  # the strategy's on_rewind failed
                        job.error = error
                self._finish(job, updates)
        if self._queue:
            self._admit(updates)
        if running:
            try:
                proposals = self.backend.propose(list(running))
            except Exception as error:  # a bug in the backend: every running job ends with it
                proposals = {}
                for job in list(running):
                    job.error = error
                    self._finish(job, updates)
            rewound = self._feed(proposals, updates)
            for _ in range(self.KNOWN_ROUNDS):  # a short rewind's logits are known: draw its next token now
                proposals = self.backend.known(rewound) if rewound else {}
                if not proposals:
                    break
                rewound = self._feed(proposals, updates)
        return self._deliver(updates)

    def _feed(self, proposals: Dict[BatchJob, Proposal], updates: Dict[BatchJob, Update]) -> List[BatchJob]:
        """Feed each job its proposal; returns the jobs still running that did not advance (rewound)."""
        rewound = []
        for job, proposal in proposals.items():
            update = updates.setdefault(job, Update(job))
            update.advanced = True
            before = len(job.generation.tokens)
            try:
                tokens = job.policy.feed(job.generation, proposal)
            except Exception as error:  # the strategy or the backend failed: only this job ends
                job.error = error
                tokens = []
            job.tokens.extend(tokens)
            update.tokens.extend(tokens)
            if job.error is not None or job.generation.done:
                self._finish(job, updates)
            elif len(job.generation.tokens) <= before:
                rewound.append(job)
        return rewound

    def cancel_all(self) -> None:
        """Cancel every queued and running job (they end at the next step)."""
        with self._lock:
            for job in itertools.chain(self._queue, self._running):
                job._cancelled = True
        self.backend.notify()

    def close(self) -> List[Update]:
        """End every job now (cancelled) and close the backend; returns their last updates."""
        updates: Dict[BatchJob, Update] = {}
        with self._lock:
            queued, self._queue = list(self._queue), collections.deque()
        for job in queued:
            self._close(job, updates)
        for job in list(self._running):
            self._finish(job, updates)
        self.backend.close()
        return self._deliver(updates)

    def _deliver(self, updates: Dict[BatchJob, Update]) -> List[Update]:
        """Fill in each update's events and call the jobs' callbacks from it. A callback that
        fails ends its job (and only it) with that error."""
        for job, update in list(updates.items()):
            if job.tracker is not None:
                update.events = job.tracker.update()
            try:
                if update.started and job.on_start is not None:
                    job.on_start(job)
                if update.tokens and job.on_tokens is not None:
                    job.on_tokens(job, update.tokens)
                if update.advanced and job.on_step is not None:
                    job.on_step(job)
            except Exception as error:
                job.error = error
                self._finish(job, updates)
                if job.tracker is not None:
                    update.events += job.tracker.update()
            if update.finished and job.on_finish is not None:
                job.on_finish(job)
        return list(updates.values())

    def _time_up(self, job: BatchJob) -> None:
        """The job's time is up: its tokens that are not final are dropped, it ends with "length"."""
        generation = job.generation
        generation.rewind(generation.released, "time limit")
        generation.close("length")

    def _admit(self, updates: Dict[BatchJob, Update]) -> None:
        with self._lock:
            for job in [j for j in self._queue if j._cancelled]:
                self._queue.remove(job)
                self._close(job, updates)
            started = []
            while self._queue and len(self._running) < self.parallel:
                job = self._queue.popleft()
                job.state = "running"
                self._running.append(job)
                started.append(job)
        for job in started:
            self.backend.admit(job)
            if job.max_seconds is not None:
                job.deadline = time.monotonic() + job.max_seconds
            updates.setdefault(job, Update(job)).started = True
        for job in [j for j in self._running if j.generation.done]:  # e.g. max_new_tokens=0
            self._finish(job, updates)

    def _finish(self, job: BatchJob, updates: Dict[BatchJob, Update]) -> None:
        with self._lock:
            if job not in self._running:
                return
            self._running.remove(job)
        self.backend.release(job)
        self._close(job, updates)

    def _close(self, job: BatchJob, updates: Dict[BatchJob, Update]) -> None:
        if job._owns_close:
            job.generation.close(job.generation.stats.finish_reason)
        job.state = "done"
        updates.setdefault(job, Update(job)).finished = True


def drive(
    backend: Backend, generation: Generation, policy: Optional[Policy] = None, events: bool = False
) -> Iterator[Update]:
    """Run ``generation`` alone on ``backend`` (a ``Scheduler`` with one job): its ``Update`` after
    every step (with its typed events when ``events``). An error that ended it is raised; closing
    the iterator early ends the generation (finish_reason None)."""
    scheduler = Scheduler(backend, parallel=1)
    job = scheduler.add(generation, policy=policy, events=events)
    job._owns_close = False  # the strategy is reset once the caller has the last tokens, not before
    try:
        while not job.done:
            yield next((u for u in scheduler.step() if u.job is job), None) or Update(job)
        if job.error is not None:
            raise job.error
    finally:
        scheduler.close()
        generation.close(generation.stats.finish_reason)
