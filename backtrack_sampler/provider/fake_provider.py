"""A tiny deterministic provider for tests: a word-piece vocabulary and pseudo-random logits that
depend only on the token sequence. It needs numpy alone."""

from __future__ import annotations

import zlib
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from .base_provider import BaseProvider, without_double_bos

DEFAULT_VOCAB = (
    ["<pad>", "<eos>", "<bos>"]
    + [
        " the",
        " a",
        " cat",
        " dog",
        " sat",
        " on",
        " mat",
        " rug",
        " and",
        " ran",
        " away",
        " quickly",
        " tapestry",
        " of",
        " light",
        " it",
        " was",
        " not",
        " but",
        " bright",
        " dark",
        " night",
        ".",
        ",",
        " ",
        "\n",
    ]
    + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"!?-:;")
)


class FakeProvider(BaseProvider):
    """Deterministic stand-in for a model. ``logits_fn(tokens) -> logits`` overrides the default
    pseudo-random logits (which depend on the whole sequence, so cache bugs show up).
    ``forward_calls`` and ``evaluated`` count the calls and the tokens evaluated (both paths);
    ``batch_calls`` counts ``next_logits_batch``'s backend calls. ``slots``: its ``max_sequences``."""

    def __init__(
        self,
        vocab: Optional[Sequence[str]] = None,
        seed: int = 0,
        context_length: int = 4096,
        logits_fn: Optional[Callable[[List[int]], np.ndarray]] = None,
        scale: float = 3.0,
        slots: int = 8,
    ):
        super().__init__()
        self.vocab = list(vocab or DEFAULT_VOCAB)
        self.ids = {piece: i for i, piece in enumerate(self.vocab)}
        self.seed, self.scale, self.logits_fn = seed, scale, logits_fn
        self._context = context_length
        self._sequence_tokens: List[int] = []
        self._slot_tokens: List[List[int]] = [[] for _ in range(slots)]
        self.forward_calls = self.evaluated = self.batch_calls = 0

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
        self._sequence_tokens.extend(tokens)
        return self.logits_for(self._sequence_tokens)

    def _truncate(self, length: int) -> int:
        del self._sequence_tokens[length:]
        return length

    @property
    def max_sequences(self) -> int:
        return len(self._slot_tokens)

    def _forward_batch(self, work: List[Tuple[int, List[int]]]) -> List[np.ndarray]:
        self.batch_calls += 1
        self.evaluated += sum(len(tokens) for _, tokens in work)
        results = []
        for slot, tokens in work:
            self._slot_tokens[slot].extend(tokens)
            results.append(self.logits_for(self._slot_tokens[slot]))
        return results

    def _truncate_slot(self, slot: int, length: int) -> int:
        del self._slot_tokens[slot][length:]
        return length
