"""Strategy API v2: declared capabilities, on_rewind for every strategy, ConstraintError and the
"constraint" finish reason, TextView. The fake provider; the drivers' contract is test_contract.py."""

import warnings

import numpy as np
import pytest
from test_antislop import generate

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, BaseStrategy, ChainStrategy
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.provider.text import TextView, text_after
from backtrack_sampler.strategy.base_strategy import Capabilities, ConstraintError


class Recorder(BaseStrategy):
    """Records every on_next_token probs argument and every on_rewind position (kept across resets)."""

    reads_probs = False

    def __init__(self):
        self.probs, self.rewinds = [], []

    def on_probs(self, probs, continuation_tokens):  # a no-op override: must not switch to the dense path
        return probs

    def on_next_token(self, continuation_tokens, probs):
        self.probs.append(probs)

    def on_rewind(self, position):
        self.rewinds.append(position)


class Legacy(BaseStrategy):  # a 4.0 strategy: declares nothing, reads probs
    def __init__(self):
        self.seen = []

    def on_next_token(self, continuation_tokens, probs):
        self.seen.append(probs)


def test_capabilities_are_declared_not_inferred():
    assert Recorder().capabilities == Capabilities(reads_probs=False, edits_logits=False, hard=False)
    assert Legacy().capabilities.reads_probs and Legacy().needs_probs  # undeclared: inferred, as in 4.0
    assert BaseStrategy().capabilities == Capabilities(False, False, False)
    fp = FakeProvider()
    soft = AntiSlopStrategy(fp, [["the cat", 0.5]])
    assert AntiSlopStrategy(fp, ["the cat"]).capabilities == Capabilities(False, True, True)
    assert not soft.capabilities.hard and not AntiSlopStrategy(fp, ["x"], on_exhausted="accept").capabilities.hard
    chain = ChainStrategy([Recorder(), soft, AntiSlopStrategy(fp, ["x"])])
    assert chain.capabilities == Capabilities(False, True, True)
    recorder, legacy = Recorder(), Legacy()
    list(BacktrackSampler(fp, recorder).generate("the", max_new_tokens=5, seed=0))
    list(BacktrackSampler(fp, legacy).generate("the", max_new_tokens=5, seed=0))
    assert recorder.probs == [None] * 5  # the sparse path: no vocabulary-sized array was built
    assert all(p.shape == (fp.vocab_size,) for p in legacy.seen)


class Rewinder(BaseStrategy):
    """Rewinds ``depth`` tokens once the continuation reaches ``at`` tokens (once)."""

    def __init__(self, at, depth):
        self.at, self.depth = at, depth
        self.rewinds = []

    def reset(self):
        self.done = False

    def get_keep_index(self):
        return 0

    def backtrack(self, continuation_tokens):
        if not self.done and len(continuation_tokens) == self.at:
            self.done = True
            self.rewind_reason = "test"
            return continuation_tokens[: self.at - self.depth]
        return continuation_tokens

    def on_rewind(self, position):
        self.rewinds.append(position)


def test_every_member_of_a_chain_is_told_of_every_rewind():
    fp = FakeProvider()
    first, second, third = Recorder(), Rewinder(6, 4), Recorder()
    sampler = BacktrackSampler(fp, ChainStrategy([first, second, third]))
    tokens = list(sampler.generate("the", max_new_tokens=10, seed=1))
    assert len(tokens) == 10 and sampler.stats.rewinds == 1
    assert 2 in first.rewinds and 2 in second.rewinds and 2 in third.rewinds  # cut to 6 - 4 = 2 tokens
    assert set(first.rewinds) == set(second.rewinds) == set(third.rewinds) == {2}


def test_a_driver_rewind_is_recorded_and_told_to_the_strategy():
    fp = FakeProvider()
    recorder = Recorder()
    generation = BacktrackSampler(fp, Rewinder(99, 0)).start("the", max_new_tokens=10, seed=0, strategy=recorder)
    for _ in range(4):
        generation.advance(fp.next_logits(generation.sequence))
    assert generation.released == 4  # BaseStrategy-like keep index: all final at once
    with pytest.raises(ValueError, match="final"):
        generation.rewind(2)
    keep_all = Rewinder(99, 0)
    generation = BacktrackSampler(fp, keep_all).start("the", max_new_tokens=10, seed=0)
    for _ in range(5):
        generation.advance(fp.next_logits(generation.sequence))
    removed = generation.tokens[3:]
    generation.rewind(3, "driver")
    assert len(generation.tokens) == 3 and keep_all.rewinds == [3]
    event = generation.stats.events[-1]
    assert (event.position, event.tokens, event.reason) == (3, removed, "driver")


class GiveUp(BaseStrategy):
    """Keeps two tokens provisional; raises ConstraintError at the 6th token."""

    def reset(self):
        self.n = 0

    def get_keep_index(self):
        return max(self.n - 2, 0)

    def backtrack(self, continuation_tokens):
        self.n = len(continuation_tokens)
        if self.n == 6:
            raise ConstraintError("cannot hold")
        return continuation_tokens


@pytest.mark.parametrize("chained", [False, True])
def test_a_constraint_error_ends_the_generation_without_its_provisional_tokens(chained):
    fp = FakeProvider()
    strategy = ChainStrategy([Recorder(), GiveUp()]) if chained else GiveUp()
    sampler = BacktrackSampler(fp, strategy)
    delivered = list(sampler.generate("the", max_new_tokens=20, seed=3))
    stats = sampler.stats
    assert stats.finish_reason == "constraint" and len(delivered) == stats.delivered == 3  # 6 - 2 provisional - 1
    assert stats.constraint == "GiveUp: cannot hold"
    assert stats.events[-1].reason == f"constraint: {stats.constraint}" and len(stats.events[-1].tokens) == 3
    assert "".join(sampler.generate_text("the", max_new_tokens=20, seed=3)) == fp.decode(delivered)


