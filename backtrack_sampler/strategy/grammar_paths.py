"""What GrammarStrategy knows about the path a constrained generation is on.

- ``DeadEnds``: how much of the model's probability the grammar allowed at each step, where each
  JSON value began (``JsonTrack``), and when and where to rewind out of a dead end.
- ``Closer``: how many tokens the grammar needs at least to be complete, and which token starts
  that shortest way (budget-aware closing).

Both read llguidance's view of the vocabulary (``LLTokenizer``); ``Closer`` walks the live matcher
forward and rolls it back, so it leaves the matcher as it found it.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Set, Tuple

import numpy as np

_STRUCTURE = frozenset(b"{}[],:")
_SPACE = frozenset(b" \t\n\r")
_RANKS: Dict[int, Tuple[Any, np.ndarray, np.ndarray]] = {}
_RANKS_LOCK = threading.Lock()
UNRANKED = np.float32(1e9)


def allowed_mass(logits: np.ndarray, allowed: np.ndarray) -> float:
    """The share of softmax(``logits``) (temperature 1) on the ``allowed`` tokens (a boolean array)."""
    top = float(np.max(logits))
    if not math.isfinite(top):
        return 0.0
    weights = np.exp(logits - np.float32(top))
    total = float(weights.sum())
    return float(np.dot(weights, allowed.view(np.uint8).astype(np.float32))) / total


class JsonTrack:
    """Follows JSON text token by token: which tokens hold a choice of the JSON's shape (anchors: a
    separator, a bracket, a quote, the first character of a number or literal) and which token
    began the string, number or literal a token continues. Rewinds truncate it."""

    def __init__(self) -> None:
        self.states: List[Tuple[bool, bool, Optional[int]]] = [(False, False, None)]  # before token i
        self.anchors: List[int] = []  # positions of the anchor tokens, ascending

    def __len__(self) -> int:
        return len(self.states) - 1

    def push(self, data: bytes) -> None:
        """The next token's bytes."""
        index = len(self)
        in_string, escaped, start = self.states[-1]
        anchor = False
        for byte in data:
            if in_string:
                if escaped:
                    escaped = False
                elif byte == 0x5C:
                    escaped = True
                elif byte == 0x22:
                    in_string, start, anchor = False, None, True
            elif byte == 0x22:
                in_string, start, anchor = True, index, True
            elif byte in _STRUCTURE:
                start, anchor = None, True
            elif byte in _SPACE:
                start = None
            elif start is None:  # a number or a literal begins
                start, anchor = index, True
        self.states.append((in_string, escaped, start))
        if anchor:
            self.anchors.append(index)

    def truncate(self, count: int) -> None:
        """Forget the tokens after the first ``count``."""
        del self.states[count + 1 :]
        while self.anchors and self.anchors[-1] >= count:
            self.anchors.pop()

    def value_start(self, index: int) -> Optional[int]:
        """The token that began the value token ``index`` continues (None: none; ``index`` may be
        ``len(self)``: the value the next token would continue)."""
        return self.states[index][2] if index < len(self.states) else None


class Step(NamedTuple):
    """One position: the allowed mass, whether the grammar left the next bytes free (not forced),
    and the running count and sum of -log(mass) of the losing steps up to and including it."""

    mass: float
    free: bool
    losing: int
    loss: float


