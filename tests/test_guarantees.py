"""Property tests of the guarantees the README states (issue 19), with hypothesis on the FakeProvider.

Every case is a small world: a vocabulary of pieces over a tiny alphabet (so the fake model, whose
distribution is a pseudo-random function of the token sequence, writes the banned phrases all the
time), a ban list over the same alphabet, a model seed and a sampling seed. The checks are written
independently of the library (plain substring / ``re`` searches on ``decode(tokens)``), and every
property also counts how many cases really rewound, so that it cannot pass vacuously.

The cases are derandomized (the same examples on every run, in CI too) and shrink to a minimal
failing world. ``BACKTRACK_PROPERTY_SCALE=10`` runs ten times as many examples (a deeper search).

Only the 4.0 API is used for the ban properties (``AntiSlopStrategy(provider, slops, ...)``,
``BacktrackSampler(provider, strategy).generate(...)``), so they also run against older trees.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, BaseStrategy, ChainStrategy
from backtrack_sampler.core.batch import BatchScheduler
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.server.app import StopFilter

SCALE = float(os.environ.get("BACKTRACK_PROPERTY_SCALE", "1"))


def examples(n: int) -> settings:
    """Deterministic settings: the same ``n`` (x SCALE) examples on every run, no example database."""
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# --- the fake worlds -----------------------------------------------------------------------------
ALPHABETS = {
    "ascii": "ab ",  # three characters: phrases of 2-4 of them come up every few tokens
    "case": "aAbB ",  # letter case (case-insensitive and case-sensitive bans)
    "unicode": "aé日本🙂 ",  # multi-byte characters (2, 3 and 4 UTF-8 bytes)
}
SAFE = "\n"  # in every vocabulary, in no phrase and matched by no generated regex: a ban can always be held
PAD, EOS, BOS = 0, 1, 2


class Model(FakeProvider):
    """A FakeProvider over ``pieces`` (plus the safe token) that never writes <pad>/<bos> and
    rarely EOS (``eos_logit`` is added to its logit; -inf: never).

    byte_level: the pieces are UTF-8 byte strings, as a byte-level tokenizer has them; multi-byte
    characters are also split into byte tokens (and pieces cut inside a character), and the text is
    ``bytes.decode("utf-8", "replace")``. The model then writes valid UTF-8 only (like a trained
    model: tokens that would make an invalid sequence get -inf), so a character may take several
    tokens and a token may end inside a character."""

    def __init__(
        self,
        pieces: Sequence[str],
        seed: int,
        byte_level: bool = False,
        eos_logit: float = -4.0,
        cuts: Sequence[int] = (),
    ):
        self.byte_level = byte_level
        raw = [p.encode() for p in pieces]
        if byte_level:  # every byte of a multi-byte character alone, and each piece cut once inside
            for piece, cut in zip(list(raw), list(cuts) + [1] * len(raw)):
                if len(piece) > 1 and any(b >= 0x80 for b in piece):
                    raw += [piece[: cut % (len(piece) - 1) + 1], piece[cut % (len(piece) - 1) + 1 :]]
                    raw += [bytes([b]) for b in piece if b >= 0x80]
        raw = list(dict.fromkeys(r for r in raw if r and r != SAFE.encode()))
        self.raw = [b"", b"", b"", SAFE.encode()] + raw
        if byte_level:
            vocab = ["<pad>", "<eos>", "<bos>"] + [r.decode("latin-1") for r in self.raw[3:]]
        else:
            vocab = ["<pad>", "<eos>", "<bos>"] + [r.decode() for r in self.raw[3:]]
        super().__init__(vocab=vocab, seed=seed)
        self.eos_logit = eos_logit

    def decode(self, tokens: Sequence[int]) -> str:
        if not self.byte_level:
            return super().decode(tokens)
        return b"".join(self.raw[t] for t in tokens).decode("utf-8", "replace")

    def whole_text(self, tokens: Sequence[int]) -> str:
        """``decode(tokens)`` without an unfinished character at the end (the token limit can cut a
        character in two: its U+FFFD is not text the strategy could see)."""
        data = b"".join(self.raw[t] for t in tokens)
        return data[: len(data) - len(_pending_bytes(data))].decode("utf-8", "replace")

    def committed_text(self, tokens: Sequence[int]) -> str:
        """The text of the tokens up to the last one that ends a character: without the tokens the
        token limit left inside an unfinished character (checked by their own test)."""
        tokens = list(tokens)
        while tokens and _pending_bytes(b"".join(self.raw[t] for t in tokens)):
            tokens.pop()
        return self.decode(tokens)

    def logits_for(self, tokens: Sequence[int]) -> np.ndarray:
        row = super().logits_for(tokens).copy()
        row[PAD] = row[BOS] = -np.inf
        row[EOS] += self.eos_logit
        if self.byte_level:
            tail = _pending_bytes(b"".join(self.raw[t] for t in tokens))
            for token in range(3, len(self.raw)):
                if not _valid_utf8_prefix(tail + self.raw[token]):
                    row[token] = -np.inf
            if tail:
                row[EOS] = -np.inf  # no EOS in the middle of a character
        return row


def _pending_bytes(data: bytes) -> bytes:
    """The bytes of an unfinished character at the end of ``data`` (b"" when it ends whole)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return b""
        if byte >= 0xC0:  # a lead byte: its character needs 2, 3 or 4 bytes
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data[-back:] if back < need else b""
    return b""


