"""Continuous batching: many generations advance together, one backend call per step.

``BatchScheduler`` drives ``Generation`` objects (the one copy of the sampling and rewind logic,
in ``backtrack_sampler.py``) the way ``BacktrackSampler.generate`` drives one: it asks the
provider for the logits of every running ``generation.sequence`` in a single
``provider.generate_batch`` call, hands each its logits with ``generation.advance``, and delivers
the tokens that became final. Each generation keeps its own sequence in the provider's cache, so a
rewind cuts only its own. Generations join and leave between steps; the queue is first come, first
served; a long prompt is fed in chunks so it does not stall the generations already decoding::

    scheduler = BatchScheduler(provider)                  # provider with max_sequences > 1
    jobs = [scheduler.submit(prompt, AntiSlopStrategy(provider, slops), max_new_tokens=200, seed=i)
            for i, prompt in enumerate(prompts)]
    for job, tokens in scheduler.run():                   # (job, tokens that became final)
        ...
    texts = [job.text for job in jobs]

It is not thread-safe except for ``submit``/``add`` and ``BatchJob.cancel``, which may be called
from other threads while one thread steps (this is how the server uses it).
"""

from __future__ import annotations

import collections
import itertools
import threading
from typing import Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .backtrack_sampler import BacktrackSampler, Generation, GenerationStats
from .provider.base_provider import BaseProvider
from .strategy.base_strategy import BaseStrategy

TokensCallback = Callable[["BatchJob", List[int]], None]
JobCallback = Callable[["BatchJob"], None]


class BatchJob:
    """One generation in a ``BatchScheduler``: ``"queued"``, then ``"running"``, then ``"done"``.

    ``tokens`` holds the final tokens delivered so far; ``error`` the exception that ended it
    (a strategy that raised, a backend failure), else None; ``stats`` the generation's stats
    (``finish_reason``: "stop", "length", or None when cancelled or failed).
    """

    _ids = itertools.count()

    def __init__(self, generation: Generation, on_tokens: Optional[TokensCallback] = None,
                 on_finish: Optional[JobCallback] = None, on_start: Optional[JobCallback] = None,
                 on_step: Optional[JobCallback] = None):
        self.generation = generation
        self.on_tokens, self.on_finish, self.on_start, self.on_step = on_tokens, on_finish, on_start, on_step
        self.tokens: List[int] = []
        self.error: Optional[BaseException] = None
        self.state = "queued"
        self.id = next(self._ids)
        self._fed = 0  # tokens of the sequence the provider holds (the prompt is fed in chunks)
        self._cancelled = False

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

    def __hash__(self) -> int:
        return self.id

    def __repr__(self) -> str:
        return f"<BatchJob {self.id} {self.state}, {len(self.tokens)} tokens>"


