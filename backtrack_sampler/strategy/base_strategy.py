"""The plugin contract: everything a strategy is, in one file.

A strategy is a ``BaseStrategy`` subclass. The sampler calls its hooks (below, in call order)
for every generated token; it may declare what it does (``reads_probs``, ``edits_logits``,
``hard_constraint``), say why it rewinds (``rewind_reason``) and end a generation it cannot keep
valid (``ConstraintError``). Everything else about a strategy (its name, its JSON parameters)
is read from the class itself: see ``BaseStrategy``.
"""

from __future__ import annotations

import difflib
import sys
import warnings
from typing import Any, ClassVar, List, NamedTuple, Optional

import numpy as np

HOOKS = (
    "reset",
    "on_start",
    "on_logits",
    "on_probs",
    "on_next_token",
    "backtrack",
    "get_keep_index",
    "on_end",
    "on_rewind",
)


class ConstraintError(Exception):
    """Raised by a strategy (from any hook) when its constraint cannot hold: e.g. every token it
    could still rewind to is exhausted. The generation then ends with ``finish_reason``
    ``"constraint"`` (the server's ``"content_filter"``) and ``stats.constraint`` naming the
    strategy and this message; the tokens that were not final yet are dropped, so the result never
    contains what the strategy could not prevent. Final tokens were already delivered and stay.
    ``stats.constraint`` is "StrategyName: message" (the chain member that raised it)."""

    named = False  # set once the message starts with the strategy's name


class Capabilities(NamedTuple):
    """What a strategy does, as the drivers need to know it (``BaseStrategy.capabilities``).

    reads_probs: ``on_probs`` / ``on_next_token`` read the vocabulary-sized probability array
        (else the sampler keeps to the sparse path: the kept candidates only, ``probs=None``).
    edits_logits: ``on_logits`` may change the logits (else a driver may skip building them).
    hard: a hard constraint: when its rewind budget (``max_rewound_tokens``) runs out, the
        generation ends with finish_reason "constraint" instead of going on unconstrained.
    """

    reads_probs: bool
    edits_logits: bool
    hard: bool


