"""The model a command runs on, from its model flags (``options.add_model_args``): ``load`` is the
one place the command line loads a model or connects to an engine (``serve`` without ``--engine``
hands the flags to the server, which loads its own), so tests replace the model here: ``load``, or
``load_provider`` under it."""

from __future__ import annotations

from ..provider.base_provider import BaseProvider
from ..provider.models import default_model, load_provider


def load(args, chat: bool, slots: int = 1) -> BaseProvider:
    """The model: loaded here (``--backend``, ``--model``; the embedded instruct model for chat;
    ``slots`` sequences at once; vLLM in this process for ``--backend vllm``, with ``--vllm-arg``),
    or served by an engine (``--engine``; the tokenizer from ``--tokenizer`` or ``--model``)."""
    if getattr(args, "backend", None) == "vllm" and not getattr(args, "engine", None):
        from ..engine.vllm_provider import load_vllm_provider

        return load_vllm_provider(args.model, args.n_ctx, args.vllm_arg)
    if not getattr(args, "engine", None):
        model = args.model if args.model is not None else default_model(chat)  # chat -> the instruct model
        return load_provider(args.backend, model, args.n_ctx, args.threads, slots)
    from ..engine import load_engine_provider

    return load_engine_provider(
        args.engine, args.engine_type, args.tokenizer or args.model, args.n_ctx, args.engine_timeout
    )
