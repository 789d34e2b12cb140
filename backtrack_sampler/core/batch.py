"""Continuous batching: many generations advance together, one backend call per step.

``BatchScheduler`` is the one driver (``driver.Scheduler``) on the provider's batch of sequences
(``scheduler.backend_for(provider, batched=True)``): every step it asks for the logits of every running
``generation.sequence`` in a single ``provider.next_logits_batch`` call, hands each its logits with
``generation.advance``, and delivers the tokens that became final. Each generation keeps its own
sequence in the provider's cache, so a rewind cuts only its own. Generations join and leave
between steps; the queue is first come, first served; a long prompt is fed in chunks so it does
not stall the generations already decoding::

    scheduler = BatchScheduler(provider)                  # provider with max_sequences > 1
    jobs = [scheduler.submit(prompt, AntiSlopStrategy(provider, slops), max_new_tokens=200, seed=i)
            for i, prompt in enumerate(prompts)]
    for job, tokens in scheduler.run():                   # (job, tokens that became final)
        ...
    texts = [job.text for job in jobs]

For a model served by an engine (``engine.EngineProvider``) the same scheduler runs the
generations through the engine's backend (the engine batches them itself).

It is not thread-safe except for ``submit``/``add`` and ``BatchJob.cancel``, which may be called
from other threads while one thread steps (this is how the server uses it).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

from ..provider.base_provider import BaseProvider
from ..strategy.base_strategy import BaseStrategy
from .sampler import BacktrackSampler
from .scheduler import BatchJob, JobCallback, Scheduler, TokensCallback, backend_for

__all__ = ["BatchJob", "BatchScheduler", "default_parallel"]


def default_parallel() -> int:
    """How many generations run at once by default: 4 per CPU core, at most 8 (batching pays off
    up to about that many sequences on a CPU)."""
    return max(1, min(8, 4 * (os.cpu_count() or 1)))


class BatchScheduler(Scheduler):
    """Runs up to ``parallel`` generations at once on ``provider`` (default and maximum: its
    ``max_sequences``); more wait in a first-come-first-served queue.

    step_tokens: the most tokens one step evaluates (decoding generations take one each; prompts
    waiting to be read share the rest, at least a quarter of it, in arrival order).
    """

    def __init__(self, provider: BaseProvider, parallel: Optional[int] = None, step_tokens: int = 256):
        if not isinstance(provider, BaseProvider):
            raise TypeError(f"BatchScheduler takes a provider, got {type(provider).__name__}")
        super().__init__(backend_for(provider, batched=True, step_tokens=step_tokens), parallel)
        self.step_tokens = step_tokens
        self._sampler = BacktrackSampler(provider, BaseStrategy())  # builds checked generations

    @property
    def steps(self) -> int:
        """Backend calls made (``next_logits_batch`` calls, for a local provider)."""
        return self.backend.calls

    def submit(
        self,
        prompt: Union[str, Sequence[int]],
        strategy: Optional[BaseStrategy] = None,
        *,
        on_tokens: Optional[TokensCallback] = None,
        on_finish: Optional[JobCallback] = None,
        on_start: Optional[JobCallback] = None,
        on_step: Optional[JobCallback] = None,
        events: bool = False,
        **kwargs,
    ) -> BatchJob:
        """Queue a generation and return its job. ``strategy``: an instance of its own (default: none);
        ``kwargs``: ``BacktrackSampler.generate``'s (``max_new_tokens``, ``temperature``, ``top_k``,
        ``top_p``, ``min_p``, ``seed``, ``on_rewind``, ...), checked now (ValueError).
        What happens to it comes out of ``step()`` / ``run()`` as ``Update``s (with its typed events
        when ``events``); the callbacks are called from them (see ``Scheduler.add``)."""
        generation = self._sampler.start(prompt, strategy=strategy or BaseStrategy(), **kwargs)
        return self.add(generation, on_tokens, on_finish, on_start, on_step, events=events)
