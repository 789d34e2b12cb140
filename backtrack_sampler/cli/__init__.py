"""The ``backtrack-sampler`` command: ``generate``, ``batch`` and ``serve``."""

from .commands import main

__all__ = ["main"]