class BatchScheduler:
    """Runs up to ``parallel`` generations at once on ``provider`` (default and maximum: its
    ``max_sequences``); more wait in a first-come-first-served queue.

    step_tokens: the most tokens one step evaluates (decoding generations take one each; prompts
    waiting to be read share the rest, at least a quarter of it, in arrival order).
    """

    def __init__(self, provider: BaseProvider, parallel: Optional[int] = None, step_tokens: int = 256):
        if not isinstance(provider, BaseProvider):
            raise TypeError(f"BatchScheduler takes a provider, got {type(provider).__name__}")
        capacity = provider.max_sequences
        parallel = capacity if parallel is None else parallel
        if not isinstance(parallel, int) or not 1 <= parallel <= capacity:
            raise ValueError(f"parallel must be an integer in [1, {capacity}] ({type(provider).__name__}"
                             f".max_sequences), got {parallel!r}")
        if not isinstance(step_tokens, int) or step_tokens < 4:
            raise ValueError(f"step_tokens must be an integer >= 4, got {step_tokens!r}")
        self.provider, self.parallel, self.step_tokens = provider, parallel, step_tokens
        self._sampler = BacktrackSampler(provider, BaseStrategy())  # builds checked generations
        self._queue: Deque[BatchJob] = collections.deque()
        self._running: List[BatchJob] = []
        self._lock = threading.Lock()
        self.steps = 0  # generate_batch calls made

    # --- joining ---------------------------------------------------------------------------------
    def submit(self, prompt: Union[str, Sequence[int]], strategy: Optional[BaseStrategy] = None, *,
               on_tokens: Optional[TokensCallback] = None, on_finish: Optional[JobCallback] = None,
               on_start: Optional[JobCallback] = None, **kwargs) -> BatchJob:
        """Queue a generation and return its job. ``strategy``: an instance of its own (default: none);
        ``kwargs``: ``BacktrackSampler.generate``'s (``max_new_tokens``, ``temperature``, ``top_k``,
        ``top_p``, ``min_p``, ``seed``, ``on_rewind``, ...), checked now (ValueError).
        ``on_start(job)`` is called when it leaves the queue, ``on_tokens(job, tokens)`` with the
        tokens that became final, ``on_finish(job)`` once it is done (all from the thread that steps)."""
        generation = self._sampler.start(prompt, strategy=strategy or BaseStrategy(), **kwargs)
        return self.add(generation, on_tokens, on_finish, on_start)

    def add(self, generation: Generation, on_tokens: Optional[TokensCallback] = None,
            on_finish: Optional[JobCallback] = None, on_start: Optional[JobCallback] = None,
            on_step: Optional[JobCallback] = None) -> BatchJob:
        """Queue a ``Generation`` built elsewhere (``BacktrackSampler.start``) on this provider.
        ``on_step(job)`` (optional) is called after every token it advances by (e.g. to follow
        its provisional tokens and rewinds with ``events.EventTracker``)."""
        if generation.provider is not self.provider:
            raise ValueError("the generation was started on another provider")
        job = BatchJob(generation, on_tokens, on_finish, on_start, on_step)
        with self._lock:
            strategies = {id(j.generation.strategy) for j in itertools.chain(self._queue, self._running)}
            if id(generation.strategy) in strategies:
                raise ValueError("this strategy instance already drives another job: give each its own")
            self._queue.append(job)
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
    def run(self) -> Iterator[Tuple[BatchJob, List[int]]]:
        """Step until every job is done, yielding ``(job, tokens that became final)``."""
        while self.pending:
            yield from self.step()

    def step(self) -> List[Tuple[BatchJob, List[int]]]:
        """Admit queued jobs into free slots, evaluate every running job's new tokens in one
        ``generate_batch`` call, advance each by one token; returns the tokens that became final."""
        for job in [j for j in self._running if j._cancelled]:
            self._finish(job)
        self._admit()
        decoding, reading = [], []
        for job in self._running:
            generation = job.generation
            if len(generation.prompt) + len(generation.tokens) - job._fed <= 1:
                decoding.append(job)
            else:
                reading.append(job)
        if not (decoding or reading):
            return []
        requests: Dict[BatchJob, List[int]] = {job: job.generation.sequence for job in decoding}
        room = max(self.step_tokens - len(decoding), self.step_tokens // 4)
        for job in reading:  # prompts, in arrival order, within the room left
            sequence = job.generation.sequence
            take = min(len(sequence) - job._fed, room)
            if take <= 0:
                break
            room -= take
            requests[job] = sequence if job._fed + take == len(sequence) else sequence[: job._fed + take]
        try:
            logits = self.provider.generate_batch(requests)
        except Exception as error:  # the backend failed: every job of this step ends with the error
            for job in requests:
                job.error = error
                self._finish(job)
            return []
        self.steps += 1
        delivered = []
        for job, sequence in requests.items():
            job._fed = len(sequence)
            if len(sequence) < len(job.generation.prompt) + len(job.generation.tokens):
                continue  # a chunk of the prompt: its logits are not needed
            try:
                tokens = job.generation.advance(logits[job])
                if tokens:
                    job.tokens.extend(tokens)
                    delivered.append((job, tokens))
                    if job.on_tokens is not None:
                        job.on_tokens(job, tokens)
                if job.on_step is not None:
                    job.on_step(job)
            except Exception as error:  # the strategy (or the callback) failed: only this job ends
                job.error = error
                self._finish(job)
                continue
            if job.generation.done:
                self._finish(job)
        return delivered

    def cancel_all(self) -> None:
        """Cancel every queued and running job (they end at the next step)."""
        with self._lock:
            for job in itertools.chain(self._queue, self._running):
                job.cancel()

    def _admit(self) -> None:
        with self._lock:
            for job in [j for j in self._queue if j._cancelled]:
                self._queue.remove(job)
                self._close(job)
            started = []
            while self._queue and len(self._running) < self.parallel:
                job = self._queue.popleft()
                job.state = "running"
                self._running.append(job)
                started.append(job)
        for job in started:
            if job.on_start is not None:
                job.on_start(job)
        for job in [j for j in self._running if j.generation.done]:  # e.g. max_new_tokens=0
            self._finish(job)

    def _finish(self, job: BatchJob) -> None:
        with self._lock:
            if job in self._running:
                self._running.remove(job)
        self.provider.release(job)
        self._close(job)

    def _close(self, job: BatchJob) -> None:
        job.generation.close(job.generation.stats.finish_reason)
        job.state = "done"
        if job.on_finish is not None:
            job.on_finish(job)