class Hard(Rewinder):
    """A hard constraint that rewinds one token at every step after the 4th (it can never be met)."""

    hard_constraint = True

    def get_keep_index(self):
        return 2

    def backtrack(self, continuation_tokens):
        if len(continuation_tokens) > 4:
            self.rewind_reason = "never"
            return continuation_tokens[:-1]
        return continuation_tokens


def test_a_hard_constraint_out_of_budget_ends_with_constraint_and_a_soft_one_goes_on():
    fp = FakeProvider()
    sampler = BacktrackSampler(fp, Hard(0, 0))
    delivered = list(sampler.generate("the", max_new_tokens=20, seed=0, max_rewound_tokens=30))
    assert sampler.stats.finish_reason == "constraint" and len(delivered) == 2
    assert "Hard: rewound 30 tokens (max_rewound_tokens=30)" in sampler.stats.constraint

    class Soft(Hard):
        hard_constraint = False

    sampler = BacktrackSampler(fp, Soft(0, 0))
    with pytest.warns(RuntimeWarning, match="rewinding is off"):
        delivered = list(sampler.generate("the", max_new_tokens=20, seed=0, max_rewound_tokens=30))
    assert sampler.stats.finish_reason == "length" and len(delivered) == 20


def test_antislop_that_cannot_hold_a_hard_ban_says_so():
    fp = FakeProvider(seed=1)
    everything = [piece for piece in fp.vocab if not piece.startswith("<")]  # every visible token is banned
    sampler = BacktrackSampler(fp, AntiSlopStrategy(fp, everything, max_retries=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "rewinding is off" warning: it ends instead
        text = fp.decode(list(sampler.generate("the", max_new_tokens=20, seed=0)))
    assert sampler.stats.finish_reason == "constraint" and text == ""
    assert sampler.stats.constraint.startswith("AntiSlopStrategy: phrase ")
    accepted = []
    sampler = BacktrackSampler(
        fp,
        AntiSlopStrategy(fp, everything, max_retries=2, on_exhausted="accept", on_accept=lambda *a: accepted.append(a)),
    )
    list(sampler.generate("the", max_new_tokens=5, seed=0))
    assert sampler.stats.finish_reason in ("length", "stop") and accepted  # the documented way to let a ban go


def test_the_issue_19_case_on_a_scripted_model():
    # "was a" is rewound to " was"; then " in" completes "a in" across the last token before it
    vocab = ["<pad>", "<eos>", "<bos>", " El", "'L", "una", " was", " a", " Inn", " Dog", " rug", "."]
    fp = FakeProvider(vocab=vocab)
    script = {0: " El", 1: "'L", 2: "una", 3: " was", 4: " a"}
    after = {3: [" Inn", " Dog"], 4: [" rug"]}

    def logits(tokens):
        n = len(tokens) - 1
        row = np.full(len(vocab), -10.0, dtype=np.float32)
        if n in script:
            row[fp.ids[script[n]]] = 10.0
        for rank, piece in enumerate(after.get(n, [])):
            row[fp.ids[piece]] = 5.0 - rank
        row[fp.ids["."]] = 0.0
        return row

    fp.logits_fn = logits
    text, events, stats = generate(fp, AntiSlopStrategy(fp, ["a in", "was a"]), max_new_tokens=8)
    assert "a in" not in text.lower() and "was a" not in text.lower(), text
    assert [e.reason for e in events][:2] == ["phrase 'was a'", "phrase 'a in'"]


def test_two_antislops_in_a_chain_each_hold_their_bans():
    fp = FakeProvider(seed=5)
    one, two = ["the cat", "a dog"], ["cat sat", "on the", "rug and"]
    for seed in range(30):
        sampler = BacktrackSampler(fp, ChainStrategy([AntiSlopStrategy(fp, one), AntiSlopStrategy(fp, two)]))
        text = fp.decode(list(sampler.generate("the", max_new_tokens=40, seed=seed)))
        assert sampler.stats.finish_reason in ("length", "stop", "constraint")
        assert not [p for p in one + two if p in text.lower()], (seed, text)


def test_text_view_is_incremental_utf8_safe_and_rewinds():
    vocab = ["<pad>", "<eos>", "<bos>", " caf", "\xc3", "\xa9", " au", " lait"]

    class Bytes(FakeProvider):
        def decode(self, tokens):
            raw = "".join(self.vocab[t] for t in tokens if not self.vocab[t].startswith("<"))
            return raw.encode("latin-1").decode("utf-8", errors="replace")

    fp = Bytes(vocab=vocab)
    ids = [fp.ids[p] for p in [" caf", "\xc3", "\xa9", " au", " lait"]]
    view = TextView(fp.decode)
    pieces = [view.update(ids[: n + 1]) for n in range(len(ids))]
    assert pieces == [" caf", "", "é", " au", " lait"] and view.text == " café au lait"
    assert view.ends == [4, 5, 5, 8, 13] and view.token_at(4) == 1 and view.offset(3) == 5
    assert view.update(ids[:2]) == "" and view.text == " caf" and view.committed == 1  # rewound inside "é"
    assert view.update(ids[:2], at_end=True) == "\ufffd"
    assert view.update(ids[:1] + [fp.ids[" au"]]) == " au" and view.text == " caf au"
    assert text_after(fp.decode, ids[:1], ids[3:]) == " au lait"
