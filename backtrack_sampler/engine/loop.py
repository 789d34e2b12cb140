"""The engine loop: drive one ``Generation`` with tokens drafted by a serving engine.

The engine streams tokens with the top-K candidates at every position. Each token is a *draft*:

- the candidates become logits (vocabulary-sized, -inf outside the candidates) and go through
  ``generation.distribution`` (the strategy's hooks; the one copy of that logic), giving p';
- q is the distribution the engine drew the draft from (see ``apis.Step.kind``);
- the draft x is kept with probability min(1, p'(x) / q(x)) (always when the strategy left the
  distribution alone), else a token is drawn from the residual max(0, p' - q), normalised. This is
  speculative sampling: the kept token is distributed exactly as p';
- ``generation.push`` then lets the strategy rewind. When a token was replaced or rewound, the
  stream is closed (the engine stops decoding it) and a new request continues from the kept
  tokens, which the engine's prefix cache serves. After a rewind to position s the replacement is
  drawn locally from the candidates already received for s, so the new request starts at
  ``ids[:s] + [replacement]``.

Exactness: p' and q are known on the reported candidates only. With K >= the number of tokens the
engine's sampling keeps (e.g. top_k <= K) the output is distributed exactly as the strategy asks
(up to float rounding); with more candidates than K (top_k off), tokens outside the K best are
only reachable as the engine's own drafts, which are kept when the strategy leaves their position
unchanged.
"""

from __future__ import annotations

import threading
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..backtrack_sampler import Generation
from ..sampling import filter_logits, sample
from ..strategy.base_strategy import BaseStrategy
from .apis import Finish, LlamaServerAPI, Step
from .client import EngineClient
from .errors import EngineError


def local_sampling(kind: str, sampling: tuple) -> tuple:
    """The sampling filters still to apply locally to a Step's logits (see ``step_logits``).

    "post" values are the engine's sampling distribution already: only the temperature (undone by
    ``step_logits``) is re-applied. Other kinds get the user's filters, as the engine did."""
    temperature = sampling[0]
    if kind in ("post", "opaque") and temperature > 0:
        return (temperature, None, None, None)
    return sampling


def step_logits(step: Step, temperature: float) -> np.ndarray:
    """The candidates' values on the logit scale the strategy expects (the model's logits up to a
    constant): "post" and "tempered" log-probabilities are multiplied back by the temperature."""
    if step.kind in ("post", "tempered") and temperature > 0:
        return step.logp * temperature
    return step.logp


def engine_q(step: Step, sampling: tuple) -> Tuple[np.ndarray, np.ndarray]:
    """``(ids, probs)``: the distribution the engine drew ``step.token`` from, on the candidates."""
    logits = step_logits(step, sampling[0])
    idx, probs = filter_logits(logits.astype(np.float32), *local_sampling(step.kind, sampling))
    return step.ids[idx], probs


def accept(draft: int, q: Tuple[np.ndarray, np.ndarray], p: Tuple[np.ndarray, np.ndarray],
           rng: np.random.Generator) -> int:
    """Speculative sampling: keep ``draft`` (drawn from q) with probability min(1, p(draft)/q(draft)),
    else draw from the residual max(0, p - q), normalised. The result is distributed as p.
    q, p: ``(ids, weights)``; weights need not be normalised. No random number is used when the
    ratio is 0 or >= 1 (greedy decoding stays deterministic)."""
    q_ids, q_w = q
    p_ids, p_w = p
    q_w = q_w / q_w.sum()
    p_w = p_w / p_w.sum()
    qx = float(q_w[q_ids == draft].sum())
    px = float(p_w[p_ids == draft].sum())
    if qx > 0 and (px >= qx or (px > 0 and rng.random() < px / qx)):
        return draft
    if qx == 0 and px > 0:  # the engine drew a token outside the candidates it reported as kept
        return draft if len(p_ids) == 1 else sample(p_ids, p_w, rng)
    ids = np.union1d(p_ids, q_ids)
    residual = np.zeros(len(ids))
    residual[np.searchsorted(ids, p_ids)] += p_w
    residual[np.searchsorted(ids, q_ids)] -= q_w
    keep = residual > 1e-12
    if not keep.any():  # p == q up to rounding, yet the draft was refused: draw from p
        return sample(p_ids, p_w, rng)
    return sample(ids[keep], residual[keep], rng)  # one candidate left: no random number drawn


class _Slots:
    """The engine's sequence slots (llama-server's ``total_slots``): each running generation keeps
    one, so its requests find their prefix cached there; -1 (the engine's choice) when none is free."""

    def __init__(self, count: Optional[int]):
        self._free: List[int] = list(range((count or 0) - 1, -1, -1))
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            return self._free.pop() if self._free else -1

    def give(self, slot: int) -> None:
        if slot >= 0:
            with self._lock:
                self._free.append(slot)