def _valid_utf8_prefix(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError as error:
        return error.reason == "unexpected end of data"  # only the last character is unfinished


@dataclass
class World:
    """One case: the vocabulary pieces, the bans and the seeds (printed when a property fails)."""

    pieces: List[str]
    phrases: List[str]
    model_seed: int
    seed: int
    case_sensitive: bool = False
    whole_words: bool = False
    byte_level: bool = False
    cuts: List[int] = field(default_factory=list)
    regexes: List[str] = field(default_factory=list)
    regex_window: int = 100
    keep_index_buffer: int = 0
    temperature: float = 1.0
    max_new_tokens: int = 40

    def model(self, eos_logit: float = -4.0) -> Model:
        return Model(self.pieces, self.model_seed, self.byte_level, eos_logit, self.cuts)

    def antislop(self, model: Model, **kwargs) -> AntiSlopStrategy:
        options = dict(
            case_sensitive=self.case_sensitive,
            whole_words=self.whole_words,
            keep_index_buffer=self.keep_index_buffer,
            max_retries=len(model.vocab) + 1,
        )
        if self.regexes:
            options.update(regexes=list(self.regexes), regex_window=self.regex_window)
        options.update(kwargs)
        return AntiSlopStrategy(model, list(self.phrases), **options)


@st.composite
def phrase_lists(draw, alphabet: str, min_size: int = 1) -> List[str]:
    """Random phrases over ``alphabet``, plus (sometimes) a prefix of one and a phrase that starts with
    the end of another (the overlap of the issue's "was a" / "a in")."""
    text = st.text(alphabet, min_size=1, max_size=4)
    phrases = draw(st.lists(text, min_size=min_size, max_size=4))
    if phrases and draw(st.booleans()):
        first = phrases[0]
        phrases.append(first[: draw(st.integers(1, len(first)))])  # a prefix of another phrase
    if phrases and draw(st.booleans()):
        last = phrases[-1]
        phrases.append(last[-draw(st.integers(1, len(last))) :] + draw(text))  # overlaps another's end
    return list(dict.fromkeys(p for p in phrases if p.strip() or p))


@st.composite
def worlds(
    draw,
    alphabets: Sequence[str] = tuple(ALPHABETS),
    byte_level: Optional[bool] = None,
    whole_words: Optional[bool] = None,
    case_sensitive: Optional[bool] = None,
    max_new_tokens: Tuple[int, int] = (10, 40),
) -> World:
    alphabet = ALPHABETS[draw(st.sampled_from(alphabets))]
    pieces = draw(st.lists(st.text(alphabet, min_size=1, max_size=3), min_size=2, max_size=8, unique=True))
    byte = draw(st.booleans()) if byte_level is None else byte_level
    cuts = draw(st.lists(st.integers(0, 5), max_size=8)) if byte and any(ord(c) > 127 for c in "".join(pieces)) else []
    return World(
        pieces=pieces,
        phrases=draw(phrase_lists(alphabet)),
        model_seed=draw(st.integers(0, 2**16)),
        seed=draw(st.integers(0, 2**16)),
        case_sensitive=draw(st.booleans()) if case_sensitive is None else case_sensitive,
        whole_words=draw(st.booleans()) if whole_words is None else whole_words,
        byte_level=byte,
        cuts=cuts,
        keep_index_buffer=draw(st.sampled_from([0, 0, 1, 3])),
        temperature=draw(st.sampled_from([1.0, 1.0, 0.7, 1.5, 0.0])),
        max_new_tokens=draw(st.integers(*max_new_tokens)),
    )


@st.composite
def regex_patterns(draw, alphabet: str) -> Tuple[str, int]:
    """A pattern in the syntax RE2 and Python's ``re`` agree on that cannot match the empty string,
    and the longest text it can match (in characters)."""
    char = st.sampled_from(alphabet)
    atom = st.one_of(
        char.map(lambda c: (c, 1, True)),
        st.tuples(char, char).map(lambda p: (f"[{p[0]}{p[1]}]", 1, True)),
        st.just((".", 1, True)),
        char.map(lambda c: (f"{c}?", 1, False)),
        char.map(lambda c: (f"{c}{{1,3}}", 3, True)),
        st.tuples(st.text(alphabet, min_size=1, max_size=2), st.text(alphabet, min_size=1, max_size=2)).map(
            lambda p: (f"(?:{p[0]}|{p[1]})", max(map(len, p)), True)
        ),
    )
    atoms = draw(st.lists(atom, min_size=1, max_size=4))
    if not any(required for _, _, required in atoms):
        atoms.insert(0, (alphabet[0], 1, True))
    return "".join(text for text, _, _ in atoms), sum(length for _, length, _ in atoms)


# --- the oracle: plain searches on the final text -----------------------------------------------
def _word(char: str) -> bool:
    return char.isalnum() or char == "_"


def _edge(text: str, i: int) -> bool:
    """Whether position ``i`` is a word boundary (not between two letters/digits)."""
    return i == 0 or i == len(text) or not (_word(text[i - 1]) and _word(text[i]))


def banned_hits(
    text: str, phrases: Sequence[str], case_sensitive: bool = False, whole_words: bool = False, end_is_edge: bool = True
) -> List[Tuple[str, int]]:
    """Every (phrase, offset) where a banned phrase occurs in ``text`` (overlapping occurrences too);
    with ``whole_words`` only occurrences not glued to letters or digits on either side (the end of
    the text counts as a boundary unless ``end_is_edge`` is False)."""
    haystack = text if case_sensitive else text.lower()
    hits = []
    for phrase in phrases:
        needle = phrase if case_sensitive else phrase.lower()
        start = haystack.find(needle)
        while start >= 0:
            end = start + len(needle)
            if not whole_words or (
                _edge(haystack, start) and _edge(haystack, end) and (end_is_edge or end < len(haystack))
            ):
                hits.append((phrase, start))
            start = haystack.find(needle, start + 1)
    return hits


def regex_hits(text: str, patterns: Sequence[str], case_sensitive: bool = False) -> List[Tuple[str, str]]:
    flags = 0 if case_sensitive else re.IGNORECASE
    return [(p, m.group()) for p in patterns for m in [re.search(p, text, flags)] if m]


# --- running a generation --------------------------------------------------------------------------
@dataclass
class Run:
    tokens: List[int]
    text: str  # decode(tokens)
    whole: str  # without an unfinished character at the end
    committed: str  # without the tokens that end inside an unfinished character at the end
    stats: object
    early_rewinds: List[Tuple[int, int]]  # (rewind position, tokens already delivered) with position < delivered
    accepted: List[Tuple[int, str]]


def generate(model: FakeProvider, strategy: BaseStrategy, world: World, **kwargs) -> Run:
    """``BacktrackSampler(model, strategy).generate`` from [<bos>], consumed token by token, checking
    every rewind against the tokens already delivered."""
    sampler = BacktrackSampler(model, strategy)
    delivered: List[int] = []
    early: List[Tuple[int, int]] = []

    def on_rewind(event):
        if event.position < len(delivered):
            early.append((event.position, len(delivered)))

    for token in sampler.generate(
        [BOS],
        max_new_tokens=world.max_new_tokens,
        temperature=world.temperature,
        seed=world.seed,
        on_rewind=on_rewind,
        **kwargs,
    ):
        delivered.append(token)
    text = model.decode(delivered)
    if isinstance(model, Model):
        return Run(
            delivered, text, model.whole_text(delivered), model.committed_text(delivered), sampler.stats, early, []
        )
    return Run(delivered, text, text, text, sampler.stats, early, [])


class Tally:
    """Counts cases per outcome, to assert that a property was really exercised."""

    def __init__(self):
        self.counts: Dict[str, int] = {}

    def add(self, **flags: bool) -> None:
        self.counts["cases"] = self.counts.get("cases", 0) + 1
        for name, value in flags.items():
            self.counts[name] = self.counts.get(name, 0) + bool(value)

    def __repr__(self) -> str:
        return f"Tally({self.counts})"

    def share(self, name: str) -> float:
        return self.counts.get(name, 0) / max(self.counts.get("cases", 0), 1)


def finish(stats) -> str:
    return f"finish_reason={stats.finish_reason!r} constraint={getattr(stats, 'constraint', None)!r}"


def check_bans(
    world: World,
    run: Run,
    phrases=None,
    case_sensitive=None,
    whole_words=None,
    regexes=None,
    end_is_edge: Optional[bool] = None,
) -> None:
    """No banned phrase or regex in the final text. By default what the token limit may leave
    unchecked is left out (a whole-word match that ends the text counts only when EOS ended it; the
    tokens of an unfinished last character are not searched): ``test_bans_hold_when_the_token_limit_
    ends_the_text`` checks that part (``end_is_edge=True``: all of the text but a cut character's U+FFFD)."""
    phrases = world.phrases if phrases is None else phrases
    cs = world.case_sensitive if case_sensitive is None else case_sensitive
    ww = world.whole_words if whole_words is None else whole_words
    if end_is_edge is None:
        end_is_edge = run.stats.finish_reason == "stop"
        text = run.whole if end_is_edge else run.committed
    else:
        text = run.whole
    hits = banned_hits(text, phrases, cs, ww, end_is_edge)
    hits += regex_hits(text, world.regexes if regexes is None else regexes, cs)
    note(f"final text {run.text!r}; {run.stats.rewinds} rewinds; {finish(run.stats)}")
    assert not hits, f"banned text in the final text {run.text!r}: {hits} ({finish(run.stats)})"


# --- properties ---------------------------------------------------------------------------------
def test_hard_banned_phrases_never_appear():
    """Case-insensitive, case-sensitive and whole-word bans; overlapping phrases and prefixes of
    others; phrases shorter than a token and spanning tokens; multi-byte characters, also split
    over byte tokens."""
    tally = Tally()

    @examples(3000)
    @given(world=worlds())
    def prop(world):
        model = world.model()
        run = generate(model, world.antislop(model), world)
        check_bans(world, run)
        tally.add(rewound=run.stats.rewinds > 0, whole=world.whole_words, bytes_=world.byte_level)

    prop()
    print(tally)  # with -s: how many cases rewound (and other outcomes)
    assert tally.share("rewound") > 0.4, tally.counts


def test_bans_hold_when_the_token_limit_ends_the_text():
    """When ``max_new_tokens`` ends the text, every delivered token was matched: a whole-word ban is
    confirmed by the character after it or by EOS, so a banned word that the limit leaves at the very
    end must not be delivered (the text ends there: it is a whole word); and the text of a token that
    ends inside a multi-byte character (a byte-level tokenizer's " \xe2\x80") is matched too."""
    tally = Tally()

    @st.composite
    def cut_worlds(draw):
        if draw(st.booleans()):
            return draw(worlds(whole_words=True, byte_level=False, max_new_tokens=(3, 25)))
        return draw(worlds(alphabets=("unicode",), byte_level=True, max_new_tokens=(3, 25)))

    @examples(800)
    @given(world=cut_worlds())
    def prop(world):
        model = world.model()
        run = generate(model, world.antislop(model), world)
        check_bans(world, run, end_is_edge=True)
        tally.add(rewound=run.stats.rewinds > 0, length=run.stats.finish_reason == "length")

    prop()
    print(tally)  # with -s: how many cases rewound (and other outcomes)
    assert tally.share("rewound") > 0.3 and tally.share("length") > 0.5, tally.counts


def test_hard_banned_regexes_never_appear():
    tally = Tally()

    @st.composite
    def regex_worlds(draw):
        world = draw(worlds(whole_words=False))
        alphabet = ALPHABETS[
            "unicode"
            if any(ord(c) > 127 for c in "".join(world.pieces))
            else "case"
            if any(c.isupper() for c in "".join(world.pieces))
            else "ascii"
        ]
        patterns = draw(st.lists(regex_patterns(alphabet), min_size=1, max_size=3))
        world.regexes = [p for p, _ in patterns]
        world.regex_window = max(n for _, n in patterns) + draw(st.integers(0, 4))  # a match may span the window
        if draw(st.booleans()):
            world.phrases = []  # regexes alone
        return world

    @examples(1200)
    @given(world=regex_worlds())
    def prop(world):
        model = world.model()
        run = generate(model, world.antislop(model), world)
        check_bans(world, run)
        tally.add(rewound=run.stats.rewinds > 0)

    prop()
    print(tally)  # with -s: how many cases rewound (and other outcomes)
    assert tally.share("rewound") > 0.4, tally.counts


class Chaos(BaseStrategy):
    """Now and then takes back its last 1-3 tokens (a pseudo-random function of the tokens and of
    how often it was called): rewinds that come from another member of a chain. It holds back its
    last 3 tokens and never rewinds a token it made final."""

    HOLD = 3

    def __init__(self, salt: int = 0, every: int = 6):
        self.salt, self.every = salt, every
        self.reset()

    def reset(self) -> None:
        self.keep, self.calls = 0, 0
        self.rewind_reason = None

    def backtrack(self, continuation_tokens: List[int]) -> List[int]:
        self.calls += 1
        tokens = continuation_tokens
        h = zlib.crc32(np.asarray([self.salt, self.calls, *tokens], dtype=np.int64).tobytes())
        if len(tokens) > self.keep and h % self.every == 0:
            tokens = tokens[: max(self.keep, len(tokens) - 1 - (h >> 8) % 3)]
            self.rewind_reason = "chaos"
        self.keep = max(self.keep, len(tokens) - self.HOLD)
        return tokens

    def get_keep_index(self) -> int:
        return self.keep


def test_final_tokens_are_never_rewound():
    """A RewindEvent's position is never below the tokens already delivered: with AntiSlop alone
    (phrases, regexes, keep_index_buffer) and in a chain with a strategy that rewinds by itself."""
    tally = Tally()

    @examples(1000)
    @given(world=worlds(), chaos=st.booleans(), regex=st.booleans(), salt=st.integers(0, 1000))
    def prop(world, chaos, regex, salt):
        model = world.model()
        if regex:
            world.regexes, world.regex_window = ["a[b ]{1,3}a"], 8
        strategy = world.antislop(model)
        if chaos:
            strategy = ChainStrategy([strategy, Chaos(salt)])
        run = generate(model, strategy, world)
        note(f"final text {run.text!r}; rewinds {[(e.position, e.text) for e in run.stats.events]}")
        assert not run.early_rewinds, f"rewound final tokens: (position, delivered) {run.early_rewinds}"
        tally.add(rewound=run.stats.rewinds > 0)

    prop()
    print(tally)  # with -s: how many cases rewound (and other outcomes)
    assert tally.share("rewound") > 0.4, tally.counts


def test_generate_text_equals_decode_of_generate():
    tally = Tally()

    @examples(800)
    @given(world=worlds(), chaos=st.booleans())
    def prop(world, chaos):
        model = world.model()
        texts = []
        for stream in ("tokens", "text"):
            strategy = world.antislop(model)
            if chaos:
                strategy = ChainStrategy([strategy, Chaos()])
            sampler = BacktrackSampler(model, strategy)
            kwargs = dict(max_new_tokens=world.max_new_tokens, temperature=world.temperature, seed=world.seed)
            if stream == "tokens":
                texts.append(model.decode(list(sampler.generate([BOS], **kwargs))))
            else:
                texts.append("".join(sampler.generate_text([BOS], **kwargs)))
        assert texts[1] == texts[0]
        tally.add(rewound=sampler.stats.rewinds > 0, bytes_=world.byte_level)

    prop()
    print(tally)  # with -s: how many cases rewound (and other outcomes)
    assert tally.share("rewound") > 0.4, tally.counts


def test_chain_holds_each_members_guarantee():
    """Two AntiSlop strategies with different ban lists and modes, plus a strategy that rewinds by
    itself: each member's bans hold in the chain's final text."""
    tally = Tally()

    @st.composite
    def chains(draw):
        world = draw(worlds(alphabets=("ascii", "case")))
        other = draw(phrase_lists(ALPHABETS["case"]))
        return world, other, draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 1000))

    @examples(800)
    @given(case=chains())
    def prop(case):
        world, other, other_cs, other_ww, salt = case
        model = world.model()
        first = world.antislop(model)
        second = AntiSlopStrategy(
            model, other, case_sensitive=other_cs, whole_words=other_ww, max_retries=len(model.vocab) + 1
        )
        run = generate(model, ChainStrategy([first, second, Chaos(salt)]), world)
        check_bans(world, run)
        check_bans(world, run, phrases=other, case_sensitive=other_cs, whole_words=other_ww)
        assert not run.early_rewinds, run.early_rewinds
        tally.add(rewound=run.stats.rewinds > 0)

    prop()
    print(tally)  # with -s: how many cases rewound (and other outcomes)
    assert tally.share("rewound") > 0.4, tally.counts


