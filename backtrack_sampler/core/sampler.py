"""The decode loop that lets a strategy rewind the tokens it just generated.

``Generation`` (generation.py) is one generation's state and the one copy of the sampling and
rewind logic; ``driver.Scheduler`` is the one thing that steps it, for one generation or many, on
a local provider or through a serving engine. ``BacktrackSampler.generate`` is that scheduler
with one generation on the provider's own cache (``scheduler.backend_for(provider)``).
"""

from __future__ import annotations

from contextlib import closing
from typing import Callable, Generator, Iterator, List, Optional, Sequence, Union

from ..provider.base_provider import BaseProvider
from ..provider.text import TextView
from ..strategy.base_strategy import BaseStrategy
from ..strategy.sampling import Sampling
from .generation import Generation, GenerationStats, RewindEvent
from .scheduler import Policy, Update, backend_for, drive

__all__ = ["BacktrackSampler", "Generation", "GenerationStats", "RewindEvent"]


class PromptError(ValueError):
    """A prompt the model cannot take; ``code``: "invalid_value" or "context_length_exceeded"."""

    def __init__(self, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.code = code


def check_prompt(provider: BaseProvider, tokens: List[int]) -> List[int]:
    """``tokens`` when ``provider`` can take them as a prompt (ids in its vocabulary, room left in
    its context), else PromptError: the one check of a prompt, for the sampler and the server."""
    if not tokens:
        raise PromptError("the prompt has no tokens")
    if min(tokens) < 0 or max(tokens) >= provider.vocab_size:
        raise PromptError(f"prompt token ids must be in [0, {provider.vocab_size})")
    if len(tokens) >= provider.context_length:
        raise PromptError(
            f"the prompt is {len(tokens)} tokens long, which leaves no room in the model's context of "
            f"{provider.context_length} tokens",
            "context_length_exceeded",
        )
    return tokens


class BacktrackSampler:
    """Generates tokens with ``provider`` and lets ``strategy`` alter, rewind and release them.

    Reusable: call ``generate`` as often as you like; ``stats`` describes the last call.
    """

    def __init__(self, provider: BaseProvider, strategy: BaseStrategy):
        if not isinstance(provider, BaseProvider) or not isinstance(strategy, BaseStrategy):
            raise TypeError(
                "BacktrackSampler(provider, strategy) takes a provider (e.g. LlamacppProvider) and then a "
                f"strategy (e.g. AntiSlopStrategy); got {type(provider).__name__}, {type(strategy).__name__}"
            )
        self.provider = provider
        self.strategy = strategy
        self.stats = GenerationStats()
        self._active = False

    def generate(
        self,
        prompt: Union[str, Sequence[int]],
        max_length: Optional[int] = None,
        max_new_tokens: Optional[int] = None,
        temperature: float = 1.0,
        top_k: Optional[int] = 50,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        *,
        seed: Optional[int] = None,
        on_rewind: Optional[Callable[[RewindEvent], None]] = None,
        max_rewound_tokens: Optional[int] = None,
    ) -> Iterator[int]:
        """Yield the generated token ids as soon as the strategy makes them final.

        prompt: text (encoded with the BOS token, unless it already starts with it) or a list of
            token ids.
        max_length: limit on prompt + generated tokens; max_new_tokens: on generated tokens
            (delivered ones: rewound tokens do not count). With neither, the context size limits.
        temperature: 0 is greedy. top_k (default 50): None or 0 turns it off; top_p in (0, 1] and
            min_p in [0, 1]: None turns them off.
        seed: makes sampling reproducible. on_rewind: called with a RewindEvent for every rewind.
        max_rewound_tokens: after this many rewound tokens (default 10 x the token limit + 1000)
            the sampler stops asking the strategy to rewind, with a warning, so generation always ends
            (a strategy that declares a hard constraint ends instead, with finish_reason "constraint":
            see ``stats.constraint``).
        The EOS token ends the stream and is not yielded. Bad arguments raise ValueError at once.
        One sampler runs one generation at a time (they share the strategy and the provider's
        cache): iterating a second generator while another is open raises RuntimeError.
        """
        generation = self.start(
            prompt,
            max_length,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            seed=seed,
            on_rewind=on_rewind,
            max_rewound_tokens=max_rewound_tokens,
        )
        return self._tokens(generation)  # errors above come at once

    def start(
        self,
        prompt: Union[str, Sequence[int]],
        max_length: Optional[int] = None,
        max_new_tokens: Optional[int] = None,
        temperature: float = 1.0,
        top_k: Optional[int] = 50,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        *,
        seed: Optional[int] = None,
        on_rewind: Optional[Callable[[RewindEvent], None]] = None,
        max_rewound_tokens: Optional[int] = None,
        strategy: Optional[BaseStrategy] = None,
    ) -> Generation:
        """A ``Generation`` with ``generate``'s arguments checked, for a driver to step
        (``strategy``: a strategy instance of its own; default: the sampler's)."""
        sampling = Sampling(temperature, top_k, top_p, min_p)  # checked: ValueError
        prompt_tokens = self._prompt_tokens(prompt)
        limit = self._token_limit(len(prompt_tokens), max_length, max_new_tokens)
        budget = 10 * limit + 1000 if max_rewound_tokens is None else max_rewound_tokens
        return Generation(
            self.provider, strategy or self.strategy, prompt_tokens, limit, sampling, seed, on_rewind, budget
        )

    def steps(
        self, generation: Generation, policy: Optional[Policy] = None, events: bool = False
    ) -> Generator[Update, None, None]:
        """Drive ``generation`` (from ``start``) to its end on this sampler's provider, yielding the
        scheduler's ``Update`` after every step (its ``tokens`` that became final, often none, and
        with ``events`` its typed events): the loop behind ``generate`` and ``stream_events``.
        ``policy``: what the generation does with each step (default: sample). An error that ended
        it is raised; closing the iterator ends it early."""
        if self._active:
            raise RuntimeError(
                "this BacktrackSampler is already running a generation (its strategy and the provider's cache "
                "are shared): finish or close() the first generator, or use one sampler per generation"
            )
        self._active = True
        self.stats = generation.stats
        try:
            yield from drive(backend_for(self.provider), generation, policy, events)
        finally:
            self._active = False

    def run(self, generation: Generation, policy: Optional[Policy] = None) -> Generator[List[int], None, None]:
        """``steps`` as the tokens that became final at each step (its 4.0 shape)."""
        with closing(self.steps(generation, policy)) as updates:
            for update in updates:
                yield update.tokens

    def _tokens(self, generation: Generation) -> Iterator[int]:
        with closing(self.steps(generation)) as updates:
            for update in updates:
                yield from update.tokens

    def generate_text(self, prompt: Union[str, Sequence[int]], **kwargs) -> Iterator[str]:
        """Like ``generate`` (same arguments) but yields text; characters split across tokens are
        held until complete."""
        tokens: List[int] = []
        view = TextView(self.provider.decode)
        for token in self.generate(prompt, **kwargs):
            tokens.append(token)
            piece = view.update(tokens)
            if piece:
                yield piece
        rest = view.update(tokens, at_end=True)
        if rest:
            yield rest

    def _prompt_tokens(self, prompt) -> List[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise PromptError("the prompt is empty")
            return check_prompt(self.provider, self.provider.encode(prompt, add_special_tokens=True))
        return check_prompt(self.provider, [int(t) for t in prompt])

    def _token_limit(self, prompt_length: int, max_length, max_new_tokens) -> int:
        limit = self.provider.context_length - prompt_length
        if max_new_tokens is not None:
            if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
                raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
            limit = min(limit, max_new_tokens)
        if max_length is not None:
            if not isinstance(max_length, int) or max_length <= prompt_length:
                raise ValueError(
                    f"max_length ({max_length!r}) must be an int larger than the prompt ({prompt_length} tokens)"
                )
            limit = min(limit, max_length - prompt_length)
        return limit
