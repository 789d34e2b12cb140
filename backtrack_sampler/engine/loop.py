"""The engine's backend: generations stepped by the one driver (``driver.Scheduler``) with tokens
drafted by a serving engine.

Each running generation has one streamed request open (a background thread reads it into a
queue); the engine streams tokens with the top-K candidates at every position. Each token is a
*draft*, proposed to the generation as a ``Draft`` (``EngineBackend.propose``):

- the candidates become logits (vocabulary-sized, -inf outside the candidates) and go through
  ``generation.distribution`` (the strategy's hooks; the one copy of that logic), giving p';
- q is the distribution the engine drew the draft from (see ``apis.Step.kind``);
- the draft x is kept with probability min(1, p'(x) / q(x)) (always when the strategy left the
  distribution alone), else a token is drawn from the residual max(0, p' - q), normalised. This is
  speculative sampling: the kept token is distributed exactly as p';
- ``generation.push`` then lets the strategy rewind. When a token was replaced or rewound (the
  generation's tokens are no longer the stream's), the stream is closed (the engine stops decoding
  it) and a new request continues from the kept tokens, which the engine's prefix cache serves.
  After a rewind to position s the replacement is drawn locally from the candidates already
  received for s (proposed as ``driver.Logits``), so the new request starts at
  ``ids[:s] + [replacement]``.

A policy that does not sample (``playground.CandidateSearch``) reads ``Draft.distribution`` and
puts its own token: the stream is then left the same way, and asked for one token at a time
(``Policy.draft_limit``).

Exactness: p' and q are known on the reported candidates only. With K >= the number of tokens the
engine's sampling keeps (e.g. top_k <= K) the output is distributed exactly as the strategy asks
(up to float rounding); with more candidates than K (top_k off), tokens outside the K best are
only reachable as the engine's own drafts, which are kept when the strategy leaves their position
unchanged.
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Deque, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.backends import Backend, Failure, Logits, Proposal
from ..core.generation import Generation
from ..core.scheduler import BatchJob
from ..strategy.sampling import Sampling
from .acceptance import accept, engine_q, local_sampling, step_logits
from .apis import Finish, LlamaServerAPI, Step
from .client import EngineClient
from .errors import EngineError


class Slots:
    """The engine's sequence slots (llama-server's ``total_slots``): each running generation keeps
    one, so its requests find their prefix cached there; -1 (the engine's choice) when none is free."""

    def __init__(self, count: Optional[int]):
        self._free: List[int] = list(range((count or 0) - 1, -1, -1))
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            return self._free.pop() if self._free else -1

    def give(self, slot: int) -> None:
        if slot >= 0:
            with self._lock:
                self._free.append(slot)


class Draft(Proposal):
    """A token the engine drafted (``step.token``) with the candidates at its position."""

    __slots__ = ("backend", "step")

    def __init__(self, backend: EngineBackend, step: Step):
        self.backend, self.step = backend, step

    def distribution(self, generation: Generation):
        """The strategy's distribution on the candidates (token ids of the vocabulary). A
        strategy that edits no logits and reads no probabilities is given the K candidates'
        values alone as its logits (a K-long array), not a vocabulary-sized one."""
        step, user = self.step, generation.sampling
        local = local_sampling(step.kind, user)
        caps = generation.strategy.capabilities
        if not (caps.edits_logits or caps.reads_probs or generation.logprobs is not None):
            ids, probs, dense = generation.distribution(step_logits(step, user.temperature).astype(np.float32), local)
            return step.ids[ids], probs, dense
        return generation.distribution(self.backend.logits(step, user.temperature), local)

    def take(self, generation: Generation) -> List[int]:
        """Accept the draft or replace it (speculative sampling), then let the strategy rewind."""
        step, user = self.step, generation.sampling
        position = len(generation.tokens)
        chosen: List[int] = []  # the token _choose put (the draft or its replacement)
        final = generation.take(lambda: self._choose(generation, chosen))
        if chosen == [step.token] and len(generation.tokens) == position and not generation.done:
            # the strategy took back just this token (e.g. a soft-banned word): choose again here; when
            # the new choice is the same token, the engine's stream after it is still valid
            final = final + generation.advance(
                self.backend.logits(step, user.temperature), local_sampling(step.kind, user)
            )
        return final

    def _choose(self, generation: Generation, chosen: List[int]) -> Tuple[int, Optional[np.ndarray]]:
        """``(token, dense)``: the draft accepted, or its replacement drawn from the strategy's distribution."""
        step = self.step
        try:
            ids, probs, dense = self.distribution(generation)
        except ValueError:
            if step.kind != "opaque":
                raise
            ids, probs, dense = np.array([step.token]), np.ones(1), None  # nothing to choose from
        token = accept(step.token, engine_q(step, generation.sampling), (ids, probs), generation.rng)
        if dense is None and generation.strategy.capabilities.reads_probs:
            dense = np.zeros(self.backend.vocab_size, np.float32)
        chosen.append(token)
        return token, dense


_END = object()  # a stream that ended without the engine's final event


class _Readers:
    """The threads that read streams, kept for the next stream instead of one new thread per
    request: ``Thread.start`` waits until the new thread runs, which took 50 ms a request on a
    busy 2-core machine (vLLM beside 4 generations), in the scheduler's thread, holding up every
    generation. Daemon threads (a read stuck on an engine never holds up the interpreter's exit);
    one idle for ``idle_seconds`` ends."""

    idle_seconds = 30.0

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = 0  # threads waiting for a task (or about to)
        self._lock = threading.Lock()

    def run(self, task) -> None:
        """Run ``task()`` in a reader thread: an idle one, else a new one."""
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1
        self._tasks.put(task)
        if spawn:
            threading.Thread(target=self._work, daemon=True, name="backtrack-sampler-engine-stream").start()

    def _work(self) -> None:
        while True:
            try:
                task = self._tasks.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # not promised to a task that run() is queueing
                        self._idle -= 1
                        return
                continue
            try:
                task()
            finally:
                with self._lock:
                    self._idle += 1


_READERS = _Readers()


class Stream:
    """One request of a generation, whose events (a ``Step`` per token, a ``Finish``, an exception
    or ``_END``) arrive in ``events``. ``expected``: the continuation the generation has while it
    follows this stream (its tokens when the request was made, then each draft proposed from it)."""

    def __init__(self, tokens: Sequence[int]):
        self.expected = list(tokens)
        self.events: Deque[object] = collections.deque()
        self.got = 0  # drafts proposed from it
        self.closed = False

    def next(self):
        """The next event (a Step, a Finish, an exception or _END), or None for now."""
        return self.events.popleft() if self.events else None

    def close(self) -> None:
        """Stop the request: the engine stops decoding it."""
        self.closed = True


class _HTTPStream(Stream):
    """A streamed HTTP request, read by a reader thread (``_READERS``) into ``events``."""

    def __init__(
        self, client: EngineClient, body: dict, sampling: Sampling, tokens: Sequence[int], wake: threading.Event
    ):
        super().__init__(tokens)
        self._cut = None
        self._lock = threading.Lock()
        _READERS.run(lambda: self._read(client, body, sampling, wake))

    def _read(self, client: EngineClient, body: dict, sampling: Sampling, wake: threading.Event) -> None:
        try:
            with client.stream(body, sampling, on_open=self._opened) as events:
                for event in events:
                    if self.closed:
                        return
                    self.events.append(event)
                    wake.set()
                    if isinstance(event, Finish):
                        return
            self.events.append(_END)
        except Exception as error:  # EngineError: reported to the generation, unless it left the stream
            if not self.closed:
                self.events.append(error)
        finally:
            wake.set()

    def _opened(self, cut) -> None:
        with self._lock:
            self._cut = cut
            closed = self.closed
        if closed:
            cut()

    def close(self) -> None:
        """Stop reading and cut the connection: the engine stops decoding this request."""
        with self._lock:
            self.closed = True
            cut = self._cut
        if cut is not None:
            cut()


class _Sequence:
    """A running generation on the engine: its slot, its open stream, and the candidates
    received at each position (``known``) along ``path``, the tokens they were received after."""

    def __init__(self, slot: int):
        self.slot = slot
        self.stream: Optional[Stream] = None
        self.known: Dict[int, Step] = {}
        self.path: List[int] = []

    def follow(self, tokens: List[int]) -> None:
        """Forget the candidates received after tokens the generation no longer has."""
        path, n = self.path, len(self.path)
        same = (
            n
            if n <= len(tokens) and tokens[:n] == path
            else next((i for i, (a, b) in enumerate(zip(path, tokens)) if a != b), min(n, len(tokens)))
        )
        for position in [p for p in self.known if p > same]:
            del self.known[position]
        self.path = list(tokens)


class EngineBackend(Backend):
    """Runs generations on one engine (``client``) for ``provider`` (an ``EngineProvider``: the
    tokenizer and the vocabulary size).

    n_probs: K, the candidates asked for at every position (default: top_k, at least 20; 64 when
        top_k is off). chunk: most tokens per request (default: all that are left; a rejected
        draft closes the stream early anyway). slots: the engine's sequence slots (a ``Slots``
        shared by every backend of the provider, or a count), when its API lets a request choose
        one (llama-server); None: the engine places every request. ``propose`` waits up to
        ``poll`` seconds for a draft when none is ready.
    """

    poll = 0.05

    def __init__(
        self,
        provider,
        client: EngineClient,
        vocab_size: int,
        n_probs: Optional[int] = None,
        chunk: Optional[int] = None,
        model: Optional[str] = None,
        slots: Union[None, int, Slots] = None,
        max_sequences: int = 64,
    ):
        self.provider, self.client, self.vocab_size = provider, client, vocab_size
        self.n_probs, self.chunk, self.model = n_probs, chunk, model
        self.slots = slots if isinstance(slots, Slots) else Slots(slots)
        self._max_sequences = max_sequences
        self._sequences: Dict[BatchJob, _Sequence] = {}
        self._wake = threading.Event()

    @property
    def max_sequences(self) -> int:
        return self._max_sequences

    def k_for(self, sampling: Sampling) -> int:
        if self.n_probs:
            return self.n_probs
        top_k = sampling.top_k
        return max(top_k, 20) if top_k else 64

    def logits(self, step: Step, temperature: float) -> np.ndarray:
        """Vocabulary-sized logits: the candidates' values, -inf elsewhere."""
        logits = np.full(self.vocab_size, -np.inf, dtype=np.float32)
        logits[step.ids] = step_logits(step, temperature)
        return logits

    # --- the step protocol ---------------------------------------------------------------------
    def admit(self, job: BatchJob) -> None:
        self._sequences[job] = _Sequence(self.slots.take())

    def release(self, job: BatchJob) -> None:
        sequence = self._sequences.pop(job, None)
        if sequence is not None:
            if sequence.stream is not None:
                sequence.stream.close()
            self.slots.give(sequence.slot)

    def notify(self) -> None:
        self._wake.set()

    def close(self) -> None:
        for job in list(self._sequences):
            self.release(job)

    def propose(self, jobs: Sequence[BatchJob]) -> Dict[BatchJob, Proposal]:
        """The next draft of every job whose stream has one (opening a stream for those that need
        one); waits up to ``poll`` seconds when none has."""
        self._wake.clear()
        proposals = self._collect(jobs)
        if not proposals and jobs:
            self._wake.wait(self.poll)
            self._wake.clear()
            proposals = self._collect(jobs)
        return proposals

    def _collect(self, jobs: Sequence[BatchJob]) -> Dict[BatchJob, Proposal]:
        proposals = {}
        for job in jobs:
            try:
                proposal = self._next(job, self._sequences[job])
            except Exception as error:  # e.g. a request that cannot be built
                proposal = Failure(error)
            if proposal is not None:
                proposals[job] = proposal
        return proposals

    def known(self, jobs: Sequence[BatchJob]) -> Dict[BatchJob, Proposal]:
        """The jobs that rewound to a position whose candidates were received: chosen there
        locally, in the same step (their next request then opens in the next one)."""
        answers: Dict[BatchJob, Proposal] = {}
        for job in jobs:
            sequence = self._sequences.get(job)
            proposal = None if sequence is None else self._local(job.generation, sequence)
            if proposal is not None:
                answers[job] = proposal
        return answers

    def _local(self, generation: Generation, sequence: _Sequence) -> Optional[Proposal]:
        """Follow the generation's tokens (a draft replaced or rewound leaves the stream stale:
        it is closed); with no stream, the candidates known at the position reached, to choose
        from locally."""
        tokens = generation.tokens
        sequence.follow(tokens)
        stream = sequence.stream
        if stream is not None and tokens != stream.expected:
            stream.close()
            sequence.stream = stream = None
        step = sequence.known.get(len(tokens)) if stream is None else None
        if step is None:
            return None
        user = generation.sampling
        return Logits(self.logits(step, user.temperature), local_sampling(step.kind, user))

    def _next(self, job: BatchJob, sequence: _Sequence) -> Optional[Proposal]:
        generation = job.generation
        name = self.client.api.name
        while True:
            local = self._local(generation, sequence)
            if local is not None:  # rewound to a position whose candidates are known: choose there, locally
                return local
            stream = sequence.stream
            if stream is None:
                sequence.stream = stream = self._open(job, sequence)
            event = stream.next()
            if event is None:
                return None
            if isinstance(event, Step):
                stream.got += 1
                return self._draft(generation, sequence, stream, event)
            sequence.stream = None
            if isinstance(event, Finish):
                if event.reason == "gap":
                    return self._gap(generation, sequence)
                if stream.got == 0:
                    return Failure(
                        EngineError(f"{name} finished a request without generating a token (its context may be full)")
                    )
                continue  # the request is done: the next one continues from the kept tokens
            if event is _END:
                return Failure(EngineError(f"{name} ended the stream without finishing the request"))
            return Failure(event)

    def _open(self, job: BatchJob, sequence: _Sequence) -> Stream:
        generation = job.generation
        user = generation.sampling
        n = generation.limit - len(generation.tokens)
        for most in (self.chunk, job.policy.draft_limit):
            if most:
                n = min(n, most)
        seed = int(generation.rng.integers(2**31 - 1)) if user.temperature > 0 else None
        return self.request(generation, max(n, 1), seed, sequence.slot)

    def request(self, generation: Generation, n: int, seed: Optional[int], slot: int) -> Stream:
        """A new request for ``n`` tokens after ``generation.sequence`` (here a streamed HTTP request)."""
        user = generation.sampling
        body = self.client.api.body(generation.sequence, n, user, self.k_for(user), seed, self.model, slot)
        return _HTTPStream(self.client, body, user, generation.tokens, self._wake)

    def _draft(self, generation: Generation, sequence: _Sequence, stream: Optional[Stream], step: Step) -> Proposal:
        if int(step.ids.max()) >= self.vocab_size or int(step.ids.min()) < 0:
            return Failure(
                EngineError(
                    f"{self.client.api.name} sent token id {int(step.ids.max())}, outside the local tokenizer's "
                    f"{self.vocab_size} tokens: pass the tokenizer of the model it serves"
                )
            )
        sequence.known[len(generation.tokens)] = step
        if stream is not None:
            stream.expected.append(step.token)
        return Draft(self, step)

    def _gap(self, generation: Generation, sequence: _Sequence) -> Proposal:
        """After a llama-server gap: one token, not streamed (its probabilities may be missing)."""
        api = self.client.api
        if not isinstance(api, LlamaServerAPI):
            return Failure(EngineError(f"{api.name} skipped tokens in its stream"))
        user = generation.sampling
        seed = int(generation.rng.integers(2**31 - 1)) if user.temperature > 0 else None
        body = api.body(generation.sequence, 1, user, self.k_for(user), seed, slot=sequence.slot, stream=False)
        try:
            step = api.single(self.client.post(api.path, body), user)
        except EngineError as error:
            return Failure(error)
        self.client.stats.steps += 1
        return self._draft(generation, sequence, None, step)


EngineLoop = EngineBackend  # its 4.0 name (it had its own drive loop; the scheduler steps it now)