def test_batch_gives_the_single_drivers_final_text():
    """BatchScheduler (one backend call per step for every running generation, each in its own
    cache slot) delivers what BacktrackSampler delivers for the same seed: the fake provider is exact."""
    tally = Tally()

    @examples(400)
    @given(
        world=worlds(),
        seeds=st.lists(st.integers(0, 2**16), min_size=1, max_size=5),
        parallel=st.integers(1, 4),
        step_tokens=st.sampled_from([4, 16, 256]),
        chaos=st.booleans(),
    )
    def prop(world, seeds, parallel, step_tokens, chaos):
        model = world.model()

        def strategy(salt):
            antislop = world.antislop(model)
            return ChainStrategy([antislop, Chaos(salt)]) if chaos else antislop

        scheduler = BatchScheduler(model, parallel=parallel, step_tokens=step_tokens)
        jobs = [
            scheduler.submit(
                [BOS], strategy(i), max_new_tokens=world.max_new_tokens, temperature=world.temperature, seed=seed
            )
            for i, seed in enumerate(seeds)
        ]
        for _ in scheduler.run():
            pass
        for i, (job, seed) in enumerate(zip(jobs, seeds)):
            assert job.error is None, job.error
            sampler = BacktrackSampler(model, strategy(i))
            single = list(
                sampler.generate([BOS], max_new_tokens=world.max_new_tokens, temperature=world.temperature, seed=seed)
            )
            assert job.tokens == single, (model.decode(job.tokens), model.decode(single))
            assert job.stats.finish_reason == sampler.stats.finish_reason
            assert job.stats.rewinds == sampler.stats.rewinds
            tally.add(rewound=sampler.stats.rewinds > 0)

    prop()
    print(tally)  # with -s: how many cases rewound (and other outcomes)
    assert tally.share("rewound") > 0.4, tally.counts


