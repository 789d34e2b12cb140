"""The HTTP server: OpenAI-compatible routes, the frontends' dialects (KoboldAI, TabbyAPI, llama.cpp),
the playground, and the runner that steps every request's generation on one scheduler.

``serve`` and ``create_app`` import Starlette when asked for, so ``server.schemas`` works without it."""

__all__ = ["create_app", "serve"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
