"""BacktrackSampler: the decode loop that lets a strategy rewind the tokens it just generated."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Union

import numpy as np

from .provider.base_provider import BaseProvider
from .sampling import check_sampling_args, filter_logits, sample
from .strategy.base_strategy import BaseStrategy


@dataclass
class RewindEvent:
    """One rewind: the continuation was cut back to ``position`` tokens, removing ``tokens``."""

    position: int
    tokens: List[int]
    text: str
    reason: Optional[str]


@dataclass
class GenerationStats:
    """What the last ``generate`` call did. ``finish_reason``: "stop" (EOS) or "length"."""

    delivered: int = 0
    rewound: int = 0
    rewinds: int = 0
    steps: int = 0
    seconds: float = 0.0
    finish_reason: Optional[str] = None
    events: List[RewindEvent] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0


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
        self._run: Optional[object] = None

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

        prompt: text (encoded with the BOS token) or a list of token ids.
        max_length: limit on prompt + generated tokens; max_new_tokens: on generated tokens
            (delivered ones: rewound tokens do not count). With neither, the context size limits.
        temperature: 0 is greedy. top_k (default 50): None or 0 turns it off; top_p in (0, 1] and
            min_p in [0, 1]: None turns them off.
        seed: makes sampling reproducible. on_rewind: called with a RewindEvent for every rewind.
        max_rewound_tokens: after this many rewound tokens (default 10 x the token limit + 1000)
            the sampler stops asking the strategy to rewind, with a warning, so generation always ends.
        The EOS token ends the stream and is not yielded. Bad arguments raise ValueError at once.
        """
        check_sampling_args(temperature, top_k, top_p, min_p)
        prompt_tokens = self._prompt_tokens(prompt)
        limit = self._token_limit(len(prompt_tokens), max_length, max_new_tokens)
        budget = 10 * limit + 1000 if max_rewound_tokens is None else max_rewound_tokens
        sampling = (temperature, top_k, top_p, min_p)
        return self._generate(prompt_tokens, limit, sampling, seed, on_rewind, budget)  # errors above come at once

    def _generate(self, prompt_tokens, limit, sampling, seed, on_rewind, budget) -> Iterator[int]:
        temperature = sampling[0]
        provider, strategy, eos = self.provider, self.strategy, self.provider.eos_token_ids
        rng = np.random.default_rng(seed)
        stats = self.stats = GenerationStats()
        self._run = run = object()  # a newer generate() owns the strategy from then on
        started = time.perf_counter()
        tokens: List[int] = []
        released = 0
        backtracking = True
        strategy.reset()
        provider.reset()  # the same call gives the same tokens: llama.cpp's numerics depend on batch shapes
        try:
            while len(tokens) < limit:
                logits = strategy.on_logits(provider.generate(prompt_tokens + tokens), tokens)
                stats.steps += 1
                ids, weights = filter_logits(logits, *sampling)
                probs = np.zeros(len(logits), dtype=np.float32)
                probs[ids] = weights
                probs = strategy.on_probs(probs, tokens)
                ids = np.flatnonzero(probs > 0)
                if len(ids) == 0:
                    raise ValueError(f"{type(strategy).__name__}.on_probs left no token with probability > 0")
                token = int(np.argmax(probs)) if temperature == 0 else sample(ids, probs[ids], rng)
                tokens.append(token)
                strategy.on_next_token(tokens, probs)

                before = len(tokens)
                if backtracking:
                    tail = tokens[released:]
                    tokens = strategy.backtrack(tokens)
                    if len(tokens) < released:
                        raise RuntimeError(
                            f"{type(strategy).__name__} rewound to {len(tokens)} tokens, but {released} were "
                            "already delivered as final (its keep index)"
                        )
                    if len(tokens) < before:
                        self._record_rewind(tokens, tail[len(tokens) - released :], on_rewind)
                        if stats.rewound >= budget:
                            backtracking = False
                            warnings.warn(
                                f"{type(strategy).__name__} rewound {stats.rewound} tokens (max_rewound_tokens="
                                f"{budget}); rewinding is off for the rest of this generation",
                                RuntimeWarning,
                                stacklevel=2,
                            )
                if len(tokens) == before and token in eos:
                    tokens.pop()
                    stats.finish_reason = "stop"
                    break
                keep = min(strategy.get_keep_index(), len(tokens)) if backtracking else len(tokens)
                while released < keep:
                    released = stats.delivered = released + 1
                    yield tokens[released - 1]
            stats.finish_reason = stats.finish_reason or "length"
            while released < len(tokens):
                released = stats.delivered = released + 1
                yield tokens[released - 1]
        finally:
            stats.seconds = time.perf_counter() - started
            if self._run is run:
                strategy.reset()

    def generate_text(self, prompt: Union[str, Sequence[int]], **kwargs) -> Iterator[str]:
        """Like ``generate`` (same arguments) but yields text; characters split across tokens are
        held until complete."""
        tokens: List[int] = []
        start = done = 0  # tokens[start:done] is already sent; decoding from start keeps spacing right
        for token in self.generate(prompt, **kwargs):
            tokens.append(token)
            sent = self.provider.decode(tokens[start:done])
            text = self.provider.decode(tokens[start:])
            if len(text) > len(sent) and not text.endswith("\ufffd"):
                yield text[len(sent) :]
                start, done = done, len(tokens)
        rest = self.provider.decode(tokens[start:])[len(self.provider.decode(tokens[start:done])) :]
        if rest:
            yield rest

    def _record_rewind(self, tokens, removed, on_rewind) -> None:
        stats = self.stats
        stats.rewinds += 1
        stats.rewound += len(removed)
        event = RewindEvent(len(tokens), removed, self.provider.decode(removed), self.strategy.rewind_reason)
        stats.events.append(event)
        if on_rewind is not None:
            on_rewind(event)

    def _prompt_tokens(self, prompt) -> List[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            tokens = self.provider.encode(prompt, add_special_tokens=True)
        else:
            tokens = [int(t) for t in prompt]
            if not tokens:
                raise ValueError("the prompt has no tokens")
            if min(tokens) < 0 or max(tokens) >= self.provider.vocab_size:
                raise ValueError(f"prompt token ids must be in [0, {self.provider.vocab_size})")
        if len(tokens) >= self.provider.context_length:
            raise ValueError(
                f"the prompt is {len(tokens)} tokens long, which leaves no room in the model's context of "
                f"{self.provider.context_length} tokens"
            )
        return tokens

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
