"""The error an engine provider raises for anything that goes wrong on the engine's side."""


class EngineError(RuntimeError):
    """The serving engine is unreachable, timed out, answered with an error, or broke off a stream."""

    http_status = 502  # what the OpenAI-compatible server answers (Bad Gateway)
