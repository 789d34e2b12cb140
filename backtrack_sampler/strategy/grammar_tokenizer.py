"""A provider's vocabulary as llguidance sees it (an ``LLTokenizer``), built once per model: from the
llama.cpp vocabulary, a Hugging Face fast tokenizer, or each token's decoded text."""

from __future__ import annotations

import threading
import warnings
from typing import Any, Dict, List

from ..provider.base_provider import BaseProvider
from .grammar import llguidance_module

_TOKENIZERS: Dict[tuple, Any] = {}
_TOKENIZER_LOCK = threading.Lock()


def tokenizer_for(provider: BaseProvider):
    """An ``llguidance.LLTokenizer`` of ``provider``'s vocabulary (``vocab_size`` wide, with every
    one of its ``eos_token_ids``): from the llama.cpp vocabulary (``provider.llm``: a
    ``LlamacppProvider``, or an ``EngineProvider`` with a GGUF tokenizer), from a Hugging Face fast
    tokenizer (``provider.tokenizer``), else from each token's decoded text (any provider; a token
    whose text is empty counts as special). Cached by model: building one takes 0.3-7 s."""
    llg = llguidance_module()
    eos = sorted(provider.eos_token_ids)
    size = provider.vocab_size
    llm, hf = getattr(provider, "llm", None), getattr(provider, "tokenizer", None)
    if llm is not None and type(llm).__module__.startswith("llama_cpp"):
        key: tuple = ("llama.cpp", getattr(llm, "model_path", None) or id(llm))
    elif hf is not None and hasattr(hf, "backend_tokenizer"):
        key = ("hf", getattr(hf, "name_or_path", None) or id(hf), len(hf))
    else:
        llm = hf = None
        key = ("decoded", id(provider))
    key += (size, tuple(eos))
    with _TOKENIZER_LOCK:
        found = _TOKENIZERS.get(key)
        if found is not None and (key[0] != "decoded" or found[1] is provider):
            return found[0]
        if llm is not None:
            import llama_cpp
            from llguidance.llamacpp import lltokenizer_from_vocab

            with warnings.catch_warnings():  # it calls llama_token_get_attr (deprecated) once per token
                warnings.simplefilter("ignore", DeprecationWarning)
                tokenizer = lltokenizer_from_vocab(
                    llama_cpp.llama_model_get_vocab(llm.model), n_vocab=size, eos_token=eos
                )
        elif hf is not None:
            from llguidance.hf import from_tokenizer

            tokenizer = from_tokenizer(hf, n_vocab=max(size, len(hf)), eos_token=eos)
        else:
            tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(_DecodedVocabulary(provider)), n_vocab=size, eos_token=eos)
        if len(_TOKENIZERS) >= 8:
            _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
        _TOKENIZERS[key] = (tokenizer, provider if key[0] == "decoded" else None)
        return tokenizer


class _DecodedVocabulary:
    """What ``llguidance.TokenizerWrapper`` needs, from a provider's ``decode`` and ``encode``."""

    def __init__(self, provider: BaseProvider):
        self.provider = provider
        self.tokens: List[bytes] = []
        self.special_token_ids: List[int] = []
        for token in range(provider.vocab_size):
            text = provider.decode([token])
            if text:
                self.tokens.append(text.encode("utf-8"))
            else:
                self.special_token_ids.append(token)
                self.tokens.append(f"<|special_{token}|>".encode())
        self.eos_token_id = provider.get_eos_token_id()
        self.bos_token_id = None

    def __call__(self, text) -> List[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        try:
            return self.provider.encode(text, add_special_tokens=False)
        except Exception:  # text the provider cannot encode: greedy longest pieces (llguidance must get tokens)
            return self._greedy(text)

    def _greedy(self, text: str) -> List[int]:
        if not hasattr(self, "_ids"):
            self._ids = {
                piece.decode("utf-8", "replace"): i
                for i, piece in enumerate(self.tokens)
                if i not in self.special_token_ids
            }
            self._longest = max(map(len, self._ids), default=1)
        tokens, i = [], 0
        while i < len(text):
            for size in range(min(self._longest, len(text) - i), 0, -1):
                if text[i : i + size] in self._ids:
                    tokens.append(self._ids[text[i : i + size]])
                    i += size
                    break
            else:
                i += 1  # a character no token has: skipped
        return tokens
