"""Modules that moved in 4.1 (the folders ``core``, ``provider``, ``strategy``, ``server``, ``cli``)
stay importable by their 4.0 names: ``import backtrack_sampler.models`` gives
``backtrack_sampler.provider.models`` itself (the same module object), with a DeprecationWarning."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "backtrack_sampler.generation": "backtrack_sampler.core.generation",
    "backtrack_sampler.driver": "backtrack_sampler.core.scheduler",
    "backtrack_sampler.backtrack_sampler": "backtrack_sampler.core.sampler",
    "backtrack_sampler.batch": "backtrack_sampler.core.batch",
    "backtrack_sampler.events": "backtrack_sampler.core.events",
    "backtrack_sampler.text": "backtrack_sampler.provider.text",
    "backtrack_sampler.chat": "backtrack_sampler.provider.chat",
    "backtrack_sampler.models": "backtrack_sampler.provider.models",
    "backtrack_sampler.sampling": "backtrack_sampler.strategy.sampling",
    "backtrack_sampler.slop_phrases": "backtrack_sampler.strategy.slop_phrases",
    "backtrack_sampler.registry": "backtrack_sampler.strategy.registry",
    "backtrack_sampler.schemas": "backtrack_sampler.server.schemas",
    "backtrack_sampler.runner": "backtrack_sampler.server.runner",
    "backtrack_sampler.playground": "backtrack_sampler.server.playground",
    "backtrack_sampler.frontends": "backtrack_sampler.server.frontends",
    "backtrack_sampler.batchfile": "backtrack_sampler.cli.batchfile",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(MOVED[spec.name])
        self._spec = module.__spec__  # the import system sets __spec__ to the alias's: put it back
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self._spec


if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
    sys.meta_path.append(_Alias())
