"""A tiny deterministic provider for tests: a word-piece vocabulary and pseudo-random logits that
depend only on the token sequence. It needs numpy alone."""

from __future__ import annotations

import zlib
from typing import Callable, List, Optional, Sequence

import numpy as np

from .base_provider import BaseProvider, without_double_bos

DEFAULT_VOCAB = ["<pad>", "<eos>", "<bos>"] + [
    " the", " a", " cat", " dog", " sat", " on", " mat", " rug", " and", " ran", " away", " quickly",
    " tapestry", " of", " light", " it", " was", " not", " but", " bright", " dark", " night", ".", ",",
    " ", "\n",
] + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"!?-:;")


class FakeProvider(BaseProvider):
    """Deterministic stand-in for a model. ``logits_fn(tokens) -> logits`` overrides the default
    pseudo-random logits (which depend on the whole sequence, so cache bugs show up).
    ``forward_calls`` and ``evaluated`` count the calls and the tokens evaluated."""

    def __init__(
        self,
        vocab: Optional[Sequence[str]] = None,
        seed: int = 0,
        context_length: int = 4096,
        logits_fn: Optional[Callable[[List[int]], np.ndarray]] = None,
        scale: float = 3.0,
    ):
        super().__init__()
        self.vocab = list(vocab or DEFAULT_VOCAB)
        self.ids = {piece: i for i, piece in enumerate(self.vocab)}
        self.seed, self.scale, self.logits_fn = seed, scale, logits_fn
        self._context = context_length
        self._sequence: List[int] = []
        self.forward_calls = self.evaluated = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        tokens, i = [self.ids["<bos>"]] if add_special_tokens else [], 0
        longest = max(map(len, self.vocab))
        while i < len(text):
            for size in range(min(longest, len(text) - i), 0, -1):  # greedy longest match
                if text[i : i + size] in self.ids:
                    tokens.append(self.ids[text[i : i + size]])
                    i += size
                    break
            else:
                raise ValueError(f"FakeProvider cannot encode {text[i]!r}")
        return without_double_bos(tokens, self.ids["<bos>"]) if add_special_tokens else tokens

    def decode(self, tokens: Sequence[int]) -> str:
        return "".join(self.vocab[t] for t in tokens if not self.vocab[t].startswith("<"))

    def get_eos_token_id(self) -> int:
        return self.ids["<eos>"]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def context_length(self) -> int:
        return self._context

    def logits_for(self, tokens: Sequence[int]) -> np.ndarray:
        """The logits after ``tokens``, computed from scratch (the reference for cache tests)."""
        if self.logits_fn is not None:
            return np.asarray(self.logits_fn(list(tokens)), dtype=np.float32)
        key = zlib.crc32(np.asarray([self.seed, *tokens], dtype=np.int64).tobytes())
        return (np.random.default_rng(key).standard_normal(len(self.vocab)) * self.scale).astype(np.float32)

    def _forward(self, tokens: List[int]) -> np.ndarray:
        self.forward_calls += 1
        self.evaluated += len(tokens)
        self._sequence.extend(tokens)
        return self.logits_for(self._sequence)

    def _truncate(self, length: int) -> int:
        del self._sequence[length:]
        return length
