"""AntiSlopStrategy: scripted FakeProvider tests (fast) and real-model tests (-m model)."""

import json
import math
import re

import numpy as np
import pytest

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler
from backtrack_sampler.provider.fake_provider import FakeProvider


def scripted(text, extra=(), vocab=None):
    """A FakeProvider that always wants to write ``text`` (then EOS); ``extra`` pieces get a lower,
    decreasing logit at every step, so they are the fallbacks once the wanted token is banned.
    Position is counted after the one-token prompt ([<bos>])."""
    fp = FakeProvider(vocab=vocab)
    want = fp.encode(text, add_special_tokens=False) + [fp.get_eos_token_id()]
    fallbacks = [fp.ids[piece] for piece in extra]

    def logits(tokens):
        row = np.full(fp.vocab_size, -10.0, dtype=np.float32)
        for rank, token in enumerate(fallbacks):
            row[token] = 5.0 - rank
        row[want[min(len(tokens) - 1, len(want) - 1)]] = 10.0
        return row

    fp.logits_fn = logits
    return fp


def generate(fp, strategy, max_new_tokens=30, **kwargs):
    sampler = BacktrackSampler(fp, strategy)
    events = []
    tokens = list(sampler.generate([fp.ids["<bos>"]], max_new_tokens=max_new_tokens, temperature=0,
                                   on_rewind=events.append, **kwargs))
    return fp.decode(tokens), events, sampler.stats


def test_banned_phrase_never_appears_and_event_reports_it():
    fp = scripted(" the cat sat on a tapestry of light.", extra=[" rug"])
    text, events, stats = generate(fp, AntiSlopStrategy(fp, ["a tapestry of"]))
    assert "a tapestry of" not in text.lower()
    assert text.startswith(" the cat sat on")
    assert events and events[0].position == 4 and events[0].reason == "phrase 'a tapestry of'"
    assert events[0].text == " a tapestry of"
    assert stats.rewinds == len(events)


def test_matches_decoded_text_however_tokenized_and_any_case():
    # "CORE GUIDELINES" spelled with capitals and letter by letter: no token sequence to compare with
    fp = scripted(" the CORE GUIDELINES.", extra=[" rug"])
    text, events, _ = generate(fp, AntiSlopStrategy(fp, ["core guidelines"]), max_new_tokens=40)
    assert "core guidelines" not in text.lower() and events
    assert events[0].position == 2 and events[0].text == "CORE GUIDELINES"  # tokens: " the", " ", "C", ...


def test_case_sensitive_option_and_with_variants_false():
    fp = scripted(" the Tapestry.", extra=[" rug"])
    assert "Tapestry" in generate(fp, AntiSlopStrategy(fp, ["tapestry"], case_sensitive=True))[0]
    assert "Tapestry" in generate(fp, AntiSlopStrategy(fp, ["tapestry"], with_variants=False))[0]
    assert "Tapestry" not in generate(fp, AntiSlopStrategy(fp, ["tapestry"]))[0]


def test_whole_words():
    vocab = ["<pad>", "<eos>", "<bos>", " weave", "r", " rug", ".", " the"]
    fp = scripted(" the weaver.", extra=[" rug"], vocab=vocab)
    assert "weaver" in generate(fp, AntiSlopStrategy(fp, ["weave"], whole_words=True))[0]
    assert "weave" not in generate(fp, AntiSlopStrategy(fp, ["weave"]))[0]
    fp = scripted(" the weave.", extra=[" rug"], vocab=vocab)
    text, events, _ = generate(fp, AntiSlopStrategy(fp, ["weave"], whole_words=True))
    assert "weave" not in text and events[0].position == 1
    fp = scripted(" the weave", extra=[" rug"], vocab=vocab)  # confirmed by the end of the text (EOS)
    assert "weave" not in generate(fp, AntiSlopStrategy(fp, ["weave"], whole_words=True))[0]