def test_unholdable_bans_end_with_constraint_or_hold():
    """No safe token and no EOS: every character of the vocabulary may be banned, with few retries.
    The generation either holds every ban or ends with finish_reason "constraint" (naming
    AntiSlopStrategy) — never delivers a banned phrase as "stop" or "length"."""
    tally = Tally()

    @st.composite
    def hopeless(draw):
        world = draw(worlds(byte_level=False))
        alphabet = sorted(set("".join(world.pieces)))
        if draw(st.booleans()):  # every character banned: nothing can be written
            world.phrases = list(dict.fromkeys(world.phrases + alphabet))
        world.keep_index_buffer = draw(st.sampled_from([0, 1, 3]))
        return world, draw(st.integers(0, 3)), draw(st.sampled_from([None, 50]))

    class NoSafeToken(Model):
        def logits_for(self, tokens):
            row = super().logits_for(tokens)
            row[3] = -np.inf  # the safe token
            return row

    @examples(1000)
    @given(case=hopeless())
    def prop(case):
        world, retries, budget = case
        model = NoSafeToken(world.pieces, world.model_seed, eos_logit=-np.inf)
        strategy = world.antislop(model, max_retries=retries)
        run = generate(model, strategy, world, max_rewound_tokens=budget)
        assert run.stats.finish_reason in ("stop", "length", "constraint"), finish(run.stats)
        if run.stats.finish_reason == "constraint":
            assert "AntiSlopStrategy" in (run.stats.constraint or ""), finish(run.stats)
        check_bans(world, run)
        assert not run.early_rewinds, run.early_rewinds
        tally.add(constraint=run.stats.finish_reason == "constraint", rewound=run.stats.rewinds > 0)

    prop()
    print(tally)  # with -s: how many cases rewound (and other outcomes)
    assert tally.share("rewound") > 0.4 and tally.share("constraint") > 0.2, tally.counts


