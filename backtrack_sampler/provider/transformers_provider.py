"""Hugging Face transformers backend: a direct forward loop over a KV cache that can be rewound."""

from __future__ import annotations

import inspect
from typing import List, Tuple

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .base_provider import check_device
from .hf_tokenizer import HFTokenizerProvider, end_ids


class TransformersProvider(HFTokenizerProvider):
    """Runs ``model`` one step at a time (no ``generate()``), computing only the last position's
    logits (``logits_to_keep=1``).

    The cache is a ``DynamicCache`` without a config, so every layer keeps its full history, the
    sliding-window layers of models like Gemma 3 included: the attention mask still applies the
    window, and a rewind of any length is exact.

    ``slots`` > 1 lets ``next_logits_batch`` hold that many sequences, each with a cache of its own;
    they are evaluated one after the other (not padded into one forward pass), so a batch costs
    what its sequences cost alone and gives exactly their numbers.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device=None, *, slots: int = 1):
        super().__init__()
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
        self._slots = slots
        self._caches = [DynamicCache() for _ in range(slots)] if slots > 1 else []
        try:
            self.device = torch.device(check_device(device if device is not None else model.device))
        except RuntimeError as error:  # a name torch does not know
            raise ValueError(f"unknown device {device!r}: {error}") from None
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]  # transformers types .to as a decorator
        self.tokenizer = tokenizer
        self.cache = DynamicCache()
        forward = inspect.signature(model.forward).parameters  # transformers >= 5.2x names it `cache`
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        config = model.config.get_text_config()
        self._vocab_size = int(config.vocab_size)
        self._context_length = int(getattr(config, "max_position_embeddings", 0) or 2**31 - 1)
        eos = getattr(model.generation_config, "eos_token_id", None)
        self._eos = end_ids(tokenizer, [eos] if isinstance(eos, int) else list(eos or []))

    def _forward(self, tokens: List[int]) -> np.ndarray:
        return self._run(tokens, self.cache)

    @torch.inference_mode()
    def _run(self, tokens: List[int], cache: DynamicCache) -> np.ndarray:
        input_ids = torch.tensor([tokens], device=self.device)
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        return out.logits[0, -1].float().cpu().numpy()

    def _truncate(self, length: int) -> int:
        self.cache = self._crop(self.cache, length)
        return length

    @staticmethod
    def _crop(cache: DynamicCache, length: int) -> DynamicCache:
        if length == 0:
            return DynamicCache()
        if cache.get_seq_length() > length:
            cache.crop(length - cache.get_seq_length())
        return cache

    # --- several sequences: one cache each, evaluated in turn ------------------------------------
    @property
    def max_sequences(self) -> int:
        return self._slots

    def _forward_batch(self, work: List[Tuple[int, List[int]]]) -> List[np.ndarray]:
        if self._slots == 1:
            return super()._forward_batch(work)
        return [self._run(tokens, self._caches[slot]) for slot, tokens in work]

    def _shares_single_cache(self) -> bool:
        return self._slots == 1  # one sequence: the cache of generate()

    def _truncate_slot(self, slot: int, length: int) -> int:
        if self._slots == 1:
            return self._truncate(length)
        self._caches[slot] = self._crop(self._caches[slot], length)
        return length