def test_earliest_start_wins():
    fp = scripted(" the cat sat on the mat.", extra=[" rug"])
    strategy = AntiSlopStrategy(fp, ["on the mat", "sat on the mat"], keep_index_buffer=0)
    text, events, _ = generate(fp, strategy)
    assert events[0].reason == "phrase 'sat on the mat'" and events[0].position == 2


def test_regex_ban():
    fp = scripted(" it was not dark, but bright.", extra=[" rug"])
    text, events, _ = generate(fp, AntiSlopStrategy(fp, ["zzz"], regexes=[r"not [^.!?]{3,60} but"]))
    assert not re.search(r"not [^.!?]{3,60} but", text) and events[0].reason.startswith("regex")
    assert events[0].position == 2  # the token " not"


def test_regex_window_is_bounded():
    fp = scripted(" not" + " the" * 40 + " but.", extra=[" rug"])
    text, events, _ = generate(fp, AntiSlopStrategy(fp, ["zzz"], regexes=[r"not [^.!?]+ but"], regex_window=60),
                               max_new_tokens=60)
    assert not events and "but" in text  # the match is longer than the window: not searched for


def test_soft_ban_lowers_probability_then_accepts():
    fp = scripted(" the tapestry.", extra=[" rug"])  # tapestry: logit 10, rug: 5
    ban = [["tapestry", 0.5]]
    text, events, _ = generate(fp, AntiSlopStrategy(fp, ban))  # 10 + ln 0.5 > 5: chosen again, kept
    assert "tapestry" in text and len(events) == 1
    text, events, _ = generate(fp, AntiSlopStrategy(fp, ban, adjustment_strength=10))  # 10 - 6.9 < 5
    assert "tapestry" not in text and " rug" in text and len(events) == 1
    text, events, _ = generate(fp, AntiSlopStrategy(fp, {"tapestry": 0.5}, adjustment_strength=0))
    assert "tapestry" in text and not events  # strength 0: off
    text, _, _ = generate(fp, AntiSlopStrategy(fp, ban, adjustment_strength=math.inf))
    assert "tapestry" not in text


def test_soft_ban_adds_strength_times_log_multiplier_to_the_logit():
    fp = scripted(" the tapestry.", extra=[" rug"])
    strategy = AntiSlopStrategy(fp, [["tapestry", 0.25]], adjustment_strength=2)
    generate(fp, strategy, max_new_tokens=2)
    strategy._bans = {1: {fp.ids[" tapestry"]: 2 * math.log(0.25)}}
    row = strategy.on_logits(np.zeros(fp.vocab_size, np.float32), [0])
    assert row[fp.ids[" tapestry"]] == pytest.approx(2 * math.log(0.25)) and row[fp.ids[" rug"]] == 0


def test_ban_is_lifted_when_the_text_before_it_changes():
    # wants " tapestry" at position 1, then (after a change before it) could write it
    fp = scripted(" a tapestry.", extra=[" rug", " the"])
    strategy = AntiSlopStrategy(fp, ["tapestry", "a rug"], keep_index_buffer=5)
    text, events, _ = generate(fp, strategy, max_new_tokens=6)
    # " a tapestry" -> ban " tapestry" at 1 -> " a rug" -> ban " a" at 0 -> the ban at 1 is dropped,
    # so " tapestry" is allowed again after the new first token ... and banned once more when found
    # " a tapestry" -> " tapestry" banned at 1 -> " a rug" -> " a" banned at 0, which changes the text
    # before position 1, so its ban is lifted: " rug tapestry" is tried (and banned afresh)
    assert [(e.position, e.reason) for e in events[:3]] == [
        (1, "phrase 'tapestry'"), (0, "phrase 'a rug'"), (1, "phrase 'tapestry'")]
    strategy.reset()
    strategy._bans = {1: {5: -math.inf}, 3: {5: -math.inf}}
    strategy._retries = {1: 1, 3: 1}
    strategy._rewind([7, 8, 9, 10], 2, "test")
    assert strategy._bans == {1: {5: -math.inf}} and strategy._retries == {1: 1}