# --- stop strings ----------------------------------------------------------------------------------
def expected_stop_output(pieces: Sequence[str], stops: Sequence[str]) -> Tuple[str, bool]:
    """What a stream cut before the first stop string sends: at the first piece after which the text
    holds a stop string, the text before the earliest one; else all of it."""
    text = ""
    for piece in pieces:
        text += piece
        starts = [text.find(s) for s in stops if s and s in text]
        if starts:
            return text[: min(starts)], True
    return text, False


def test_stop_filter_never_lets_a_stop_string_through():
    pieces_ = st.lists(st.text("ab\n", max_size=4), max_size=12)
    stops_ = st.lists(st.text("ab\n", min_size=1, max_size=3), min_size=1, max_size=3)

    @examples(2000)
    @given(pieces=pieces_, stops=stops_)
    def prop(pieces, stops):
        stop_filter = StopFilter(stops)
        sent, hit = [], False
        for piece in pieces:
            text, hit = stop_filter.push(piece)
            sent.append(text)
            assert not any(s in "".join(sent) for s in stops), sent
            if hit:
                break
        if not hit:
            sent.append(stop_filter.flush())
        assert ("".join(sent), hit) == expected_stop_output(pieces, stops)

    prop()


@pytest.fixture(scope="module")
def fake_server():
    """The OpenAI-compatible app on a FakeProvider over a tiny vocabulary, in-process (TestClient)."""
    from starlette.testclient import TestClient

    from backtrack_sampler.server.app import Engine, create_app

    model = Model(["a", "b", " ", "ab", "ba ", "a b"], seed=3)
    engine = Engine(model, "fake")
    with TestClient(create_app(engine)) as client:
        yield model, client
    engine.close()


