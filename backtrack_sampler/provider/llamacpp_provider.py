"""llama.cpp backend (llama-cpp-python): evaluates with ``Llama.eval`` and reads only the last
position's logits straight from llama.cpp, with no n_ctx x vocab buffers."""

from __future__ import annotations

import ctypes
import warnings
from typing import FrozenSet, List, Optional, Sequence, Tuple

import llama_cpp
import numpy as np
from llama_cpp import BaseLlamaCache, Llama
from llama_cpp._internals import LlamaContext

from .base_provider import BaseProvider, check_device, without_double_bos

if not hasattr(llama_cpp, "llama_memory_seq_rm"):
    raise ImportError(f"LlamacppProvider needs llama-cpp-python >= 0.3.16, found {llama_cpp.__version__}")


class LlamacppProvider(BaseProvider):
    """Wraps a ``llama_cpp.Llama``. A rewind removes KV positions (``llama_memory_seq_rm``).

    On a sliding-window model (Gemma 3, ...) whose context was made with ``swa_full=False``,
    llama.cpp forgets keys that fall out of the window; a rewind past them would silently give
    wrong logits, so the provider detects it and re-evaluates the sequence from the start.
    ``swa_full=True`` (llama.cpp's default) keeps every rewind cheap.

    ``cache`` (a ``BaseLlamaCache``) is accepted for compatibility with backtrack_sampler 3.x and
    is not used: the provider keeps its own KV cache. ``device`` is informational: llama.cpp places
    layers by the ``n_gpu_layers`` the ``Llama`` was made with.

    ``slots`` > 1 makes ``next_logits_batch`` evaluate up to that many sequences in one
    ``llama_decode``: a second llama.cpp context on the same weights, with one KV stream of the
    ``Llama``'s full ``n_ctx`` per slot (``kv_unified=False``, so every sequence keeps its cells in
    position order and its rewinds stay exact). ``next_logits`` keeps using the ``Llama``'s own context.
    """

    def __init__(self, llm: Llama, cache: Optional[BaseLlamaCache] = None, device=None, *, slots: int = 1):
        super().__init__()
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
        self.device = check_device(device)
        self.llm = llm
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._n_vocab = llm.n_vocab()
        self._n_swa = llama_cpp.llama_model_n_swa(llm.model)
        self._swa_pruned = self._n_swa > 0 and not getattr(llm.context_params, "swa_full", True)
        if self._swa_pruned:
            warnings.warn(
                "this model uses a sliding window and its Llama was made with swa_full=False: a rewind "
                f"past {self._n_swa} tokens forces a full re-evaluation; pass swa_full=True to avoid it",
                stacklevel=2,
            )
        ids = {llama_cpp.llama_vocab_eos(self._vocab), llama_cpp.llama_vocab_eot(self._vocab)}
        self._eos = frozenset(i for i in ids if i >= 0)
        self._slots = slots
        if slots > 1:
            self._open_batch_context(slots)

    def _open_batch_context(self, slots: int) -> None:
        limit = llama_cpp.llama_max_parallel_sequences()
        if slots > limit:
            raise ValueError(f"llama.cpp runs {limit} sequences at most, asked for slots={slots}")
        params = llama_cpp.llama_context_params.from_buffer_copy(self.llm.context_params)
        params.n_seq_max, params.n_ctx, params.kv_unified = slots, self.llm.n_ctx() * slots, False
        self._batch_context = LlamaContext(model=self.llm._model, params=params, verbose=self.llm.verbose)
        ctx = self._batch_context.ctx
        if llama_cpp.llama_n_ctx_seq(ctx) < self.llm.n_ctx():
            raise RuntimeError(
                f"llama.cpp gave each sequence {llama_cpp.llama_n_ctx_seq(ctx)} positions, "
                f"fewer than n_ctx={self.llm.n_ctx()}"
            )
        self._n_batch = int(params.n_batch)
        self._lengths = [0] * slots  # positions cached per slot
        # the llama_batch's arrays are numpy buffers, filled with slices instead of per-token ctypes calls
        n = self._n_batch
        self._tok = np.zeros(n, dtype=np.int32)
        self._pos = np.zeros(n, dtype=np.int32)
        self._nseq = np.ones(n, dtype=np.int32)
        self._seq = np.zeros(n, dtype=np.int32)
        self._out = np.zeros(n, dtype=np.int8)
        item = ctypes.sizeof(ctypes.c_int32)
        self._seq_ptrs = (ctypes.POINTER(ctypes.c_int32) * n)(
            *(ctypes.cast(self._seq.ctypes.data + i * item, ctypes.POINTER(ctypes.c_int32)) for i in range(n))
        )
        self._llama_batch = llama_cpp.llama_batch(
            n_tokens=0,
            token=self._tok.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)),
            embd=None,
            pos=self._pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            n_seq_id=self._nseq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=ctypes.cast(self._seq_ptrs, ctypes.POINTER(ctypes.POINTER(llama_cpp.llama_seq_id))),
            logits=self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)
        return without_double_bos(tokens, self.llm.token_bos()) if add_special_tokens else tokens

    def decode(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def get_eos_token_id(self) -> int:
        return self.llm.token_eos()

    @property
    def eos_token_ids(self) -> FrozenSet[int]:
        return self._eos

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    @property
    def context_length(self) -> int:
        return self.llm.n_ctx()

    def _sync(self) -> None:
        n = self.llm.n_tokens
        if n != len(self._cached) or self.llm.input_ids[:n].tolist() != self._cached:  # the Llama was used directly
            self._cached[:] = self.llm.input_ids[:n].tolist()  # in place: slots=1 batches share this list
            self._recent.clear()

    def _forward(self, tokens: List[int]) -> np.ndarray:
        self.llm.eval(tokens)
        row = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self._n_vocab,)).copy()

    def _truncate(self, length: int) -> int:
        memory = llama_cpp.llama_get_memory(self.llm.ctx)
        # a pruned sliding window lacks the keys that position `length` attends to (check before removing)
        lost = self._swa_pruned and llama_cpp.llama_memory_seq_pos_min(memory, 0) > max(0, length - self._n_swa)
        if length == 0 or lost or not llama_cpp.llama_memory_seq_rm(memory, 0, length, -1):
            llama_cpp.llama_memory_clear(memory, True)
            length = 0
        self.llm.n_tokens = length
        return length

    # --- several sequences: one llama_decode for all --------------------------------------------
    @property
    def max_sequences(self) -> int:
        return self._slots

    def _forward_batch(self, work: List[Tuple[int, List[int]]]) -> List[np.ndarray]:
        if self._slots == 1:  # no batch context: the Llama's own (as generate)
            return super()._forward_batch(work)
        ctx, limit = self._batch_context.ctx, self._n_batch
        results: List[Optional[np.ndarray]] = [None] * len(work)
        rows: List[Tuple[int, int]] = []  # (work index, batch row) whose logits the next decode gives
        before = [self._lengths[slot] for slot, _ in work]
        n = 0
        try:
            # rows in sequence-id order: llama.cpp splits a batch whose sequences come out of order
            # into one decode per sequence (seen: 8 sequences 2.7x slower)
            for index in sorted(range(len(work)), key=lambda i: work[i][0]):
                slot, tokens = work[index]
                start, position = 0, self._lengths[slot]
                while start < len(tokens):
                    take = min(len(tokens) - start, limit - n)
                    self._tok[n : n + take] = tokens[start : start + take]
                    self._pos[n : n + take] = np.arange(position + start, position + start + take)
                    self._seq[n : n + take] = slot
                    self._out[n : n + take] = 0
                    n += take
                    start += take
                    if start == len(tokens):
                        self._out[n - 1] = 1
                        rows.append((index, n - 1))
                    if n == limit:
                        self._decode(ctx, n, rows, results)
                        n, rows = 0, []
                self._lengths[slot] = position + len(tokens)
            if n:
                self._decode(ctx, n, rows, results)
        except BaseException:
            memory = llama_cpp.llama_get_memory(ctx)
            for (slot, _), length in zip(work, before):  # leave every slot as it was
                llama_cpp.llama_memory_seq_rm(memory, slot, length, -1)
                self._lengths[slot] = length
            raise
        return results  # type: ignore[return-value]

    def _decode(self, ctx, n: int, rows: List[Tuple[int, int]], results: List[Optional[np.ndarray]]) -> None:
        self._llama_batch.n_tokens = n
        code = llama_cpp.llama_decode(ctx, self._llama_batch)
        if code != 0:
            raise RuntimeError(f"llama_decode failed with code {code} on a batch of {n} tokens")
        for index, row in rows:
            results[index] = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(ctx, row), shape=(self._n_vocab,)
            ).copy()

    def _shares_single_cache(self) -> bool:
        return self._slots == 1  # one sequence: the cache of generate()

    def _truncate_slot(self, slot: int, length: int) -> int:
        if self._slots == 1:
            return self._truncate(length)
        memory = llama_cpp.llama_get_memory(self._batch_context.ctx)
        lost = self._swa_pruned and llama_cpp.llama_memory_seq_pos_min(memory, slot) > max(0, length - self._n_swa)
        if length == 0 or lost or not llama_cpp.llama_memory_seq_rm(memory, slot, length, -1):
            llama_cpp.llama_memory_seq_rm(memory, slot, -1, -1)
            length = 0
        self._lengths[slot] = length
        if not any(self._lengths):  # nothing cached: start over from a fresh cache, as a new context would
            llama_cpp.llama_memory_clear(memory, True)
        return length
