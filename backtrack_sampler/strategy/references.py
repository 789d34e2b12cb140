"""Strategy classes by reference: what a name or a ``module:Class`` text stands for.

A strategy is named by

- a built-in name (``BUILTINS``: ``"antislop"``, ``"grammar"``, ...),
- an installed plugin's name: an entry point of the group ``backtrack_sampler.strategies``
  (``ENTRY_POINT_GROUP``), declared by a package, e.g. in its ``pyproject.toml``::

      [project.entry-points."backtrack_sampler.strategies"]
      no_digits = "my_package.strategies:NoDigits"

  A built-in name wins over an entry point of the same name (with a warning),
- ``package.module:Class`` (an importable module),
- ``path/to/file.py:Class`` (the file is imported once, as its own module).

``load_class`` imports the class a ``module:Class`` / ``file.py:Class`` reference names;
``plugin_references`` lists the installed entry points. Neither registers anything: the
``StrategyRegistry`` (registry.py) decides which names a request may use.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import re
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Type

from ..errors import UsageError
from .base_strategy import BaseStrategy

BUILTINS: Dict[str, str] = {
    "none": "backtrack_sampler.strategy.base_strategy:BaseStrategy",
    "antislop": "backtrack_sampler.strategy.antislop_strategy:AntiSlopStrategy",
    "creative": "backtrack_sampler.strategy.creative_writing_strategy:CreativeWritingStrategy",
    "adaptive": "backtrack_sampler.strategy.adaptive_temperature_strategy:AdaptiveTemperatureStrategy",
    "replace": "backtrack_sampler.strategy.replace_strategy:ReplaceStrategy",
    "debug": "backtrack_sampler.strategy.debug_strategy:DebugStrategy",
    "human": "backtrack_sampler.strategy.human_guidance_strategy:HumanGuidanceStrategy",
    "repetition": "backtrack_sampler.strategy.repetition_strategy:RepetitionStrategy",
    "grammar": "backtrack_sampler.strategy.grammar_strategy:GrammarStrategy",
    "confidence": "backtrack_sampler.strategy.confidence_strategy:ConfidenceStrategy",
    "penalties": "backtrack_sampler.strategy.penalty_strategy:PenaltyStrategy",
    "dry": "backtrack_sampler.strategy.dry_strategy:DryStrategy",
    "xtc": "backtrack_sampler.strategy.xtc_strategy:XtcStrategy",
    "typical": "backtrack_sampler.strategy.typical_strategy:TypicalStrategy",
    "logit_bias": "backtrack_sampler.strategy.logit_bias_strategy:LogitBiasStrategy",
}
TERMINAL_ONLY = ("debug", "human")  # they write to / read from a terminal: command line only, never per request
STRATEGIES = tuple(BUILTINS)  # the built-in names
ENTRY_POINT_GROUP = "backtrack_sampler.strategies"
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")  # a strategy's public name
REFERENCE_HELP = "a built-in name ({}), package.module:Class or path/to/file.py:Class"


def is_reference(text: str) -> bool:
    """True for a module or file reference (``a.b:C``, ``x.py:C``, a path), False for a plain name."""
    return ":" in text or "/" in text or "\\" in text or text.endswith(".py")


def public_name(cls: type) -> str:
    """The name a strategy class is offered under: its own ``name`` class attribute (not an
    inherited one), else its class name."""
    name = vars(cls).get("name")
    return name if isinstance(name, str) and name else cls.__name__


# --------------------------------------------------------------------------------------------
# installed plugins: entry points
# --------------------------------------------------------------------------------------------
def plugin_references(builtins: Dict[str, str] = BUILTINS) -> Dict[str, str]:
    """Name -> ``module:Class`` of the strategies installed packages declare in the entry-point
    group ``backtrack_sampler.strategies`` (read now, nothing imported). An entry point named
    like a built-in, or like one found before it, or whose name or value is not usable, is left
    out with a UserWarning."""
    found: Dict[str, str] = {}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        where = _distribution(entry)
        reference = f"{entry.module}:{entry.attr}" if entry.attr else ""
        problem = None
        if entry.name in builtins:
            problem = f"the built-in strategy {entry.name!r} wins over it"
        elif entry.name in found:
            problem = f"{found[entry.name]} was found first under that name"
        elif not NAME.fullmatch(entry.name):
            problem = "a strategy name is letters, digits, _ and -"
        elif not reference:
            problem = "its value must be module:Class"
        if problem:
            warnings.warn(
                f"strategy entry point {entry.name!r} ({entry.value}{where}) is ignored: {problem}",
                UserWarning,
                stacklevel=2,
            )
            continue
        found[entry.name] = reference
    return found


def _distribution(entry: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    name = getattr(dist, "name", None) if dist is not None else None
    return f", from {name}" if name else ""


# --------------------------------------------------------------------------------------------
# references -> classes
# --------------------------------------------------------------------------------------------
def load_class(reference: str) -> Type[BaseStrategy]:
    """The ``BaseStrategy`` subclass ``reference`` names: ``package.module:Class`` or
    ``path/to/file.py:Class`` (the file is imported once, as its own module). UsageError when the
    module or file is missing, fails to import, has no such class, or it is not a strategy."""
    where, colon, attribute = reference.rpartition(":")
    if not colon or not where or not attribute:
        raise UsageError(
            f"{reference!r} is not a strategy reference: use " + REFERENCE_HELP.format(", ".join(BUILTINS))
        )
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    module = _import_file(where) if is_file else _import_module(where)
    target: Any = module
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise UsageError(f"{where} has no class {attribute!r}")
    if not (isinstance(target, type) and issubclass(target, BaseStrategy)):
        raise UsageError(f"{reference} is not a strategy: it must be a subclass of BaseStrategy")
    return target


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name and name.startswith(error.name):
            raise UsageError(f"no module named {name!r} (is it installed, or on PYTHONPATH?)") from None
        raise UsageError(f"cannot import {name}: {error}") from None
    except Exception as error:
        raise UsageError(f"cannot import {name}: {type(error).__name__}: {error}") from None


def _import_file(where: str) -> ModuleType:
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        raise UsageError(f"strategy file not found: {where}")
    name = f"_strategy_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {where}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as import does (dataclasses, pickling and typing look it up there)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise UsageError(f"cannot import {where}: {type(error).__name__}: {error}") from None
    return module
