"""MLX backend (``mlx-lm``): Apple silicon's native runtime, also built for Linux CPUs (``mlx[cpu]``).
It steps the model itself over mlx-lm's own KV caches, truncating them on a rewind."""

from __future__ import annotations

import atexit
import weakref
from typing import Any, List, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from .hf_tokenizer import HFTokenizerProvider, end_ids

PREFILL_STEP = 2048  # tokens per prefill chunk (mlx-lm's prefill_step_size)
_LIVE: weakref.WeakSet[MlxProvider] = weakref.WeakSet()


@atexit.register
def _hold_at_exit() -> None:
    """Let a step under way finish and start no other: MLX aborts the process ("terminate called
    without an active exception") when it exits while another thread (a server's) is evaluating."""
    for provider in list(_LIVE):
        provider._lock.acquire(timeout=60)


class MlxProvider(HFTokenizerProvider):
    """Wraps what ``mlx_lm.load(path)`` returns (``models.load_mlx`` loads a folder, or converts a GGUF): ``model`` (an ``mlx.nn.Module``) and ``tokenizer``
    (mlx-lm's ``TokenizerWrapper``). A step is the model called on the new tokens over the
    sequence's cache, as ``mlx_lm.generate_step`` does: all but the last token prefilled in chunks
    of ``PREFILL_STEP`` (only the cache is evaluated), the last alone for its logits; so the logits
    are the ones ``mlx_lm.stream_generate`` samples from.

    The cache is ``mlx_lm.models.cache.make_prompt_cache(model)``: the model's own caches. A rewind
    trims them when every layer can trim exactly: ``KVCache`` (most models), ``QuantizedKVCache``,
    ``ChunkedKVCache`` within its chunk, and a ``RotatingKVCache`` (sliding-window layers, e.g.
    Gemma 3) until it has wrapped, i.e. while the sequence is shorter than the window; the trimmed
    positions are overwritten by the next step, so the logits are exactly those of a run without the
    rewind. Where a layer cannot trim (a wrapped window, a recurrent ``ArraysCache``) the cache is
    rebuilt and the sequence prefilled again: the same logits up to floating-point rounding (a
    chunk is computed with other shapes than single steps).

    ``slots`` > 1 lets ``next_logits_batch`` hold that many sequences, each with a cache of its own,
    evaluated one after the other (as ``TransformersProvider``), not in one forward pass: mlx-lm's
    batch cache (``BatchKVCache``) trims every sequence by the same count (one shared index), so
    sequences that rewind by different depths cannot share it without copying every cache into it
    (``merge``) and back out (``extract``) at each step.
    """

    def __init__(self, model: Any, tokenizer: Any, *, slots: int = 1):
        """
        Args:
            model: the model ``mlx_lm.load`` returned.
            tokenizer: the ``TokenizerWrapper`` ``mlx_lm.load`` returned (or a Hugging Face tokenizer).
            slots: how many sequences ``next_logits_batch`` holds at once (one cache each).
        """
        super().__init__()
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
        self.model = model
        # the Hugging Face tokenizer mlx-lm wraps: chat templates and llguidance (grammars) read it
        self.tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)
        self.device = "cpu" if mx.default_device().type == mx.DeviceType.cpu else "metal"
        self._slots = slots
        _LIVE.add(self)
        self._caches = [make_prompt_cache(model) for _ in range(slots + 1)]  # [0]: next_logits's
        self._lengths = [0] * (slots + 1)
        args = getattr(model, "args", None)
        vocab = getattr(args, "vocab_size", None)
        self._vocab_size = int(vocab) if isinstance(vocab, int) else int(model(mx.array([[0]])).shape[-1])
        self._context_length = int(getattr(args, "max_position_embeddings", 0) or 2**31 - 1)
        self._eos = end_ids(tokenizer, getattr(tokenizer, "eos_token_ids", None) or ())

    # --- model -----------------------------------------------------------------------------
    def _forward(self, tokens: List[int]) -> np.ndarray:
        return self._run(0, tokens)

    def _truncate(self, length: int) -> int:
        return self._trim(0, length)

    def _run(self, slot: int, tokens: List[int]) -> np.ndarray:
        """Append ``tokens`` to the cache of ``slot``; the last position's logits (float32)."""
        cache = self._caches[slot]
        for start in range(0, len(tokens) - 1, PREFILL_STEP):  # the prefill: only the cache is evaluated
            self.model(mx.array([tokens[start : min(start + PREFILL_STEP, len(tokens) - 1)]]), cache=cache)
            mx.eval([c.state for c in cache])
        logits = self.model(mx.array([tokens[-1:]]), cache=cache)[0, -1].astype(mx.float32)
        self._lengths[slot] += len(tokens)
        return np.array(logits)

    def _trim(self, slot: int, length: int) -> int:
        """Keep the first ``length`` positions of the cache of ``slot``: trimmed in place where
        every layer trims exactly, else a new empty cache (0 positions kept)."""
        drop = self._lengths[slot] - length
        cache = self._caches[slot]
        if drop <= 0:
            return length
        if (
            length == 0
            or not all(c.is_trimmable() for c in cache)
            or [c.trim(drop) for c in cache] != [drop] * len(cache)
        ):
            self._caches[slot], length = make_prompt_cache(self.model), 0
        self._lengths[slot] = length
        return length

    # --- several sequences: one cache each, evaluated in turn ------------------------------------
    @property
    def max_sequences(self) -> int:
        return self._slots

    def _forward_batch(self, work: List[Tuple[int, List[int]]]) -> List[np.ndarray]:
        if self._slots == 1:
            return super()._forward_batch(work)
        return [self._run(slot + 1, tokens) for slot, tokens in work]

    def _shares_single_cache(self) -> bool:
        return self._slots == 1  # one sequence: the cache of next_logits

    def _truncate_slot(self, slot: int, length: int) -> int:
        return self._trim(0 if self._slots == 1 else slot + 1, length)