def test_exhausted_position_rewinds_further():
    # every token but " tapestry" and " a" is impossible at position 1: hard bans exhaust it
    vocab = ["<pad>", "<eos>", "<bos>", " a", " tapestry", " rug", " the", "."]
    fp = FakeProvider(vocab=vocab)

    def logits(tokens):
        row = np.full(len(vocab), -np.inf, dtype=np.float32)
        if len(tokens) == 2 and tokens[1] == fp.ids[" a"]:
            row[fp.ids[" tapestry"]] = 0.0  # after " a" only " tapestry" is possible
        else:
            row[[fp.ids[" a"], fp.ids[" the"], fp.ids["."]]] = [3.0, 2.0, 1.0]
        return row

    fp.logits_fn = logits
    accepted = []
    # keep_index_buffer holds back the token before the match, so the exhausted position can rewind there
    strategy = AntiSlopStrategy(fp, ["tapestry"], keep_index_buffer=2, on_accept=lambda *a: accepted.append(a))
    text, events, _ = generate(fp, strategy, max_new_tokens=3)
    assert "tapestry" not in text and text.startswith(" the")
    assert "rewinding further" in events[-1].reason and events[-1].position == 0 and not accepted

    strategy = AntiSlopStrategy(fp, ["tapestry"], on_exhausted="accept", on_accept=lambda *a: accepted.append(a))
    text, events, _ = generate(fp, strategy, max_new_tokens=3)
    assert text.startswith(" a tapestry") and accepted == [(1, "phrase 'tapestry'")]


def test_max_retries_bounds_the_retries_at_one_position():
    fp = FakeProvider(seed=3)  # random logits: "t" can be written many ways
    strategy = AntiSlopStrategy(fp, ["a"], max_retries=2, on_exhausted="accept", keep_index_buffer=0)
    text, events, stats = generate(fp, strategy, max_new_tokens=40)
    positions = [e.position for e in events]
    assert all(positions.count(p) <= 2 for p in positions)
    assert stats.delivered == 40 or stats.finish_reason == "stop"


def test_never_stalls_with_random_model_and_many_bans():
    fp = FakeProvider(seed=1)
    strategy = AntiSlopStrategy(fp, ["the", "a", "e", "cat", "o"], max_retries=3)
    text, _, stats = generate(fp, strategy, max_new_tokens=50, max_rewound_tokens=10_000)
    assert stats.finish_reason in ("stop", "length")


def test_keep_index_holds_back_only_possible_matches():
    fp = scripted(" the cat sat on the mat and ran away.", extra=[" rug"])
    strategy = AntiSlopStrategy(fp, ["the rug"], keep_index_buffer=0)
    sampler = BacktrackSampler(fp, strategy)
    seen = []
    for token in sampler.generate([fp.ids["<bos>"]], max_new_tokens=12, temperature=0):
        seen.append((len(seen), strategy.matcher.tokens[:], strategy.get_keep_index()))
    # " the" could start "the rug": held until " cat" shows it cannot; otherwise nothing is held
    held = [len(toks) - keep for _, toks, keep in seen]
    assert max(held) <= 1
    strategy = AntiSlopStrategy(fp, ["the rug"], keep_index_buffer=3)
    tokens = fp.encode(" the cat sat on", add_special_tokens=False)
    for n in range(1, len(tokens) + 1):
        strategy.backtrack(tokens[:n])
    assert strategy.get_keep_index() == len(tokens) - 3


def test_regexes_hold_back_their_window():
    fp = scripted(" the cat sat on the mat.", extra=[" rug"])
    strategy = AntiSlopStrategy(fp, ["zzz"], regexes=["not .* but"], regex_window=8, keep_index_buffer=0)
    tokens = fp.encode(" the cat sat on the mat", add_special_tokens=False)
    for n in range(1, len(tokens) + 1):
        strategy.backtrack(tokens[:n])
    assert strategy.get_keep_index() == strategy.matcher.token_at(len(strategy.matcher.text) - 8)


