"""The HTTP server: OpenAI-compatible routes, the frontends' dialects (KoboldAI, TabbyAPI, llama.cpp),
the playground, and the runner that steps every request's generation on one scheduler.

``app`` describes a request's path (validate, plan, execute) and holds ``create_app`` and ``serve``.
The modules by job: request models and their checks (``limits``, ``errors``, ``fields``,
``structured``, ``strategy_specs``, ``samplers``, ``request``, ``schemas``, ``frontends``);
planning (``plan``); executing (``runner``); HTTP (``pipeline``, ``openai``, ``frontend_routes``,
``playground``, ``app``).

``serve`` and ``create_app`` import Starlette when asked for, so ``server.schemas`` works without it."""

__all__ = ["create_app", "serve"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
