"""RepetitionStrategy and the repeat detector (backtrack_sampler.quality): the detector's rules,
rewinds and hold, property tests; the strategy on FakeProvider models that loop (fast); the
embedded chat model where a plain run loops, and the demo (-m model)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, BaseStrategy, ChainStrategy, cli
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.quality import (RepeatDetector, RepeatRules, distinct_n, find_repeat, find_repeats,
                                       is_degenerate, rep_n, repeated_fraction)
from backtrack_sampler.registry import StrategyRegistry, make_strategy
from backtrack_sampler.strategy.repetition_strategy import RepetitionStrategy
from conftest import ROOT


def examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- the detector: its rules ---------------------------------------------------------------------
def test_a_character_loop_is_found_where_its_copy_begins():
    text = "Once upon a time, Lysa said lolololololololololol"
    found = find_repeat(text)
    assert found is not None and found.kind == "loop"
    assert text[found.source : found.start] == "lo"  # the unit, written once before the copy
    assert text[: found.start] == "Once upon a time, Lysa said lo"
    assert found.end - found.source == 20 and found.describe(text) == "loop 'lo' x10"
    assert find_repeat(text[: found.end - 1]) is None  # one character less: under min_chars
    issue = "Once upon a time, Lysa-lh-l-h-h-h-h-h-h-h-h-h-h-h"  # issue 17's loop: single-letter words too
    found = find_repeat(issue)
    assert found is not None and found.start >= len("Once upon a time, Lysa-lh-l-h")


@pytest.mark.parametrize("text", [
    "no, no, no, I said. Ha ha ha! Hahaha.",  # short units, repeated a little
    "|---|---|---|---|---|---|",  # a markdown table rule: no letter, under symbol_chars
    "-" * 60 + "\n" + "=" * 60,
    "The keeper looked at the sea. The keeper looked at the sky.",  # the same start, not the same sentence
    "It was dark. It was dark.",  # a short sentence again (under sentence_words)
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16",
])
def test_prose_that_repeats_a_little_is_not_a_repeat(text):
    assert find_repeat(text) is None and not is_degenerate(text)


def test_symbol_only_loops_need_more_characters():
    assert find_repeat("." * 63) is None
    found = find_repeat("." * 64)
    assert found is not None and found.kind == "loop" and found.end == 64
    assert find_repeat("\n" * 70).kind == "loop"


def test_a_repeated_run_of_words_is_found_at_the_copy():
    text = "He went to the market to buy some bread, and then he went to the market to buy some fish."
    found = find_repeat(text)
    assert found.kind == "ngram" and text[found.start :].startswith("he went to the market to buy some")
    assert text[found.source :].startswith("He went")  # case and punctuation are ignored
    assert found.describe(text) == "ngram 'he went to the market to buy some'"
    shorter = "He went to the market to buy bread, and then he went to the market to buy fish."
    assert find_repeat(shorter) is None  # 7 words in common: under ngram_words
    assert find_repeat(shorter, RepeatRules(ngram_words=7)).kind == "ngram"


def test_a_repeat_farther_back_than_the_window_is_not_one():
    first = "the old keeper climbed the stairs of the tower at dawn"
    filler = " ".join(f"w{i}" for i in range(50))
    text = f"{first}. {filler}. {first}."
    assert find_repeat(text, RepeatRules(window=100)).kind == "ngram"
    assert find_repeat(text, RepeatRules(window=40)) is None


def test_a_repeated_sentence_is_found_at_its_first_word():
    text = "The sea was calm and blue. She smiled at him! the sea was calm and blue... And so on."
    found = find_repeat(text)
    assert found.kind == "sentence" and text[found.start :].startswith("the sea was calm and blue")
    assert found.source == 0
    assert find_repeat(text, RepeatRules(sentence_words=0)) is None
    at_end = "The sea was calm and blue. She smiled. The sea was calm and blue"
    assert find_repeats(at_end)[0].kind == "sentence"  # the end of the text closes the last sentence


def test_rules_are_checked():
    with pytest.raises(ValueError, match="min_chars"):
        RepeatRules(min_chars=-1)
    with pytest.raises(ValueError, match="min_repeats"):
        RepeatRules(min_repeats=1)
    with pytest.raises(ValueError, match="ngram_words"):
        RepeatRules(ngram_words=1)
    off = RepeatRules(min_chars=0, symbol_chars=0, ngram_words=0, sentence_words=0)
    assert find_repeat("h-" * 50 + " the cat sat on the mat" * 5, off) is None


def test_quality_scores():
    assert distinct_n("a b c d", 2) == 1.0 and distinct_n("a b a b a b", 2) == 0.4 and distinct_n("a", 2) == 0.0
    assert rep_n("a b c d e", 2) == 0.0 and rep_n("a b a b a b", 2) == pytest.approx(0.6)
    loop = "the cat sat on the mat and then " * 3
    assert repeated_fraction(loop) == pytest.approx(16 / 24)  # the 2nd and 3rd copies
    assert repeated_fraction("the cat sat on the mat and then it ran away") == 0.0


# --- the detector: incremental, rewinds, hold (properties) -----------------------------------------
ALPHABET = "ab .\n-"  # small: loops, repeated words and sentences come up all the time
texts = st.text(alphabet=ALPHABET, min_size=0, max_size=160)
rules = st.builds(RepeatRules, min_chars=st.integers(4, 12), min_repeats=st.integers(2, 4),
                  max_period=st.integers(1, 6), symbol_chars=st.integers(4, 20), ngram_words=st.sampled_from([0, 2, 3, 5]),
                  window=st.integers(1, 30), sentence_words=st.integers(0, 3))


def state(detector: RepeatDetector):
    return (detector.text, detector._runs, detector._words, {k: v for k, v in detector._grams.items()},
            detector._sentences, {k: v for k, v in detector._said.items()}, detector._said_log, detector.hold)


def char_by_char(text, rules):
    detector = RepeatDetector(rules)
    hits = [detector.extend(c) for c in text]
    return detector, hits


@examples(300)
@given(text=texts, rules=rules, cuts=st.lists(st.integers(1, 12), max_size=40))
def test_pieces_of_any_size_find_what_characters_find(text, rules, cuts):
    reference, hits = char_by_char(text, rules)
    detector, at = RepeatDetector(rules), 0
    for size in cuts + [len(text)]:
        piece = text[at : at + size]
        found = detector.extend(piece)
        assert (found is not None) == any(h is not None for h in hits[at : at + size])
        at += len(piece)
    assert state(detector) == state(reference)


@examples(300)
@given(first=texts, then=texts, rules=rules, data=st.data())
def test_a_rewind_leaves_the_state_of_the_text_kept(first, then, rules, data):
    detector, _ = char_by_char(first, rules)
    detector.extend("", at_end=data.draw(st.booleans()))  # the end closes words and sentences: a rewind reopens them
    keep = data.draw(st.integers(0, len(first)))
    detector.rewind(keep)
    for c in then:
        detector.extend(c)
    reference, _ = char_by_char(first[:keep] + then, rules)
    assert state(detector) == state(reference)


@examples(300)
@given(text=texts, rules=rules)
def test_no_repeat_found_later_begins_before_the_hold(text, rules):
    detector = RepeatDetector(rules)
    holds = []
    for i, c in enumerate(text):
        holds.append(detector.hold)
        found = detector.extend(c, at_end=i == len(text) - 1)
        if found is not None:
            assert all(found.start >= hold for hold in holds), (found, holds)
            assert 0 <= found.source < found.start < found.end <= len(detector.text)


# --- the strategy on scripted models ------------------------------------------------------------
VOCAB = ["<pad>", "<eos>", "<bos>", " the", " cat", " sat", " on", " a", " rug", " tapestry", " of", " light",
         " it", " was", " dark", " The", " dog", " ran", " away", " quickly", " It", " and", ".", " l", "l", "o", "x"]


def markov(table, vocab=VOCAB):
    """A FakeProvider that is a bigram model: after each piece it wants ``table[piece]`` in that
    order (logits 10, 6, 3, ...), every other token far behind. ``<bos>`` starts it."""
    fp = FakeProvider(vocab=vocab)
    rows = {}
    for piece, nexts in table.items():
        row = np.full(len(vocab), -20.0, dtype=np.float32)
        for rank, nxt in enumerate(nexts):
            row[fp.ids[nxt]] = [10.0, 6.0, 3.0, 1.0][rank]
        rows[fp.ids[piece]] = row
    eos = np.full(len(vocab), -20.0, dtype=np.float32)
    eos[fp.ids["<eos>"]] = 10.0
    fp.logits_fn = lambda tokens: rows.get(tokens[-1], eos)
    return fp


CHAR_LOOP = {"<bos>": [" it"], " it": [" was"], " was": [" l"], " l": ["o"], "l": ["o"], "o": ["l", " and"],
             " and": [" ran"], " ran": [" away"], " away": ["."], ".": ["<eos>"]}
WORD_LOOP = {"<bos>": [" the"], " the": [" cat"], " cat": [" sat"], " sat": [" on"], " on": [" a"], " a": [" rug"],
             " rug": [" and"], " and": [" the", " it", " The"], " it": [" was"], " was": [" dark"], " dark": ["."],
             ".": ["<eos>"], " The": [" dog"], " dog": [" ran"], " ran": [" away"], " away": ["."]}
SENTENCE_LOOP = {"<bos>": [" The"], " The": [" dog"], " dog": [" ran"], " ran": [" away"], " away": [" quickly"],
                 " quickly": ["."], ".": [" The", " It"], " It": [" was"], " was": [" dark"], " dark": ["<eos>"]}


def generate(fp, strategy, max_new_tokens=60, **kwargs):
    sampler = BacktrackSampler(fp, strategy)
    events = []
    kwargs.setdefault("temperature", 0)
    tokens = list(sampler.generate([fp.ids["<bos>"]], max_new_tokens=max_new_tokens, on_rewind=events.append, **kwargs))
    return fp.decode(tokens), events, sampler.stats


@pytest.mark.parametrize("table, plain_kind, expected, reason", [
    (CHAR_LOOP, "loop", " it was lo and ran away.", "repeat: loop 'lo' x10"),
    (WORD_LOOP, "ngram", " the cat sat on a rug and it was dark.", "repeat: ngram 'the cat sat on a rug and the'"),
    (SENTENCE_LOOP, "sentence", " The dog ran away quickly. It was dark", "repeat: sentence 'The dog ran away quickly'"),
])
def test_a_loop_is_rewound_to_where_its_copy_began_and_written_otherwise(table, plain_kind, expected, reason):
    fp = markov(table)
    plain, _, stats = generate(fp, BaseStrategy())
    assert find_repeat(plain).kind == plain_kind and stats.finish_reason == "length"  # it loops to the limit
    text, events, stats = generate(fp, RepetitionStrategy(fp))
    assert text == expected and stats.finish_reason == "stop"
    assert not is_degenerate(text)
    assert [e.reason for e in events] == [reason]
    assert plain.startswith(fp.decode(fp.encode(text, add_special_tokens=False)[: events[0].position]))


def test_a_loop_it_cannot_leave_is_accepted_after_max_retries():
    vocab = ["<pad>", "<eos>", "<bos>", "h", "i"]
    fp = FakeProvider(vocab=vocab)
    only_h = np.array([-np.inf, -np.inf, -np.inf, 5.0, -np.inf], dtype=np.float32)
    fp.logits_fn = lambda tokens: only_h
    accepted = []
    strategy = RepetitionStrategy(fp, max_retries=3, on_accept=lambda position, reason: accepted.append((position, reason)))
    text, events, stats = generate(fp, strategy, max_new_tokens=50)
    assert text == "h" * 50 and stats.finish_reason == "length"
    assert stats.rewinds == 3 and len(accepted) == 1  # three retries, then the loop is kept (and said so)
    assert accepted[0][1].startswith("repeat: loop 'h'")


def test_retries_escalate_at_the_position():
    """The 2nd retry also excludes every likely token that writes the rejected copy again (here "l"
    and "lo" write the same text) and flattens the rest; the 1st excludes one token only."""
    vocab = VOCAB + ["lo"]
    table = dict(CHAR_LOOP, o=["l", "lo", " and"], lo=["l", "lo", " and"])
    fp = markov(table, vocab)
    text, events, _ = generate(fp, RepetitionStrategy(fp))
    assert text == " it was lo and ran away."
    assert len(events) == 2 and events[0].position == events[1].position  # "l" rejected, then "lo" too
    strategy = RepetitionStrategy(fp, max_retries=1)  # no 2nd retry: the loop is kept
    text, events, _ = generate(fp, strategy)
    assert len(events) == 1 and is_degenerate(text)


def test_it_holds_back_only_the_text_a_repeat_can_still_reach():
    fp = markov(WORD_LOOP)
    strategy = RepetitionStrategy(fp)
    sampler = BacktrackSampler(fp, strategy)
    delivered = []
    for token in sampler.generate([fp.ids["<bos>"]], max_new_tokens=40, temperature=0):
        delivered.append((token, len(strategy.view.tokens)))
    # the first token became final while the generation went on (not all at the end)
    assert delivered[0][1] < len(delivered)
    assert strategy.capabilities == (False, True, False)  # sparse path, edits logits, soft


def test_chained_with_antislop_both_hold():
    """The loop's way out leads into a banned phrase: AntiSlop rewinds what Repetition chose, and
    the position keeps both exclusions (the 3rd choice is written), in either order."""
    fp = markov(WORD_LOOP)
    for order in (0, 1):
        members = [RepetitionStrategy(fp), AntiSlopStrategy(fp, ["it was dark"])]
        text, events, stats = generate(fp, ChainStrategy(members[::-1] if order else members))
        assert text == " the cat sat on a rug and The dog ran away."
        assert "it was dark" not in text and not is_degenerate(text)
        reasons = " | ".join(e.reason for e in events)
        assert "repeat: ngram" in reasons and "phrase 'it was dark'" in reasons


WORLD = [" a", " b", " ab", " ba", "a", "b", ".", "\n", "-"]


def test_no_repeat_in_the_final_text_unless_it_said_so():
    """Pseudo-random models over a tiny vocabulary repeat themselves all the time: whatever the
    final text is, it holds no repeat (the library's detector, run again on the decoded text)
    unless the strategy reported a loop it had to keep; chained, no banned phrase either."""
    rewound = []

    @examples(120)
    @given(model_seed=st.integers(0, 10_000), seed=st.integers(0, 10_000), scale=st.sampled_from([2.0, 4.0, 8.0]),
           chained=st.booleans())
    def check(model_seed, seed, scale, chained):
        vocab = ["<pad>", "<eos>", "<bos>"] + WORLD
        world = FakeProvider(vocab=vocab, seed=model_seed, scale=scale)
        special = np.array([-np.inf, -4.0 * scale, -np.inf] + [0.0] * len(WORLD), dtype=np.float32)  # EOS rarely
        fp = FakeProvider(vocab=vocab, logits_fn=lambda tokens: world.logits_for(tokens) + special)
        accepted = []
        repetition = RepetitionStrategy(fp, min_chars=8, ngram_words=4, sentence_words=3,
                                        on_accept=lambda position, reason: accepted.append(reason))
        strategy = ChainStrategy([AntiSlopStrategy(fp, ["ab ba"]), repetition]) if chained else repetition
        text, events, stats = generate(fp, strategy, max_new_tokens=80, temperature=1.0, seed=seed)
        if not accepted:
            assert find_repeat(text, repetition.rules) is None, text
        if chained:
            assert "ab ba" not in text
        rewound.append(any(e.reason and "repeat" in e.reason for e in events))

    check()
    assert sum(rewound) >= len(rewound) // 3  # (about half of them rewind a repeat: not vacuous)


# --- parameters, the registry, the command line and the server ----------------------------------
def test_it_is_a_builtin_with_json_parameters(fake):
    entry = StrategyRegistry().get("repetition", per_request=True)
    schema = entry.schema()
    assert schema["capabilities"] == {"reads_probs": False, "edits_logits": True, "hard_constraint": False}
    assert {"min_chars", "ngram_words", "sentence_words", "max_retries", "heat", "min_p"} <= set(schema["parameters"]["properties"])
    strategy = make_strategy("repetition", fake, ngram_words=5, max_retries=2)
    assert strategy.rules.ngram_words == 5 and strategy.max_retries == 2
    for bad in ({"ngram_words": "5"}, {"min_p": 1.5}, {"nope": 1}):
        with pytest.raises(Exception):
            make_strategy("repetition", fake, **bad)


def test_generate_strategy_repetition_on_the_command_line(monkeypatch):
    fp = markov(dict(WORD_LOOP, x=[" the"]))
    monkeypatch.setattr(cli, "load_provider", lambda *args, **kwargs: fp)
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(["generate", "x", "--strategy", "repetition", "--temperature", "0", "--show-backtracking",
                       "--color", "never"], stdin=io.StringIO(""), stdout=out, stderr=err)
    assert status == 0, err.getvalue()
    assert out.getvalue().strip() == "the cat sat on a rug and it was dark."
    assert "1 rewind" in err.getvalue()


def test_the_server_takes_it_by_name(fake):
    from starlette.testclient import TestClient

    from backtrack_sampler.server import Engine, create_app

    fp = markov(dict(WORD_LOOP, x=[" the"]))
    engine = Engine(fp, "fake")
    with TestClient(create_app(engine)) as client:
        body = {"prompt": "x", "max_tokens": 40, "temperature": 0}
        plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        fixed = client.post("/v1/completions", json={**body, "strategy": [{"name": "repetition"}]}).json()
        assert is_degenerate(plain)
        assert fixed["choices"][0]["text"] == " the cat sat on a rug and it was dark." and fixed["choices"][0]["finish_reason"] == "stop"
    engine.close()
