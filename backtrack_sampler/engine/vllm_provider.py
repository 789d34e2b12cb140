"""``VllmProvider``: vLLM in this process, its engine stepped by the one driver.

Generations run on vLLM's engine core (``LLMEngine.engine_core``, vLLM's own batching, paged KV
cache and prefix cache; one GPU, tensor / pipeline parallel or a Ray cluster, as its engine
arguments say), with the same speculative acceptance as the HTTP engines (``loop``,
``acceptance``): the engine drafts a token per sequence and step with its top-K log-probabilities
(``logprobs_mode="processed_logprobs"``: the distribution it sampled from), the strategy's
distribution p' is enforced exactly on those candidates (keep the draft x with probability
min(1, p'(x)/q(x)), else draw from the residual), so the output is distributed as the strategy
asks whenever the engine's sampling keeps at most K tokens (top_k <= K); with top-k off, tokens
outside the K best are reachable only as the engine's own drafts (``loop``'s docstring).

A rewind is an abort and a re-add of the kept tokens: no network, no new process; the prefix
cache serves every full block (``block_size`` tokens), so the re-added request's prefill is the
partial block plus the new token, and it rides in the next step beside the other sequences'
decodes, which keep running. ``VllmEngine.steps`` counts engine steps (``bench/engine_bench.py``
reports steps per token and per rewind).

Stepping: in the default mode (``multiprocess=False``) each ``propose`` that needs tokens runs
exactly one engine step in this thread, so the strategies' time adds to the step's. With
``multiprocess=True`` the engine core runs in a process of its own and keeps stepping while the
strategies work (on a GPU, the strategies' Python time then overlaps the next step); a rewind
then costs the steps already in flight (one or two).

    from backtrack_sampler import AntiSlopStrategy, BacktrackSampler
    from backtrack_sampler.engine.vllm_provider import VllmProvider

    provider = VllmProvider("path/to/hf-model", tensor_parallel_size=2)  # any vLLM engine argument
    sampler = BacktrackSampler(provider, AntiSlopStrategy(provider, ["a tapestry of"]))
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, cast

import numpy as np

from ..core.backends import Proposal
from ..core.generation import Generation
from ..core.scheduler import BatchJob
from ..provider.base_provider import BaseProvider
from ..strategy.sampling import Sampling
from .apis import Finish, step_from_arrays
from .client import EngineStats
from .errors import EngineError
from .loop import EngineBackend, Stream
from .provider import EngineProvider

# what the acceptance needs from the engine; a user's engine argument cannot change these
REQUIRED = {"logprobs_mode": "processed_logprobs"}
DEFAULTS = {"max_logprobs": 64, "generation_config": "vllm", "enable_prefix_caching": True}


class _Name:
    name = "vLLM (in process)"


class VllmEngine:
    """One vLLM engine, shared by every backend of a provider: requests in (``add``), one engine
    step out (``step``), each output routed to its request. Thread-safe."""

    api = _Name()

    def __init__(self, engine: Any):
        self.engine, self.core = engine, engine.engine_core
        self.stats = EngineStats()
        self.steps = 0  # engine steps run
        self.step_seconds = 0.0  # time spent in them (the rest of a generation's time is this library's)
        self.error: Optional[BaseException] = None  # what killed the engine, once it died
        self._requests: Dict[str, _Request] = {}
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._tasks = engine.get_supported_tasks()

    def add(self, tokens: List[int], n: int, sampling: Sampling, k: int, seed: Optional[int], expected) -> _Request:
        """Start a request for ``n`` tokens after ``tokens``, drafted with the top ``k`` log-probabilities."""
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=n,
            temperature=sampling.temperature,
            top_k=sampling.top_k or 0,
            top_p=1.0 if sampling.top_p is None else sampling.top_p,
            min_p=sampling.min_p or 0.0,
            seed=seed,
            logprobs=k or None,
            detokenize=False,
            skip_special_tokens=False,
        )
        request = _Request(self, expected, "post" if sampling.temperature > 0 else "raw", len(tokens))
        with self._lock:
            if self.error is not None:
                raise EngineError(f"the vLLM engine is down: {self.error}")
            prompt = self.engine.renderer.render_cmpl([{"prompt_token_ids": list(tokens)}])[0]
            core_request = self.engine.input_processor.process_inputs(
                f"bs-{next(self._ids)}", prompt, params, supported_tasks=self._tasks
            )
            self.engine.input_processor.assign_request_id(core_request)
            request.id = core_request.request_id
            self.core.add_request(core_request)
            self._requests[request.id] = request
        self.stats.requests += 1
        self.stats.prompt_tokens += len(tokens)
        return request

    def abort(self, request: _Request) -> None:
        with self._lock:
            if self._requests.pop(request.id, None) is not None and self.error is None:
                self.core.abort_requests([request.id])

    def step(self) -> None:
        """One engine step (in multiprocess mode: the next outputs of the running engine), its
        tokens routed to their requests. Does nothing when no request is running."""
        with self._lock:
            if not self._requests or self.error is not None:
                return
            started = time.perf_counter()
            try:
                outputs = self.core.get_output().outputs
            except Exception as error:  # the engine died (EngineDeadError) or a step failed
                self.error = error
                for failed in self._requests.values():
                    failed.events.append(EngineError(f"the vLLM engine failed: {error!r}"))
                self._requests.clear()
                return
            self.steps += 1
            self.step_seconds += time.perf_counter() - started
            for output in outputs:
                running = self._requests.get(output.request_id)
                if running is not None:  # else aborted while the step ran (multiprocess mode)
                    running.take(output)
                    if output.finish_reason is not None:
                        del self._requests[output.request_id]

    @property
    def running(self) -> int:
        return len(self._requests)

    def health(self) -> Optional[str]:
        """None while the engine works, else why it does not."""
        if self.error is not None:
            return f"the vLLM engine failed: {self.error!r}"
        if getattr(getattr(self.core, "resources", None), "engine_dead", False):
            return "the vLLM engine process died"
        return None

    def close(self) -> None:
        with self._lock:
            self._requests.clear()
            self.core.shutdown()


class _Request(Stream):
    """A request on the engine: its drafted tokens arrive as ``Step`` events, then a ``Finish``."""

    def __init__(self, engine: VllmEngine, tokens: Sequence[int], kind: str, prompt_tokens: int):
        super().__init__(tokens)
        self.engine, self.kind, self.id = engine, kind, ""
        self.sent = time.monotonic()
        self.first = True

    def take(self, output) -> None:
        stats = self.engine.stats
        cached = None
        if output.prefill_stats is not None:
            cached = output.prefill_stats.num_cached_tokens
            stats.cached_tokens += cached
            stats.cache_reports += 1
        rows = output.new_logprobs
        for i, token in enumerate(output.new_token_ids):
            if rows is None:
                step = step_from_arrays(token, np.empty(0, np.int64), np.empty(0), self.kind)
            else:
                step = step_from_arrays(token, rows.logprob_token_ids[i], rows.logprobs[i], self.kind)
            if self.first:
                step.cached, self.first = cached, False
                stats.first_tokens += 1
                stats.first_token_seconds += time.monotonic() - self.sent
            self.events.append(step)
        stats.steps += len(output.new_token_ids)
        if output.finish_reason is not None:
            reason = int(output.finish_reason)
            if reason > 1:  # abort, error: not asked for by us
                self.events.append(EngineError(f"vLLM ended the request: {output.finish_reason!r}"))
            else:
                self.events.append(Finish("length" if reason == 1 else "stop", cached))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.engine.abort(self)


class VllmBackend(EngineBackend):
    """``EngineBackend`` on an in-process engine: ``propose`` collects the drafts that are there and,
    for the jobs still waiting, runs one engine step (all of the engine's sequences advance)."""

    def __init__(self, provider: VllmProvider, n_probs: Optional[int], chunk: Optional[int]):
        engine = provider.engine
        super().__init__(provider, cast(Any, engine), provider.vocab_size, n_probs, chunk, provider.model)
        self.engine, self.max_logprobs = engine, provider.max_logprobs
        self._max_sequences = provider.max_sequences

    def k_for(self, sampling: Sampling) -> int:
        return min(super().k_for(sampling), self.max_logprobs)

    def request(self, generation: Generation, n: int, seed: Optional[int], slot: int) -> Stream:
        user = generation.sampling
        return self.engine.add(generation.sequence, n, user, self.k_for(user), seed, generation.tokens)

    def propose(self, jobs: Sequence[BatchJob]) -> Dict[BatchJob, Proposal]:
        proposals = self._collect(jobs)
        waiting = [job for job in jobs if job not in proposals]
        if waiting:
            self.engine.step()
            proposals.update(self._collect(waiting))
        return proposals


class VllmProvider(EngineProvider):
    """A model run by vLLM in this process (``VllmEngine``); generations run on its backend.

    model: a Hugging Face model folder or name vLLM can load (nothing is downloaded when
        ``HF_HUB_OFFLINE=1``), or an engine already made: a ``vllm.LLM`` or a ``vllm.LLMEngine``
        (made with ``logprobs_mode="processed_logprobs"`` and ``max_logprobs`` >= K).
    tokenizer: the tokenizer strategies and chat templates use (default: the model's).
    n_probs: K, the candidates drafted at every position (default: top_k, at least 20, or 64
        without top-k; at most ``max_logprobs``).
    chunk: most tokens per request (default: all that are left).
    multiprocess: run the engine core in a process of its own, stepping while the strategies work
        (default False: one engine step per scheduler step, in this thread).
    engine_args: vLLM's engine arguments (``vllm.EngineArgs``): ``tensor_parallel_size``,
        ``pipeline_parallel_size``, ``data_parallel_size``, ``distributed_executor_backend``
        ("ray" for a cluster), ``gpu_memory_utilization``, ``max_model_len``, ``block_size``,
        ``dtype``, ``enforce_eager``, ``max_num_seqs``, ... Defaults here: ``max_logprobs=64``,
        ``generation_config="vllm"`` (the model's generation_config.json sets no sampling
        defaults), ``enable_prefix_caching=True``; ``logprobs_mode`` is always
        "processed_logprobs".
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        n_probs: Optional[int] = None,
        chunk: Optional[int] = None,
        multiprocess: bool = False,
        **engine_args: Any,
    ):
        BaseProvider.__init__(self)
        engine = _engine(model, multiprocess, engine_args)
        config = engine.vllm_config
        if str(config.model_config.logprobs_mode) != REQUIRED["logprobs_mode"]:
            raise ValueError(
                "the vLLM engine must be made with logprobs_mode='processed_logprobs' (the drafts' "
                "distribution), got " + str(config.model_config.logprobs_mode)
            )
        self.engine_type = "vllm"
        self.engine = VllmEngine(engine)
        self.client = cast(Any, self.engine)  # what EngineProvider's methods read: its stats
        self._tok = self._tokenizer(tokenizer if tokenizer is not None else config.model_config.tokenizer)
        self.llm = None
        self.tokenizer = getattr(self._tok, "tok", None)
        self.model = config.model_config.served_model_name or config.model_config.model
        self._context = config.model_config.max_model_len
        self._n_vocab = max(self._tok.size, config.model_config.get_vocab_size())
        self._n_probs, self._chunk = n_probs, chunk
        self.max_logprobs = config.model_config.max_logprobs
        if self.max_logprobs < 0:  # -1: the whole vocabulary
            self.max_logprobs = self._n_vocab
        self._max_sequences = config.scheduler_config.max_num_seqs

    def backend(self, batched: bool = False, step_tokens: int = 256) -> VllmBackend:
        """The engine's backend for the scheduler (one for a generation or many: vLLM batches them)."""
        return VllmBackend(self, self._n_probs, self._chunk)

    @property
    def max_sequences(self) -> int:
        """Generations run at once: vLLM's ``max_num_seqs``."""
        return self._max_sequences

    def health(self) -> Optional[str]:
        """None while the engine works, else why it does not (``/health`` reports it)."""
        return self.engine.health()

    def close(self) -> None:
        """Shut the engine down (its workers and memory)."""
        self.engine.close()


def _engine(model: Any, multiprocess: bool, engine_args: Dict[str, Any]):
    """The ``LLMEngine`` of ``model`` (made from engine arguments when it is a name or a folder)."""
    if hasattr(model, "llm_engine"):  # a vllm.LLM
        return model.llm_engine
    if hasattr(model, "engine_core"):  # a vllm LLMEngine
        return model
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.executor import Executor

    for key, value in REQUIRED.items():
        if engine_args.get(key, value) != value:
            raise ValueError(f"the engine argument {key} must be {value!r} (the drafts' distribution)")
    args = EngineArgs(model=str(model), **{**DEFAULTS, **engine_args, **REQUIRED})
    config = args.create_engine_config()
    return LLMEngine(
        vllm_config=config,
        executor_class=Executor.get_class(config),
        log_stats=False,
        multiprocess_mode=multiprocess,
    )


def load_vllm_provider(model: Optional[str], n_ctx: Optional[int] = None, options: Sequence[str] = ()) -> VllmProvider:
    """``VllmProvider`` for the command line and the server: ``options`` are ``KEY=VALUE`` engine
    arguments (values read as JSON when they parse: ``tensor_parallel_size=2``, ``enforce_eager=true``);
    ``n_ctx``: ``max_model_len``. Anything the user can fix raises UsageError."""
    import json
    import os
    from pathlib import Path

    from ..errors import UsageError

    if not model or not Path(model).is_dir():
        raise UsageError(
            f"--backend vllm needs --model, a Hugging Face model folder (got {model!r}); "
            "scripts/build_vllm.sh converts the embedded chat model into one"
        )
    args: Dict[str, Any] = {}
    for option in options:
        key, sep, text = option.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--vllm-arg takes KEY=VALUE, got {option!r}")
        try:
            args[key.strip().replace("-", "_")] = json.loads(text)
        except ValueError:
            args[key.strip().replace("-", "_")] = text
    if n_ctx is not None:
        args["max_model_len"] = n_ctx
    # vLLM logs to stdout, which is the command's output: to stderr, warnings and errors only
    # (unless the user's environment says otherwise); set before vLLM is imported
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    multiprocess = bool(args.pop("multiprocess", False))
    try:
        return VllmProvider(model, multiprocess=multiprocess, **args)
    except ImportError as error:
        raise UsageError(f"--backend vllm needs vLLM installed in this environment ({error})") from None
    except (TypeError, ValueError) as error:  # an unknown or invalid engine argument
        raise UsageError(f"vLLM refused its engine arguments: {error}") from None