def test_skip_tokens_are_final_and_never_matched():
    fp = scripted(" tapestry the tapestry.", extra=[" rug"])
    text, events, _ = generate(fp, AntiSlopStrategy(fp, ["tapestry"], skip_tokens=1))
    assert text.startswith(" tapestry the") and text.count("tapestry") == 1 and events[0].position == 2


def test_multibyte_characters_split_over_tokens():
    vocab = ["<pad>", "<eos>", "<bos>", " caf", "\xc3", "\xa9", " rug", "."]

    class Bytes(FakeProvider):  # pieces are latin-1 bytes; decode as UTF-8 like a byte-level tokenizer
        def decode(self, tokens):
            raw = "".join(self.vocab[t] for t in tokens if not self.vocab[t].startswith("<"))
            return raw.encode("latin-1").decode("utf-8", errors="replace")

    fp = Bytes(vocab=vocab)
    want = [fp.ids[" caf"], fp.ids["\xc3"], fp.ids["\xa9"], fp.ids["."], 1]
    fp.logits_fn = lambda t: np.where(np.arange(len(vocab)) == want[min(len(t) - 1, 4)], 9.0,
                                      np.where(np.arange(len(vocab)) == fp.ids[" rug"], 5.0, -9.0)).astype(np.float32)
    text, events, _ = generate(fp, AntiSlopStrategy(fp, ["é"]), max_new_tokens=6)
    assert "é" not in text and events[0].position == 1 and events[0].text == "é"


def test_errors_are_clear():
    fp = FakeProvider()
    with pytest.raises(ValueError, match="non-empty list"):
        AntiSlopStrategy(fp, [])
    with pytest.raises(ValueError, match="non-empty list"):
        AntiSlopStrategy(fp, {})
    with pytest.raises(ValueError, match="invalid regex"):
        AntiSlopStrategy(fp, ["x"], regexes=["(unclosed"])
    with pytest.raises(ValueError, match=r"multiplier .* \[0, 1\]"):
        AntiSlopStrategy(fp, [["x", 2.0]])
    with pytest.raises(ValueError, match=r"multiplier"):
        AntiSlopStrategy(fp, [["x", "0.5"]])
    with pytest.raises(ValueError, match="non-empty string"):
        AntiSlopStrategy(fp, [""])
    with pytest.raises(ValueError, match="on_exhausted"):
        AntiSlopStrategy(fp, ["x"], on_exhausted="stop")


def test_loads_the_full_list_fast_and_cost_per_token_does_not_grow(shared_data):
    import time

    full = json.loads((shared_data / "slop_phrase_prob_adjustments_full_list.json").read_text())
    fp = FakeProvider(seed=5)
    started = time.perf_counter()
    big = AntiSlopStrategy(fp, full, whole_words=True)
    assert time.perf_counter() - started < 5
    small = AntiSlopStrategy(fp, full[:50], whole_words=True)
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, fp.vocab_size, 2000)]

    def feed(strategy):
        strategy.reset()
        started = time.perf_counter()
        for n in range(1, len(tokens) + 1):
            strategy.matcher.update(tokens[:n])
        return time.perf_counter() - started

    assert feed(big) < 3 * feed(small) + 0.05


@pytest.mark.model
def test_real_model_never_outputs_banned_phrases(provider, shared_data):
    phrases = [p for p, _ in json.loads((shared_data / "slop_phrase_prob_adjustments.json").read_text())]
    banned = phrases + ["the", "sun"]
    for prompt, temperature in (("Facts about the sun: The sun is a", 0),  # greedy: writes " the" soon
                                ("Once upon a time, in a land of tapestries,", 1.0)):
        sampler = BacktrackSampler(provider, AntiSlopStrategy(provider, banned))
        events = []
        text = "".join(sampler.generate_text(prompt, max_new_tokens=40, temperature=temperature, seed=0,
                                             on_rewind=events.append))
        assert not [p for p in banned if p.lower() in text.lower()], text
        assert sampler.stats.delivered == 40 or sampler.stats.finish_reason == "stop"
        assert all(e.reason.startswith("phrase '") and e.reason[8:-1] in e.text.lower() for e in events)
        if temperature == 0:
            assert events, text
