"""The base class of every model backend: tokenizer plus next-token logits with a rewindable cache."""

from __future__ import annotations

import itertools
import re
import threading
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, FrozenSet, Hashable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|hip|npu|meta|vulkan|metal)(:\d+)?")


def check_device(device) -> str:
    """Return the device as a string ("cpu", "cuda:0", ...) or raise ValueError for an unknown one."""
    name = "cpu" if device is None else str(device)
    if not _DEVICE.fullmatch(name):
        raise ValueError(f"unknown device {device!r}: expected 'cpu', 'cuda', 'cuda:N', 'mps', ...")
    return name


def without_double_bos(tokens: List[int], bos: Optional[int]) -> List[int]:
    """``tokens`` less their first token when it is a BOS followed by another BOS: the tokenizer
    added one to a text that already started with the BOS token's text (e.g. a rendered chat
    template "<bos><start_of_turn>...")."""
    return tokens[1:] if bos is not None and len(tokens) >= 2 and tokens[0] == tokens[1] == bos else tokens


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


@dataclass(eq=False)
class _Sequence:
    """One backend slot of ``next_logits_batch``: its cached tokens and recent logits, kept when its
    key is released (the prompt cache); ``used``: when a key last released it (-1: never)."""

    slot: int
    cached: List[int]
    recent: Dict[int, np.ndarray]
    used: int = -1


