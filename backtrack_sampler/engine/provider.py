"""``EngineProvider``: a model that runs in a serving engine (llama-server, vLLM, SGLang).

The tokenizer is local (text is encoded once, with the BOS token, and only token ids are sent) and
is what strategies and the server use; the model is reached through the provider's backend
(``backend()``: a ``loop.EngineBackend``, which drafts tokens for the one driver instead of
giving logits one position at a time), so ``BacktrackSampler``, ``BatchScheduler`` and the server
run it like any provider.
"""

from __future__ import annotations

from pathlib import Path
from typing import FrozenSet, List, Optional, Sequence, Union

import numpy as np

from ..provider.base_provider import BaseProvider, without_double_bos
from .client import EngineClient
from .errors import EngineError
from .loop import EngineBackend, Slots

ENGINE_TYPES = ("llama-server", "vllm", "sglang")


class _GGUFTokenizer:
    """The tokenizer of a GGUF file, loaded vocabulary-only by llama.cpp (no weights)."""

    def __init__(self, path: str):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        ids = {llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab)}
        self.eos, self.eos_ids, self.size = (
            self.llm.token_eos(),
            frozenset(i for i in ids if i >= 0),
            self.llm.n_vocab(),
        )

    def encode(self, text: str, add_special_tokens: bool) -> List[int]:
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)
        return without_double_bos(tokens, self.llm.token_bos()) if add_special_tokens else tokens

    def decode(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode("utf-8", errors="replace")


class _HFTokenizer:
    """A transformers tokenizer (a local directory or an already loaded tokenizer)."""

    def __init__(self, tokenizer):
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        ids = {
            tokenizer.eos_token_id,
            tokenizer.convert_tokens_to_ids("<end_of_turn>"),
            tokenizer.convert_tokens_to_ids("<|im_end|>"),
            tokenizer.convert_tokens_to_ids("<|eot_id|>"),
        }
        self.eos_ids = frozenset(i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id)
        self.size = len(tokenizer)

    def encode(self, text: str, add_special_tokens: bool) -> List[int]:
        tokens = self.tok.encode(text, add_special_tokens=add_special_tokens)
        return without_double_bos(tokens, self.tok.bos_token_id) if add_special_tokens else tokens

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(list(tokens), skip_special_tokens=True)


class EngineProvider(BaseProvider):
    """A model served by an engine at ``url``: the local tokenizer, and ``backend()`` for the model
    (it has no logits of its own: ``next_logits`` raises).

    engine_type: "llama-server", "vllm" or "sglang" (the wire format).
    tokenizer: the model's tokenizer, local: a .gguf file (read vocabulary-only), a transformers
        tokenizer directory or object, an embedded model's name, or another provider to borrow it
        from. Default: the embedded Gemma 3 270M's GGUF, for an engine serving that model.
    model: the model name vLLM expects in requests (default: the first one it lists).
    timeout: seconds to wait for the engine (connecting, and between two pieces of an answer).
    n_probs: candidates per position (K; default top_k, at least 20, or 64 without top-k).
        vLLM must be started with ``--max-logprobs`` >= K.
    chunk: most tokens per request (default: all that are left).
    context_length: the engine's context per sequence, when it cannot be asked for (SGLang).
    vocab_size: the width of the logits arrays (default: the tokenizer's, or the engine's when larger).
    """

    def __init__(
        self,
        url: str,
        engine_type: str = "llama-server",
        tokenizer=None,
        *,
        model: Optional[str] = None,
        timeout: float = 60.0,
        n_probs: Optional[int] = None,
        chunk: Optional[int] = None,
        context_length: Optional[int] = None,
        vocab_size: Optional[int] = None,
        transport=None,
    ):
        super().__init__()
        if engine_type not in ENGINE_TYPES:
            raise ValueError(f"unknown engine type {engine_type!r}: choose one of {', '.join(ENGINE_TYPES)}")
        self.engine_type = engine_type
        self.client = EngineClient(url, engine_type, timeout, transport)
        self._tok = self._tokenizer(tokenizer)
        # what chat templates and model names are read from (chat.py, models.provider_name)
        self.llm = getattr(self._tok, "llm", None) or getattr(getattr(self._tok, "p", None), "llm", None)
        self.tokenizer = getattr(self._tok, "tok", None) or getattr(getattr(self._tok, "p", None), "tokenizer", None)
        info = self._engine_info()
        self.model = model or info.get("model")
        self._context = context_length or info.get("n_ctx") or 8192
        engine_vocab = info.get("n_vocab")
        self._n_vocab = vocab_size or max(self._tok.size, engine_vocab or 0)
        self._n_probs, self._chunk = n_probs, chunk
        self._slots = Slots(info.get("slots"))  # shared by every backend: a running generation keeps one

    @staticmethod
    def _tokenizer(tokenizer):
        if isinstance(tokenizer, BaseProvider):
            return _Borrowed(tokenizer)
        if tokenizer is None:
            from ..provider.models import default_model_path

            tokenizer = default_model_path()
        if isinstance(tokenizer, (str, Path)):
            from ..provider.models import resolve_model

            path = resolve_model(str(tokenizer))  # a path, or an embedded model's name; FileNotFoundError
            return _GGUFTokenizer(str(path)) if path.is_file() else _HFTokenizer(path)
        return _HFTokenizer(tokenizer)

    def _engine_info(self) -> dict:
        """What the engine says about itself: context per sequence, vocabulary, model name. Also
        checks it is reachable (EngineError if not)."""
        client, info = self.client, {}
        if self.engine_type == "llama-server":
            props = client.get("/props")
            info["n_ctx"] = (props.get("default_generation_settings") or {}).get("n_ctx")
            info["slots"] = props.get("total_slots")
            models = client.get("/v1/models").get("data") or [{}]
            info["n_vocab"] = (models[0].get("meta") or {}).get("n_vocab")
            info["model"] = models[0].get("id")
        elif self.engine_type == "vllm":
            models = client.get("/v1/models").get("data") or []
            if not models:
                raise EngineError(f"vLLM at {client.url} serves no model")
            info["model"], info["n_ctx"] = models[0].get("id"), models[0].get("max_model_len")
        else:
            info["model"] = client.get("/model_info").get("served_model_name")
        if info.get("n_vocab") and info["n_vocab"] != self._tok.size:
            raise EngineError(
                f"the engine's vocabulary has {info['n_vocab']} tokens but the local tokenizer has "
                f"{self._tok.size}: pass the tokenizer of the model the engine serves"
            )
        return info

    # --- tokenizer -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return self._tok.encode(text, add_special_tokens)

    def decode(self, tokens: Sequence[int]) -> str:
        return self._tok.decode(tokens)

    def get_eos_token_id(self) -> int:
        return self._tok.eos

    @property
    def eos_token_ids(self) -> FrozenSet[int]:
        return self._tok.eos_ids

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    @property
    def context_length(self) -> int:
        return self._context

    # --- model -----------------------------------------------------------------------------
    def backend(self, batched: bool = False, step_tokens: int = 256) -> EngineBackend:
        """The engine's backend for the scheduler (the same for one generation or many: the engine
        batches them itself; ``step_tokens`` does not apply)."""
        return EngineBackend(
            self, self.client, self._n_vocab, self._n_probs, self._chunk, self.model, self._slots, self.max_sequences
        )

    @property
    def max_sequences(self) -> int:
        """Generations a server runs at once on this provider (the engine queues what its own
        slots cannot hold)."""
        return 64

    def health(self) -> Optional[str]:
        """None while the engine answers its ``GET /health`` with 200 (llama-server, vLLM and SGLang
        all have it; llama-server answers 503 while it loads), else why not. Waits at most 3 s."""
        return self.client.health(3.0)

    @property
    def stats(self):
        """Requests, tokens received and prefix-cache hits so far (``EngineStats``)."""
        return self.client.stats

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()

    def _forward(self, tokens: List[int]) -> np.ndarray:
        raise NotImplementedError(
            "an EngineProvider has no local logits: its generations run on its backend() (BacktrackSampler, "
            "BatchScheduler and the server use it)"
        )

    def _truncate(self, length: int) -> int:
        return length


class _Borrowed:
    """The tokenizer of an existing provider."""

    def __init__(self, provider: BaseProvider):
        self.p = provider
        self.eos, self.eos_ids, self.size = provider.get_eos_token_id(), provider.eos_token_ids, provider.vocab_size

    def encode(self, text: str, add_special_tokens: bool) -> List[int]:
        return self.p.encode(text, add_special_tokens)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.p.decode(tokens)


def connect(
    url: str, engine_type: str = "llama-server", tokenizer: Union[str, Path, BaseProvider, None] = None, **options
) -> EngineProvider:
    """An ``EngineProvider`` for the engine at ``url`` (see its arguments)."""
    return EngineProvider(url, engine_type, tokenizer, **options)


def load_engine_provider(
    url: str,
    engine_type: str = "llama-server",
    tokenizer: Optional[str] = None,
    n_ctx: Optional[int] = None,
    timeout: float = 60.0,
) -> EngineProvider:
    """``EngineProvider`` for the command line and the server: anything the user can fix (a bad
    URL or type, a missing tokenizer, an unreachable engine) raises UsageError."""
    from ..errors import UsageError

    try:
        return EngineProvider(url, engine_type, tokenizer, context_length=n_ctx, timeout=timeout)
    except (ValueError, FileNotFoundError, EngineError) as error:
        raise UsageError(str(error)) from None
    except ImportError as error:
        raise UsageError(
            f"the engine provider needs httpx: pip install 'backtrack-sampler[engine]' ({error})"
        ) from None
