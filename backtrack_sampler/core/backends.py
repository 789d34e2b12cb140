"""Backends: where a generation's next position comes from, and what they propose for it.

A ``Proposal`` is what a backend offers one generation for its next position: ``Logits`` (the
next-token logits; ``take`` samples from them with ``generation.advance``), an engine's drafted
token with its top-K candidates (``take`` accepts or replaces it, see ``engine.loop``), or a
``Failure`` (the backend could not serve it: the job ends with the error). Each gives
``distribution(generation)`` too (the strategy's and the filters' distribution there), which a
policy that does not sample reads instead (``server.playground.CandidateSearch``).

``LocalBackend`` drives ``provider.next_logits`` (one generation at a time), ``BatchBackend``
``provider.next_logits_batch`` (many, one backend call per step); a provider whose model runs
elsewhere brings its own (``engine.EngineBackend``). ``backend_for`` picks one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..provider.base_provider import BaseProvider
from ..strategy.sampling import Sampling
from .generation import Generation

if TYPE_CHECKING:
    from .scheduler import BatchJob


# --- what a backend proposes ---------------------------------------------------------------------
class Proposal:
    """What a backend offers one generation for its next position."""

    def distribution(self, generation: Generation) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """``generation.distribution`` at this position: ``(token ids, weights, dense probs or None)``."""
        raise NotImplementedError

    def take(self, generation: Generation) -> List[int]:
        """Put the next token in ``generation`` (drawn, or a draft accepted) and return the
        tokens that became final."""
        raise NotImplementedError


class Logits(Proposal):
    """The next-token logits after ``generation.sequence`` (vocabulary-sized, float32, the
    strategy's to edit); ``sampling``: the filters to apply when not the generation's own."""

    __slots__ = ("logits", "sampling")

    def __init__(self, logits: np.ndarray, sampling: Optional[Sampling] = None):
        self.logits, self.sampling = logits, sampling

    def distribution(self, generation: Generation):
        return generation.distribution(self.logits, self.sampling)

    def take(self, generation: Generation) -> List[int]:
        return generation.advance(self.logits, self.sampling)


class Failure(Proposal):
    """The backend could not serve the generation: feeding it raises ``error``, which ends the job."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error

    def distribution(self, generation: Generation):
        raise self.error

    def take(self, generation: Generation) -> List[int]:
        raise self.error


# --- backends ------------------------------------------------------------------------------------
class Backend:
    """Where a generation's next position comes from. ``propose`` does the work; ``admit`` and
    ``release`` bracket a job's life on the backend, ``notify`` wakes a ``propose`` that waits
    (a new job, a cancellation), ``close`` ends everything. ``max_sequences``: jobs it can run at
    once; ``calls``: backend calls made (model evaluations, for a local provider)."""

    provider: BaseProvider
    calls = 0

    @property
    def max_sequences(self) -> int:
        return self.provider.max_sequences

    def admit(self, job: BatchJob) -> None:
        pass

    def propose(self, jobs: Sequence[BatchJob]) -> Dict[BatchJob, Proposal]:
        raise NotImplementedError

    def known(self, jobs: Sequence[BatchJob]) -> Dict[BatchJob, Proposal]:
        """Proposals for those of ``jobs`` (they just rewound) that need no model work, e.g. the
        logits a short rewind goes back to: the scheduler feeds them in the same step, so a
        rewound generation draws its next token at once and is read with the others in the next
        backend call instead of sitting one out. Default: none."""
        return {}

    def release(self, job: BatchJob) -> None:
        pass

    def notify(self) -> None:
        pass

    def close(self) -> None:
        pass


def cached_prompt(generation: Generation, held: int) -> int:
    """Record in ``generation.stats.cached_tokens`` how many prompt tokens a cache that holds
    ``held`` tokens of its sequence spares (all but the last, whose logits start the generation)."""
    generation.stats.cached_tokens = min(held, len(generation.prompt) - 1)
    return generation.stats.cached_tokens


class LocalBackend(Backend):
    """``provider.next_logits``: one generation at a time, in the provider's own cache, which
    keeps what the last generation left that the next one's prompt starts with (the prompt
    cache, ``BaseProvider.claim``)."""

    max_sequences = 1

    def __init__(self, provider: BaseProvider):
        self.provider = provider

    def admit(self, job: BatchJob) -> None:
        cached_prompt(job.generation, self.provider.claim(job.generation.sequence))

    def propose(self, jobs: Sequence[BatchJob]) -> Dict[BatchJob, Proposal]:
        answers: Dict[BatchJob, Proposal] = {}
        for job in jobs:
            try:
                answers[job] = Logits(self.provider.next_logits(job.generation.sequence))
            except Exception as error:  # the backend failed: this job ends with the error
                answers[job] = Failure(error)
            self.calls += 1
        return answers


class BatchBackend(Backend):
    """``provider.next_logits_batch``: the logits of every running generation in one backend call
    per step, each in a sequence of its own (released when it ends: its slot keeps the cache
    for a later prompt that starts the same, ``BaseProvider.claim``, so only the prompt's new
    tokens are read). A generation that is decoding takes one token of the step; prompts waiting to be read share the rest of
    ``step_tokens`` (at least a quarter of it), in arrival order, so a long prompt is read in
    chunks without stalling the generations already decoding."""

    def __init__(self, provider: BaseProvider, step_tokens: int = 256):
        if not isinstance(step_tokens, int) or step_tokens < 4:
            raise ValueError(f"step_tokens must be an integer >= 4, got {step_tokens!r}")
        self.provider, self.step_tokens = provider, step_tokens
        self._fed: Dict[BatchJob, int] = {}  # tokens of each job's sequence the provider holds

    def admit(self, job: BatchJob) -> None:
        self._fed[job] = cached_prompt(job.generation, self.provider.claim(job.generation.sequence, key=job))

    def propose(self, jobs: Sequence[BatchJob]) -> Dict[BatchJob, Proposal]:
        fed = self._fed
        decoding: List[BatchJob] = []
        reading: List[BatchJob] = []
        for job in jobs:
            generation = job.generation
            (decoding if len(generation.prompt) + len(generation.tokens) - fed[job] <= 1 else reading).append(job)
        requests: Dict[BatchJob, List[int]] = {job: job.generation.sequence for job in decoding}
        room = max(self.step_tokens - len(decoding), self.step_tokens // 4)
        for job in reading:  # prompts, in arrival order, within the room left
            sequence = job.generation.sequence
            take = min(len(sequence) - fed[job], room)
            if take <= 0:
                break
            room -= take
            requests[job] = sequence if fed[job] + take == len(sequence) else sequence[: fed[job] + take]
        if not requests:
            return {}
        try:
            logits = self.provider.next_logits_batch(requests)  # type: ignore[arg-type]  # dict is invariant in its key
        except Exception as error:  # the backend failed: every job of this step ends with the error
            return {job: Failure(error) for job in requests}
        self.calls += 1
        answers: Dict[BatchJob, Proposal] = {}
        for job, sequence in requests.items():
            fed[job] = len(sequence)
            if len(sequence) == len(job.generation.prompt) + len(job.generation.tokens):
                answers[job] = Logits(logits[job])  # (a chunk of a prompt: its logits are not needed)
        return answers

    def known(self, jobs: Sequence[BatchJob]) -> Dict[BatchJob, Proposal]:
        answers: Dict[BatchJob, Proposal] = {}
        for job in jobs:
            sequence = job.generation.sequence
            logits = self.provider.known_logits(sequence, key=job)
            if logits is not None:
                self._fed[job] = len(sequence)
                answers[job] = Logits(logits)
        return answers

    def release(self, job: BatchJob) -> None:
        self._fed.pop(job, None)
        self.provider.release(job)


def backend_for(provider: BaseProvider, batched: bool = False, step_tokens: int = 256) -> Backend:
    """The backend a ``Scheduler`` steps generations on with ``provider``: ``LocalBackend``
    (``next_logits``, one generation at a time, the driver of ``BacktrackSampler``) or, ``batched``,
    ``BatchBackend`` (``next_logits_batch``, up to ``max_sequences`` at once, prompts read
    ``step_tokens`` at a time). A provider whose model runs elsewhere brings its own
    (``provider.backend(batched, step_tokens)``: ``engine.EngineProvider`` gives ``engine.EngineBackend``)."""
    own = getattr(provider, "backend", None)
    if own is not None:
        return own(batched=batched, step_tokens=step_tokens)
    return BatchBackend(provider, step_tokens) if batched else LocalBackend(provider)