class BaseProvider(ABC):
    """Wraps a model backend. Subclasses implement the tokenizer, ``_forward`` and ``_truncate``.

    The provider remembers which tokens its KV cache holds. ``next_logits(tokens)`` keeps the longest
    cached prefix of ``tokens``, drops the rest of the cache, and evaluates only the new tokens, so
    a rewind is simply a call with a shorter sequence; the logits of the last ``KEEP_LOGITS``
    positions are kept, so a short rewind evaluates nothing. After any number of rewinds the
    logits are those of a fresh forward pass over the same tokens.

    A provider whose model runs elsewhere (``engine.EngineProvider``) also defines
    ``backend(batched, step_tokens)``, the ``core.scheduler.Backend`` the scheduler steps it on;
    for the others the scheduler drives ``next_logits`` / ``next_logits_batch`` (``core.scheduler.backend_for``).

    The prompt cache: what a finished sequence leaves in a cache stays there, and the next one
    keeps the longest prefix it shares with it (``claim``), so a chat that resends its history
    evaluates only its new tokens. ``prompt_cache = False`` (on the instance) empties a cache
    before every sequence instead: llama.cpp's numbers depend on the batch shapes that built a
    cache, so only then does the same call always give the same numbers, bit for bit.

    Thread-safe: one call at a time uses the backend (a lock), so two drivers sharing a provider
    (say, a server and a script) get the right logits, one after the other, never a mixed cache.
    """

    KEEP_LOGITS = 8  # logits kept for the last positions, so that short rewinds cost no evaluation
    SIMILARITY = 0.1  # a free slot's prefix counts when it is this share of the longer sequence (llama-server's)
    prompt_cache = True  # keep a finished sequence's cache for the next one (see the class docstring)

    def __init__(self) -> None:
        self._cached: List[int] = []
        self._recent: Dict[int, np.ndarray] = {}  # sequence length -> the logits after it
        self._batch: Dict[Hashable, _Sequence] = {}  # next_logits_batch's sequences by key
        self._slot_caches: Optional[List[_Sequence]] = None  # every slot's cache (made on first use)
        self._clock = itertools.count()  # orders releases: the least recently used free slot goes first
        self._lock = threading.RLock()  # one call at a time: the cache is shared state

    # --- tokenizer -------------------------------------------------------------------------
    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """Token ids of ``text`` (with the BOS token when ``add_special_tokens``, unless ``text``
        already starts with the BOS token's text: one BOS, never two)."""

    @abstractmethod
    def decode(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens``; special tokens (BOS, EOS, ...) render as nothing."""

    @abstractmethod
    def get_eos_token_id(self) -> int:
        """The end-of-sequence token id."""

    @property
    def eos_token_ids(self) -> FrozenSet[int]:
        """Every token id that ends generation (EOS, end-of-turn, ...)."""
        return frozenset([self.get_eos_token_id()])

    # --- model -----------------------------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Length of the logits vector."""

    @property
    @abstractmethod
    def context_length(self) -> int:
        """The most tokens (prompt + continuation) the model can attend to."""

    @abstractmethod
    def _forward(self, tokens: List[int]) -> np.ndarray:
        """Append ``tokens`` to the cache and return the last position's logits (float32, 1-D)."""

    @abstractmethod
    def _truncate(self, length: int) -> int:
        """Drop every cached position from ``length`` on; return how many positions remain
        (fewer than ``length`` when the backend cannot keep them, e.g. a pruned sliding window)."""

    def next_logits(self, input_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits after ``input_ids`` as a float32 array of ``vocab_size`` (yours to edit)."""
        tokens = self._checked(input_ids)
        with self._lock:
            self._sync()
            known, n = self._reuse(self._cached, self._recent, tokens, self._cut)
            if known is not None:
                return known
            logits = self._forward(tokens[n:])
            self._remember(self._cached, self._recent, tokens[n:], logits)
            return logits

    def generate(self, input_ids: Sequence[int]) -> np.ndarray:
        """Deprecated 4.0 name of ``next_logits`` (it returns logits, not generated tokens)."""
        warnings.warn("provider.generate() is now provider.next_logits()", DeprecationWarning, stacklevel=2)
        return self.next_logits(input_ids)

    # --- several sequences at once ------------------------------------------------------------
    @property
    def max_sequences(self) -> int:
        """How many sequences ``next_logits_batch`` can hold at once (each key takes one until
        ``release``). The base implementation has one: the cache of ``next_logits`` itself."""
        return 1

    def next_logits_batch(self, requests: Mapping[Hashable, Sequence[int]]) -> Dict[Hashable, np.ndarray]:
        """Next-token logits for several sequences in one backend call: ``{key: input_ids}`` ->
        ``{key: logits}``. Each key is a sequence with its own cache, kept exactly like the cache
        of ``next_logits`` (longest cached prefix, recent logits, rewind = a shorter ``input_ids``)
        until ``release(key)``. A new key takes a free slot (see ``claim``); more than
        ``max_sequences`` live keys raise RuntimeError."""
        with self._lock:
            return self._next_logits_batch(requests)

    def _next_logits_batch(self, requests: Mapping[Hashable, Sequence[int]]) -> Dict[Hashable, np.ndarray]:
        answers: Dict[Hashable, np.ndarray] = {}
        work = []
        if self._shares_single_cache():
            self._sync()
        for key, input_ids in requests.items():
            tokens = self._checked(input_ids)
            seq = self._batch.get(key) or self._take_slot(key, tokens)
            known, n = self._reuse(
                seq.cached, seq.recent, tokens, lambda length, seq=seq: self._cut_sequence(seq, length)
            )
            if known is not None:
                answers[key] = known
            else:
                work.append((key, seq, tokens[n:]))
        if work:
            results = self._forward_batch([(seq.slot, new) for _, seq, new in work])
            for (key, seq, new), logits in zip(work, results):
                self._remember(seq.cached, seq.recent, new, logits)
                answers[key] = logits
        return {key: answers[key] for key in requests}

    def known_logits(self, input_ids: Sequence[int], key: Optional[Hashable] = None) -> Optional[np.ndarray]:
        """The next-token logits after ``input_ids`` when they are known without evaluating
        anything (a short rewind: the cache holds them and their logits were kept), else None.
        As ``next_logits`` (``key`` None) or ``next_logits_batch`` (an existing key), the cache is
        then cut to ``input_ids``."""
        tokens = list(input_ids)
        with self._lock:
            if key is None:
                self._sync()
                cached, recent, cut = self._cached, self._recent, self._cut
            else:
                seq = self._batch.get(key)
                if seq is None:
                    return None
                cached, recent = seq.cached, seq.recent
                cut = lambda length: self._cut_sequence(seq, length)  # noqa: E731
            return self._known(cached, recent, tokens, cut) if tokens else None

    def claim(self, tokens: Sequence[int], key: Optional[Hashable] = None) -> int:
        """Ready a cache for a sequence that starts with ``tokens``; return how many of them it holds
        already (only the rest will be evaluated). ``key`` None: the cache of ``next_logits``;
        else a key of ``next_logits_batch``: its slot, or for a new key the free slot whose cache
        shares the longest prefix with ``tokens`` (counted when it is at least ``SIMILARITY`` of
        the longer of the two, so a new chat takes an empty slot rather than evict another chat
        that merely shares its first tokens), ties to the least recently used. With
        ``prompt_cache`` off the cache is emptied first."""
        tokens = list(tokens)
        with self._lock:
            self._sync()
            if key is None:
                if not self.prompt_cache:
                    self._cut(0)
                return common_prefix(self._cached, tokens)
            seq = self._batch.get(key) or self._take_slot(key, tokens)
            return common_prefix(seq.cached, tokens)

    def release(self, key: Hashable) -> None:
        """End the sequence ``key`` of ``next_logits_batch`` and free its slot, whose cache stays for
        the next key (``claim``; emptied with ``prompt_cache`` off). A no-op for an unknown key."""
        with self._lock:
            seq = self._batch.pop(key, None)
            if seq is not None:
                seq.used = next(self._clock)
                if not self.prompt_cache:
                    self._cut_sequence(seq, 0)

    @property
    def batch_keys(self) -> List[Hashable]:
        """The keys of ``next_logits_batch`` that hold a slot."""
        return list(self._batch)

    def _forward_batch(self, work: List[Tuple[int, List[int]]]) -> List[np.ndarray]:
        """Append each ``tokens`` to the cache of ``slot`` and return each one's last logits, in
        one backend call where the backend allows. Base: the single cache of ``next_logits``."""
        return [self._forward(tokens) for _, tokens in work]

    def _truncate_slot(self, slot: int, length: int) -> int:
        """``_truncate`` for the cache of ``slot``. Base: the single cache of ``next_logits``."""
        return self._truncate(length)

    def _shares_single_cache(self) -> bool:
        """Whether ``_forward_batch`` evaluates in the cache of ``next_logits`` (a backend with one
        cache): then both keep one record of what it holds."""
        return type(self)._forward_batch is BaseProvider._forward_batch

    def _take_slot(self, key: Hashable, tokens: List[int]) -> _Sequence:
        """Give the new ``key`` the free slot ``claim`` describes."""
        if self._slot_caches is None:
            if self._shares_single_cache():  # one cache: next_logits's, with one record of what it holds
                self._slot_caches = [_Sequence(0, self._cached, self._recent)]
            else:
                self._slot_caches = [_Sequence(slot, [], {}) for slot in range(self.max_sequences)]
        live = set(map(id, self._batch.values()))
        free = [seq for seq in self._slot_caches if id(seq) not in live]
        if not free:
            raise RuntimeError(
                f"{type(self).__name__} holds {self.max_sequences} sequences at most: release() one first"
            )

        def rank(seq: _Sequence) -> Tuple[int, int, int]:
            shared = common_prefix(seq.cached, tokens)
            similar = shared >= self.SIMILARITY * max(len(seq.cached), len(tokens))
            return (shared if similar else 0, -seq.used, -seq.slot)

        seq = max(free, key=rank)
        if not self.prompt_cache:
            self._cut_sequence(seq, 0)
        self._batch[key] = seq
        return seq

    def _cut_sequence(self, seq: _Sequence, length: int) -> None:
        length = self._truncate_slot(seq.slot, length)
        del seq.cached[length:]
        for known in [k for k in seq.recent if k > length]:
            del seq.recent[known]

    # --- the cache bookkeeping shared by next_logits and next_logits_batch -------------------------
    def _checked(self, input_ids: Sequence[int]) -> List[int]:
        tokens = list(input_ids)
        if not tokens:
            raise ValueError("next_logits() needs at least one token")
        if len(tokens) > self.context_length:
            raise ValueError(f"{len(tokens)} tokens do not fit in the context of {self.context_length}")
        return tokens

    @staticmethod
    def _reuse(
        cached: List[int], recent: Dict[int, np.ndarray], tokens: List[int], cut
    ) -> Tuple[Optional[np.ndarray], int]:
        """Keep the longest cached prefix of ``tokens`` (``cut(length)`` drops the rest): returns
        ``(known logits, _)`` for a short rewind, else ``(None, n)`` with ``tokens[n:]`` to evaluate."""
        n = len(cached)
        if not (n < len(tokens) and tokens[:n] == cached):  # not a plain extension: find the shared prefix
            known = BaseProvider._known(cached, recent, tokens, cut)
            if known is not None:
                return known, len(tokens)
            n = common_prefix(cached, tokens)
            cut(min(n, len(tokens) - 1))  # the last token must be evaluated to get its logits
            n = len(cached)
        return None, n

    @staticmethod
    def _known(cached: List[int], recent: Dict[int, np.ndarray], tokens: List[int], cut) -> Optional[np.ndarray]:
        """The logits after ``tokens`` when the cache holds all of them and kept their logits (a
        short rewind: ``cut(len(tokens))`` drops the rest), else None."""
        n = len(tokens)
        if n in recent and n <= len(cached) and common_prefix(cached, tokens) == n:
            cut(n)
            return recent[n].copy()
        return None

    def _remember(self, cached: List[int], recent: Dict[int, np.ndarray], new: List[int], logits: np.ndarray) -> None:
        cached.extend(new)
        recent[len(cached)] = logits.copy()
        for old in [k for k in recent if k <= len(cached) - self.KEEP_LOGITS]:
            del recent[old]

    def crop_cache(self, n: int) -> None:
        """Drop the last ``n`` positions of the cache (the next ``next_logits`` re-evaluates them)."""
        if n < 0:
            raise ValueError(f"crop_cache takes the number of positions to drop (>= 0), got {n}")
        with self._lock:
            self._cut(max(len(self._cached) - n, 0))

    def _sync(self) -> None:
        """Bring the record of what the cache of ``next_logits`` holds up to date (a backend that
        can be used directly, bypassing the provider, overrides it)."""
        return None

    def _cut(self, length: int) -> None:
        length = self._truncate(length)
        del self._cached[length:]
        for known in [k for k in self._recent if k > length]:
            del self._recent[known]

    @property
    def cached_tokens(self) -> List[int]:
        """A copy of the token ids whose keys and values are in the cache."""
        return list(self._cached)

    def reset(self) -> None:
        """Empty the cache of ``next_logits`` and every cache no key of ``next_logits_batch`` holds."""
        with self._lock:
            self._cut(0)
            live = set(map(id, self._batch.values()))
            for seq in self._slot_caches or []:
                if id(seq) not in live:
                    self._cut_sequence(seq, 0)
