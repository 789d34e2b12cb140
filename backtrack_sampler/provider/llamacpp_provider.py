"""llama.cpp backend (llama-cpp-python): evaluates with ``Llama.eval`` and reads only the last
position's logits straight from llama.cpp, with no n_ctx x vocab buffers."""

from __future__ import annotations

import warnings
from typing import FrozenSet, List, Optional, Sequence

import llama_cpp
import numpy as np
from llama_cpp import BaseLlamaCache, Llama

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
    """

    def __init__(self, llm: Llama, cache: Optional[BaseLlamaCache] = None, device=None):
        super().__init__()
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

    def generate(self, input_ids: Sequence[int]) -> np.ndarray:
        n = self.llm.n_tokens
        if n != len(self._cached) or self.llm.input_ids[:n].tolist() != self._cached:  # the Llama was used directly
            self._cached = self.llm.input_ids[:n].tolist()
            self._recent.clear()
        return super().generate(input_ids)

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
