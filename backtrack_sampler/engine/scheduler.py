"""``EngineScheduler``: the server's ``BatchScheduler`` for a model served by an engine. The engine
batches the sequences itself, so every running generation is driven by the engine loop in a
thread of its own; admission, the queue, cancellation and the callbacks are BatchScheduler's."""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, Tuple

from ..batch import BatchJob, BatchScheduler


class EngineScheduler(BatchScheduler):
    """Runs up to ``parallel`` generations at once (default: ``provider.max_sequences``), each in
    its own thread driven by ``provider.drive``; ``step()`` admits queued jobs, starts their
    threads and waits briefly (the server's background thread calls it while work is pending).
    ``on_tokens`` and ``on_finish`` are called from the job's thread."""

    def __init__(self, provider, parallel: Optional[int] = None):
        super().__init__(provider, parallel)
        self._threads: Dict[BatchJob, threading.Thread] = {}
        self._changed = threading.Event()

    def step(self) -> List[Tuple[BatchJob, List[int]]]:
        self._admit()
        with self._lock:
            starting = [job for job in self._running if job not in self._threads and job.state != "done"]
            for job in starting:
                self._threads[job] = threading.Thread(target=self._drive, args=(job,), daemon=True,
                                                      name=f"backtrack-sampler-engine-job-{job.id}")
        for job in starting:
            self._threads[job].start()
        self._changed.wait(0.05)
        self._changed.clear()
        return []

    def _drive(self, job: BatchJob) -> None:
        tokens = self.provider.drive(job.generation)
        try:
            for token in tokens:
                job.tokens.append(token)
                if job.on_tokens is not None:
                    job.on_tokens(job, [token])
                if job._cancelled:
                    break
        except Exception as error:  # the engine or the strategy failed: only this job ends
            job.error = error
        finally:
            tokens.close()  # closes the engine's stream when the job stopped early
            with self._lock:
                self._threads.pop(job, None)
            self._finish(job)
            self._changed.set()