class EngineLoop:
    """Drives Generations with one engine (``client``); ``provider`` gives the vocabulary size.

    n_probs: K, the candidates asked for at every position (default: top_k, at least 20; 64 when
        top_k is off). chunk: most tokens per request (default: all that are left; a rejected
        draft closes the stream early anyway). slots: how many sequence slots the engine has, when
        its API lets a request choose one (llama-server); None: the engine places every request.
    """

    def __init__(self, client: EngineClient, vocab_size: int, n_probs: Optional[int] = None,
                 chunk: Optional[int] = None, model: Optional[str] = None, slots: Optional[int] = None):
        self.client, self.vocab_size, self.n_probs, self.chunk, self.model = client, vocab_size, n_probs, chunk, model
        self.slots = _Slots(slots)

    def k_for(self, sampling: tuple) -> int:
        if self.n_probs:
            return self.n_probs
        top_k = sampling[1]
        return max(top_k, 20) if top_k else 64

    def drive(self, generation: Generation) -> Iterator[int]:
        """Yield the tokens of ``generation`` as they become final, until it is done."""
        user = generation.sampling
        k = self.k_for(user)
        known: Dict[int, Step] = {}  # position -> the candidates received after tokens[:position]
        slot = self.slots.take()
        try:
            while not generation.done:
                position = len(generation.tokens)
                step = known.get(position)
                if step is not None:  # rewound to a position we have candidates for: choose locally
                    yield from self._choose(generation, step, user, known)
                    continue
                yield from self._request(generation, user, k, known, slot)
        finally:
            self.slots.give(slot)

    def _choose(self, generation: Generation, step: Step, user: tuple, known: Dict[int, Step]) -> Iterator[int]:
        """Draw the token at ``step``'s position locally, from the candidates received for it."""
        generation.sampling = local_sampling(step.kind, user)
        try:
            yield from generation.advance(self._logits(step, user[0]))
        finally:
            generation.sampling = user
        self._forget(known, generation)

    # --------------------------------------------------------------------------------------
    def _request(self, generation: Generation, user: tuple, k: int, known: Dict[int, Step], slot: int) -> Iterator[int]:
        n = generation.limit - len(generation.tokens)
        if self.chunk:
            n = min(n, self.chunk)
        seed = int(generation.rng.integers(2**31 - 1)) if user[0] > 0 else None
        body = self.client.api.body(generation.sequence, max(n, 1), user, k, seed, self.model, slot)
        name, got, finish = self.client.api.name, 0, None
        with self.client.stream(body, user) as events:
            for event in events:
                if isinstance(event, Finish):
                    finish = event
                    break
                got += 1
                if not (yield from self._take(generation, event, user, known)):
                    return  # replaced or rewound: closing the stream stops the engine
        if finish is None:
            raise EngineError(f"{name} ended the stream without finishing the request")
        if finish.reason == "gap":
            yield from self._one(generation, user, k, known, slot)
        elif got == 0:
            raise EngineError(f"{name} finished a request without generating a token (its context may be full)")

    def _one(self, generation: Generation, user: tuple, k: int, known: Dict[int, Step], slot: int) -> Iterator[int]:
        """After a llama-server gap: one token, not streamed (its probabilities may be missing)."""
        api = self.client.api
        if not isinstance(api, LlamaServerAPI):
            raise EngineError(f"{api.name} skipped tokens in its stream")
        seed = int(generation.rng.integers(2**31 - 1)) if user[0] > 0 else None
        body = api.body(generation.sequence, 1, user, k, seed, slot=slot, stream=False)
        step = api.single(self.client.post(api.path, body), user)
        self.client.stats.steps += 1
        yield from self._take(generation, step, user, known)

    def _take(self, generation: Generation, step: Step, user: tuple, known: Dict[int, Step]) -> Iterator[int]:
        """Accept or replace one drafted token; returns whether the stream can go on."""
        if int(step.ids.max()) >= self.vocab_size or int(step.ids.min()) < 0:
            raise EngineError(f"{self.client.api.name} sent token id {int(step.ids.max())}, outside the local "
                              f"tokenizer's {self.vocab_size} tokens: pass the tokenizer of the model it serves")
        position = len(generation.tokens)
        known[position] = step
        generation.sampling = local_sampling(step.kind, user)
        try:
            try:
                if self._compact(generation):  # the strategy reads no logits: skip the vocabulary-sized array
                    ids, probs, dense = generation.distribution(step_logits(step, user[0]).astype(np.float32))
                    ids = step.ids[ids]
                else:
                    ids, probs, dense = generation.distribution(self._logits(step, user[0]))
            except ValueError:
                if step.kind != "opaque":
                    raise
                ids, probs, dense = np.array([step.token]), np.ones(1), None  # nothing to choose from
            token = accept(step.token, engine_q(step, user), (ids, probs), generation.rng)
        finally:
            generation.sampling = user
        if dense is None and generation.strategy.needs_probs:
            dense = np.zeros(self.vocab_size, np.float32)
        yield from generation.push(token, dense)
        self._forget(known, generation)
        if token == step.token and len(generation.tokens) == position and not generation.done:
            # the strategy took back just this token (e.g. a soft-banned word): choose again here; when
            # the new choice is the same token, the engine's stream after it is still valid
            yield from self._choose(generation, step, user, known)
        return generation.tokens[position:] == [step.token] and not generation.done

    @staticmethod
    def _compact(generation: Generation) -> bool:
        """Whether the strategy neither edits logits nor reads probabilities, so that the candidates
        alone (a K-long array) can stand for the logits."""
        strategy = generation.strategy
        return type(strategy).on_logits is BaseStrategy.on_logits and not strategy.needs_probs

    def _logits(self, step: Step, temperature: float) -> np.ndarray:
        logits = np.full(self.vocab_size, -np.inf, dtype=np.float32)
        logits[step.ids] = step_logits(step, temperature)
        return logits

    @staticmethod
    def _forget(known: Dict[int, Step], generation: Generation) -> None:
        length = len(generation.tokens)
        for position in [p for p in known if p > length]:
            del known[position]