class DeadEnds:
    """Watches a constrained generation for dead ends and says where to rewind.

    A step *loses* when it is free (the grammar does not force its bytes) and the grammar allows less
    than ``LOW_MASS`` of the model's probability. A value (a JSON string or number; for another
    grammar, the text since its last free step with a high mass) is a dead end once it has
    ``PATIENCE`` losing steps that lost ``loss`` nats in all: the model keeps wanting what the
    grammar refuses. The rewind goes to the first free token of the value, then (after
    ``max_retries`` there) to the free anchor before it (the separator or quote that opened it), and
    bans the token it took there; at most ``max_rewinds`` per generation. When none is left, the
    value is kept (plain masking) and no longer watched."""

    LOW_MASS = 0.9
    PATIENCE = 3

    def __init__(self, json: bool, loss: float, max_retries: int, max_rewinds: int):
        self.json, self.loss, self.max_retries, self.max_rewinds = json, loss, max_retries, max_rewinds
        self.reset()

    def reset(self) -> None:
        self.steps: List[Step] = []
        self.track = JsonTrack()
        self.avoid: Dict[int, Set[int]] = {}  # position -> tokens a dead end banned there
        self.retries: Dict[int, int] = {}
        self.rewinds = 0
        self.kept: Optional[int] = None  # the value left to plain masking

    def observe(self, position: int, mass: float, free: bool) -> None:
        """The step at ``position``, before its token is drawn."""
        steps = self.steps
        del steps[position:]
        while len(steps) < position:  # a token pushed without a distribution of its own
            steps.append(Step(1.0, False, *self._totals(len(steps))))
        losing = free and mass < self.LOW_MASS
        before = self._totals(position)
        loss = -math.log(max(mass, 1e-12)) if losing else 0.0
        steps.append(Step(mass, free, before[0] + losing, before[1] + loss))

    def follow(self, tokens: List[int], data: Callable[[int], bytes]) -> None:
        """Read the tokens the track has not seen (``data``: a token's bytes)."""
        if self.json:
            for token in tokens[len(self.track) :]:
                self.track.push(data(token))

    def truncate(self, position: int) -> None:
        """The text was cut back to ``position`` tokens."""
        del self.steps[position:]
        self.track.truncate(position)
        for state in (self.avoid, self.retries):
            for later in [p for p in state if p > position]:
                del state[later]
        if self.kept is not None and self.kept >= position:
            self.kept = None

    def banned(self, position: int) -> Set[int]:
        return self.avoid.get(position, set())

    def target(self, tokens: List[int], keep: int) -> Optional[Tuple[int, str]]:
        """After ``tokens[-1]``: ``(position, why)`` to rewind to (its token is banned there), or None."""
        last = len(tokens) - 1
        start = self._value_start(last)
        if start is None or start == self.kept or last >= len(self.steps):
            return None
        before = self._totals(start + 1)
        losing, loss = self.steps[last].losing - before[0], self.steps[last].loss - before[1]
        if losing < self.PATIENCE or loss < self.loss:
            return None
        steps = self.steps
        first = next((i for i in range(start, last + 1) if self._free(i)), None)
        if self.json:
            anchor = next((a for a in reversed(self.track.anchors) if a < start and self._free(a)), None)
        else:
            anchor = next((i for i in range(start - 1, -1, -1) if steps[i].free), None)
        for position in (first, anchor):
            if position is None or position < keep or self.retries.get(position, 0) >= self.max_retries:
                continue
            if self.rewinds >= self.max_rewinds:
                break
            self.retries[position] = self.retries.get(position, 0) + 1
            self.rewinds += 1
            self.avoid.setdefault(position, set()).add(tokens[position])
            return position, f"dead end: it refused {loss:.1f} nats of the model's probability in {losing} steps"
        self.kept = start
        return None

    def hold(self, length: int) -> int:
        """The earliest position a dead end of the text so far may rewind to (tokens before it may
        be final): the free anchor before the value being written, or before the text's end."""
        start = self._value_start(length)
        ref = length if start is None else start
        steps = self.steps
        if self.json:
            return next((a for a in reversed(self.track.anchors) if a < ref and self._free(a)), 0)
        return next((i for i in range(min(ref, len(steps)) - 1, -1, -1) if steps[i].free), 0)

    def _value_start(self, index: int) -> Optional[int]:
        if self.json:
            return self.track.value_start(index)
        # another grammar: the text since the last free step the grammar did not make lose
        steps = self.steps
        for i in range(min(index, len(steps) - 1), -1, -1):
            if steps[i].free and steps[i].mass >= self.LOW_MASS:
                return i
        return 0 if steps else None

    def _free(self, position: int) -> bool:
        return position < len(self.steps) and self.steps[position].free

    def _totals(self, position: int) -> Tuple[int, float]:
        """Losing steps and their loss before ``position``."""
        if position <= 0 or not self.steps:
            return 0, 0.0
        step = self.steps[min(position, len(self.steps)) - 1]
        return step.losing, step.loss