def test_server_stop_strings_and_bans_never_appear(fake_server):
    """Through the server (POST /v1/completions, streamed and not): the text holds no stop string
    and no banned string, and it is the generation's text cut before the first stop string."""
    model, client = fake_server
    tally = Tally()
    text_ = st.text("ab ", min_size=1, max_size=3)

    @examples(200)
    @given(
        stops=st.lists(text_, min_size=1, max_size=3),
        bans=st.lists(text_, max_size=3),
        seed=st.integers(0, 2**16),
        stream=st.booleans(),
    )
    def prop(stops, bans, seed, stream):
        body = {"model": "fake", "prompt": [BOS], "max_tokens": 30, "seed": seed, "stop": stops}
        if bans:
            body["banned_strings"] = bans
        if stream:
            body["stream"] = True
            with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200, response.read()
                chunks = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            import json

            events = [json.loads(c) for c in chunks if c != "[DONE]"]
            text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
            reasons = [e["choices"][0]["finish_reason"] for e in events if e.get("choices")]
            reason = next((r for r in reversed(reasons) if r), None)
        else:
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            text, reason = choice["text"], choice["finish_reason"]
        note(f"text {text!r} finish_reason {reason!r}")
        assert not [s for s in stops if s in text], text
        assert not banned_hits(text, bans), text
        # the same generation without stop strings: the text is cut right before a stop string,
        # no later than the end of the first stop string to be completed
        unstopped = dict(body, stop=None, stream=False)
        full = client.post("/v1/completions", json=unstopped).json()["choices"][0]["text"]
        ends = [full.find(s) + len(s) for s in stops if s in full]
        cut = min(ends, default=-1)
        if cut >= 0:
            assert reason == "stop" and full.startswith(text), (text, full)
            assert len(text) < cut and any(full[len(text) :].startswith(s) for s in stops), (text, full)
        else:
            assert text == full, (text, full)
        tally.add(stopped=cut >= 0)

    prop()
    print(tally)  # with -s: how many cases rewound (and other outcomes)
    assert tally.share("stopped") > 0.2, tally.counts


# --- the issue's minimal case, on the real chat model's tokenizer -----------------------------------
@pytest.mark.model
def test_issue_19_match_starting_in_final_text_is_not_dropped():
    """The keep index used to advance from the newest token: " was" made "una" final, then " was a"
    was rewound to " was", and " Inn" completed "a in" across the final "una": it was ignored."""
    from backtrack_sampler.provider.models import load_provider

    provider = load_provider("llamacpp", "smollm2-135m-instruct", None, None)
    strategy = AntiSlopStrategy(provider, ["a in", "was a"])
    tokens: List[int] = []
    final = 0
    for piece in ["The El'Luna", " was", " a", " Inn"]:
        for token in provider.encode(piece, add_special_tokens=False):
            kept = strategy.backtrack(tokens + [token])
            assert len(kept) >= final, f"rewound to {len(kept)} below the keep index {final}"
            tokens = kept
            final = max(final, min(strategy.get_keep_index(), len(tokens)))
    text = provider.decode(tokens)
    assert "a in" not in text.lower() and "was a" not in text.lower(), repr(text)