class BaseStrategy:
    """Decides how to alter the distribution, when to rewind, how far, and which tokens are final.

    Once a generation starts, ``on_start(limit)``; then for every new token the sampler calls, in
    order::

        logits = on_logits(logits, continuation_tokens)   # full vocabulary, float32, edit in place
        probs  = on_probs(probs, continuation_tokens)     # after temperature/top-k/top-p/min-p
        continuation_tokens.append(sampled_token)
        on_next_token(continuation_tokens, probs)
        continuation_tokens = backtrack(continuation_tokens)   # return a prefix to rewind
        get_keep_index()                                        # tokens before it are final

    ``reset()`` comes before and after every generation, ``on_start(limit)`` after the first one
    (how many tokens the generation may add); ``on_end(continuation_tokens)`` (may
    rewind too) when the token limit is reached; ``on_rewind(position)`` whenever the continuation
    is cut back to ``position`` tokens, by this strategy, another one of a chain, or the driver
    (the time limit, a stop string).

    ``continuation_tokens`` are the generated token ids (the prompt is not included). ``logits``
    and ``probs`` are 1-D numpy arrays over the whole vocabulary; ``probs`` is zero for tokens the
    filters removed. Every hook has a default that changes nothing, so a strategy overrides only
    what it needs; a method whose name looks like a misspelled hook (``on_logit``,
    ``get_keep_idx``) is warned about when the class is created. Set ``self.rewind_reason`` before
    rewinding to say why (it is reported to the sampler's ``on_rewind`` callback). See
    ``DebugStrategy`` for a complete, minimal example.

    Attributes (capabilities are declared on the class, read through ``capabilities``):

    - ``rewind_reason``: why the last rewind happened, in words (None: not said).
    - ``reads_probs``: True when ``on_probs`` or ``on_next_token`` read ``probs``. Declare it: a
      strategy that leaves it None (written before 4.1) is taken to read them when it overrides
      either hook (or as its own ``needs_probs`` says), which costs a vocabulary-sized array per
      token.
    - ``edits_logits``: True when ``on_logits`` may change the logits (None: when it overrides it).
    - ``hard_constraint``: True for a constraint that must hold (see ``Capabilities.hard``);
      an instance may set it too (AntiSlop is hard only with hard bans).
    - ``name`` (optional): the name the command line and the server offer it under (letters,
      digits, ``_`` and ``-``); default: the class name. Its docstring is its description.

    The constructor (the command line's ``--strategy-args``, a request's ``strategy`` object):

    - the parameter named ``provider``, if any, receives the sampler's provider, by name (it is
      never a JSON parameter); every other parameter is passed as a keyword argument;
    - the JSON parameters are the fields of a pydantic model named by a ``Params`` class
      attribute (all passed), else the constructor's keyword parameters: a type hint makes the
      check strict (a string is not a number); an unannotated parameter takes any JSON value; one
      whose type has no JSON form (a callable, a file) is settable from Python only; one without
      a default is required;
    - a ``**kwargs`` constructor also takes its parent class's optional parameters (those it
      does not name itself; the parent: the next class of its MRO, then its parent in turn when
      that one takes ``**kwargs`` too), so a subclass can pass them on with ``super().__init__(**kwargs)``.

    Raises:
        ValueError, TypeError: from the constructor, for a parameter it rejects (a UsageError on
            the command line, a 400 naming the strategy from the server).
        ConstraintError: from any hook, when its constraint cannot hold (see above).
        Any other exception from a hook is a bug: that generation (only it, in a batch) ends
        with the exception.
    """

    rewind_reason: Optional[str] = None
    reads_probs: ClassVar[Optional[bool]] = None
    edits_logits: ClassVar[Optional[bool]] = None
    hard_constraint: bool = False

    # -- the hooks, in call order -------------------------------------------------------------
    def reset(self) -> None:
        """Forget all per-generation state; called before and after every ``generate``."""

    def on_start(self, limit: int) -> None:
        """A generation starts (after ``reset``) and may add at most ``limit`` tokens (its
        ``max_new_tokens``, less when the context is shorter), whatever the driver: e.g. a grammar
        that must finish within it (``GrammarStrategy``)."""

    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        """Alter the raw next-token logits (before temperature and filters)."""
        return logits

    def on_probs(self, probs: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        """Alter the filtered next-token probabilities (they need not sum to 1)."""
        return probs

    def on_next_token(self, continuation_tokens: List[int], probs: Optional[np.ndarray]) -> None:
        """Observe the token just sampled (``continuation_tokens[-1]``) and the probabilities it
        was drawn from."""

    def backtrack(self, continuation_tokens: List[int]) -> List[int]:
        """Return ``continuation_tokens`` or a prefix of it: the tokens after it are rewound."""
        return continuation_tokens

    def get_keep_index(self) -> int:
        """Number of leading continuation tokens that are final: they are streamed to the user and
        are never rewound. The default (no rewinds) makes every token final at once."""
        return sys.maxsize

    def on_end(self, continuation_tokens: List[int]) -> List[int]:
        """The generation reached its token limit with these tokens: the last chance to rewind
        (return a prefix, as ``backtrack`` does; the generation then goes on). At an end-of-text
        token there is no extra call: ``backtrack`` sees that token last."""
        return continuation_tokens

    def on_rewind(self, position: int) -> None:
        """The continuation was cut back to its first ``position`` tokens (by any strategy or the
        driver): forget state about the tokens after it. May come more than once for one cut."""

    # -- what the drivers read ----------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        """What this strategy does (its declarations; see the class docstring)."""
        cls = type(self)
        if cls.reads_probs is None and _overrides(cls, "needs_probs"):
            reads = bool(self.needs_probs)  # a 4.0 strategy's own answer
        else:
            reads = _reads_probs(cls)
        edits = cls.edits_logits if cls.edits_logits is not None else _overrides(cls, "on_logits")
        return Capabilities(reads, bool(edits), bool(self.hard_constraint))

    @property
    def needs_probs(self) -> bool:
        """``capabilities.reads_probs`` (the 4.0 name): when False the sampler skips building the
        vocabulary-sized array (it costs about as much as the sampling itself on a 262k
        vocabulary) and passes ``probs=None`` to ``on_next_token``."""
        if _overrides(type(self), "capabilities"):  # e.g. a chain: its members decide
            return self.capabilities.reads_probs
        return _reads_probs(type(self))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, hook in misspelled_hooks(cls):
            warnings.warn(
                f"{cls.__module__}.{cls.__qualname__}.{name} looks like a misspelling of the hook "
                f"{hook!r}: the sampler never calls {name!r}",
                UserWarning,
                stacklevel=2,
            )


def _overrides(cls: type, *names: str) -> bool:
    return any(getattr(cls, name) is not getattr(BaseStrategy, name) for name in names)


def _reads_probs(cls: type) -> bool:
    declared = getattr(cls, "reads_probs", None)
    return bool(declared) if declared is not None else _overrides(cls, "on_probs", "on_next_token")


def misspelled_hooks(cls: type) -> List[tuple]:
    """``(method name, hook)`` for each method ``cls`` defines whose name is close to a hook's
    (difflib ratio >= 0.85) without being one; dunder and private (``_x``) names and names a base
    class defines are not checked."""
    found = []
    for name, value in vars(cls).items():
        if name in HOOKS or name.startswith("_") or not callable(getattr(value, "__func__", value)):
            continue
        if any(name in vars(base) for base in cls.__mro__[1:]):
            continue
        close = difflib.get_close_matches(name, HOOKS, n=1, cutoff=0.85)
        if close:
            found.append((name, close[0]))
    return found