def closing_ranks(tokenizer: Any) -> Tuple[np.ndarray, np.ndarray]:
    """``(ranks, order)``: a rank per token (lower first) for the shortest way to complete a JSON
    text: quotes (with closing brackets), closing brackets, separators, then short values (``0``,
    ``""``, ``[]``, ``true``...) and opening brackets, digits, other text (longer first within each kind, fewer
    spaces first); whitespace and special tokens are never chosen (``UNRANKED``); ``order``: the
    ranked tokens, best first. Cached per tokenizer."""
    with _RANKS_LOCK:
        found = _RANKS.get(id(tokenizer))
        if found is not None and found[0] is tokenizer:
            return found[1], found[2]
    size = tokenizer.vocab_size
    ranks = np.full(size, UNRANKED, dtype=np.float32)
    for token in range(size):
        if tokenizer.is_special_token(token):
            continue
        text = tokenizer.decode_bytes([token]).decode("utf-8", "replace")
        core = text.replace(" ", "")
        if not core or core.isspace():
            continue
        if set(core) <= set('"]}'):
            kind = 0 if '"' in core else 1  # a quote first: inside a string a bracket is only text
        elif set(core) <= set(',:"'):
            kind = 2  # before values: a number that may end is ended
        elif core in ("0", "1", '""', "[]", "{}", "null", "true", "false") or set(core) <= set('"[{'):
            kind = 3
        elif core.isdigit():
            kind = 4
        else:
            kind = 5
        zeros = not core.strip("0")  # after "-" or "0." only a nonzero digit can end a number
        ranks[token] = kind * 1000 - 2 * min(len(core), 400) + (len(text) - len(core)) + zeros
    order = np.argsort(ranks, kind="stable")[: int(np.sum(ranks < UNRANKED))]
    with _RANKS_LOCK:
        if len(_RANKS) >= 8:
            _RANKS.pop(next(iter(_RANKS)))
        _RANKS[id(tokenizer)] = (tokenizer, ranks, order)
    return ranks, order


class Closer:
    """The fewest tokens the grammar needs to be complete, as a greedy walk of the live matcher
    (forced tokens, else the allowed token of lowest ``closing_ranks``) rolled back afterwards: an
    upper bound, exact for the usual JSON (close the string and the brackets; a required key is
    forced, its value the shortest one). ``first``: the first token of the last walk. ``recover``
    is called when the matcher cannot roll back (it must restore the matcher's state)."""

    def __init__(self, matcher: Any, tokenizer: Any, recover: Callable[[], None]):
        self.matcher, self.recover = matcher, recover
        self.order = closing_ranks(tokenizer)[1]
        self._bitmask = np.zeros((tokenizer.vocab_size + 31) // 32, dtype=np.int32)
        self.first: Optional[int] = None

    def cost(self, cap: int) -> Optional[int]:
        """Tokens to a complete text from the matcher's state (0: complete now); None when the
        walk finds none within ``cap`` tokens (``first`` is still the way it began)."""
        found, walked = self._walk(cap)
        self._undo(walked)
        return found

    def cost_after(self, token: int, cap: int) -> Optional[int]:
        """``cost`` once ``token`` is taken (None: the grammar refuses it, or no end within ``cap``)."""
        matcher = self.matcher
        if matcher.validate_tokens([token]) != 1:
            return None
        if not matcher.consume_token(token):
            self.recover()
            return None
        found, walked = self._walk(cap)
        self._undo(walked + 1)
        return found

    def _walk(self, cap: int) -> Tuple[Optional[int], int]:
        """``(cost or None, tokens consumed)``: the greedy walk, not rolled back."""
        matcher, walked = self.matcher, 0
        self.first = None
        while not matcher.is_accepting():
            if walked >= cap or matcher.is_error():
                return None, walked
            forced = matcher.compute_ff_tokens()
            steps = forced[: cap - walked] if forced else [self._cheapest()]
            if steps[0] is None or not matcher.consume_tokens(steps):
                return None, walked
            if self.first is None:
                self.first = steps[0]
            walked += len(steps)
        return walked, walked

    def _undo(self, count: int) -> None:
        matcher = self.matcher
        if matcher.is_error() or (count and not matcher.rollback(count)) or matcher.is_error():
            self.recover()

    def _cheapest(self) -> Optional[int]:
        """The allowed token of lowest rank (None: none is ranked)."""
        bitmask = self._bitmask
        self.matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)
        order = self.order
        for part in (order[:4096], order[4096:]):
            if len(part):
                hits = (bitmask[part >> 5] >> (part & 31)) & 1
                found = int(np.argmax(hits))
                if hits[found]:
                    return int(part[found])
        return None
