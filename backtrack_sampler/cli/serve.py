"""``backtrack-sampler serve``: the OpenAI-compatible HTTP server (``server.app.serve``), its flags
(one per field of the server's ``Limits``) and the checks made before the model loads."""

from __future__ import annotations

import os

from ..errors import UsageError
from ..provider.models import default_model
from ..strategy.registry import StrategyRegistry
from .model import load
from .options import add_model_args, non_negative_int, port, positive_int, positive_number


def add_parser(commands) -> None:
    """The ``serve`` subcommand and its flags."""
    parser = commands.add_parser(
        "serve",
        help="start the OpenAI-compatible HTTP server",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models and /health.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1)")
    parser.add_argument("--port", type=port, default=8000, help="(default: 8000)")
    parser.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' (default: $BACKTRACK_SAMPLER_API_KEY, else no key)"
    )
    parser.add_argument("--model-name", help="the model id the API reports (default: the model file's name)")
    parser.add_argument(
        "--parallel",
        type=positive_int,
        metavar="N",
        help="generations run at once, batched (default: 4 per CPU core, at most 8)",
    )
    parser.add_argument(
        "--max-queue",
        type=non_negative_int,
        metavar="N",
        help="requests that may wait for a slot; beyond: 429 (default: 4 x --parallel)",
    )
    parser.add_argument(
        "--load-strategy",
        metavar="SPEC",
        action="append",
        default=[],
        help="offer this strategy to requests under its name (its `name` attribute, else its class "
        "name): package.module:Class or path/to/file.py:Class (repeatable)",
    )
    add_model_args(parser, default_model(chat=True))
    _add_limit_args(parser)


def _add_limit_args(parser) -> None:
    """One option per field of the server's ``Limits`` (``--max-body-bytes`` ...)."""
    try:
        from ..server.schemas import Limits
    except ImportError:  # no pydantic: `serve` says what to install when it runs
        return
    group = parser.add_argument_group("limits (a request beyond one gets a 400, or 413 for the body, at once)")
    for name, field in Limits.model_fields.items():
        parse = positive_number if field.annotation is float else positive_int
        default = "" if field.default is None else f" (default: {field.default})"
        group.add_argument("--" + name.replace("_", "-"), type=parse, metavar="N", help=f"{field.description}{default}")


def run(args) -> int:
    """Serve until stopped (Ctrl-C); the model loads in the server, or is the engine's (``--engine``)."""
    try:
        from ..server.app import Limits, serve
    except ImportError as error:
        raise UsageError(
            f"the server needs starlette, uvicorn and pydantic: pip install 'backtrack-sampler[server]' ({error})"
        ) from None
    api_key = args.api_key if args.api_key is not None else os.environ.get("BACKTRACK_SAMPLER_API_KEY") or None
    limits = Limits(**{name: getattr(args, name) for name in Limits.model_fields if getattr(args, name) is not None})
    strategies = StrategyRegistry()
    for spec in args.load_strategy:  # imported and described now: a bad one fails before the model loads
        strategies.load(spec).schema()
    # --engine: a proxy in front of a serving engine; --backend vllm: vLLM in this process
    provider = load(args, chat=True) if args.engine or args.backend == "vllm" else None
    serve(
        host=args.host,
        port=args.port,
        api_key=api_key,
        backend=args.backend,
        model=args.model,
        n_ctx=args.n_ctx,
        threads=args.threads,
        model_name=args.model_name,
        limits=limits,
        parallel=args.parallel,
        max_queue=args.max_queue,
        provider=provider,
        strategies=strategies,
    )
    return 0
