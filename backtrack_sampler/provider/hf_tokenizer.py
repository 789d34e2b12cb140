"""What the providers whose text is a Hugging Face tokenizer share (transformers, MLX): encoding,
decoding, the end-of-generation ids, the vocabulary and context sizes."""

from __future__ import annotations

from typing import Any, FrozenSet, Iterable, List, Sequence

from .base_provider import BaseProvider, without_double_bos

END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")  # chat models' end markers


def end_ids(tokenizer: Any, eos: Iterable[Any] = ()) -> FrozenSet[int]:
    """``eos`` (the model's configured ids), the tokenizer's EOS and the chat end markers it knows."""
    vocab = tokenizer.get_vocab()
    ends = [vocab[t] for t in END_OF_TURN if t in vocab]
    return frozenset([*eos, *ends, tokenizer.eos_token_id]) - {None}


class HFTokenizerProvider(BaseProvider):
    """A provider whose ``tokenizer`` is a Hugging Face tokenizer; a subclass sets ``_eos``
    (``end_ids``), ``_vocab_size`` and ``_context_length``."""

    tokenizer: Any
    _eos: FrozenSet[int]
    _vocab_size: int
    _context_length: int

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        tokens = list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        return without_double_bos(tokens, self.tokenizer.bos_token_id) if add_special_tokens else tokens

    def decode(self, tokens: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=True))

    def get_eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def eos_token_ids(self) -> FrozenSet[int]:
        return self._eos

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def context_length(self) -> int:
        return self._context_length
