"""AntiSlopStrategy: scripted FakeProvider tests (fast) and real-model tests (-m model)."""

import math
import os
import re
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from conftest import ROOT, SLOPS

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.strategy._phrase_matcher import Match, TextMatcher


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
    tokens = list(
        sampler.generate(
            [fp.ids["<bos>"]], max_new_tokens=max_new_tokens, temperature=0, on_rewind=events.append, **kwargs
        )
    )
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
    text, events, _ = generate(
        fp, AntiSlopStrategy(fp, ["zzz"], regexes=[r"not [^.!?]+ but"], regex_window=60), max_new_tokens=60
    )
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
        (1, "phrase 'tapestry'"),
        (0, "phrase 'a rug'"),
        (1, "phrase 'tapestry'"),
    ]
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
    fp = scripted(" a.", extra=[" cat", " mat", " rug"])  # every choice at position 0 contains "a"
    accepted = []
    strategy = AntiSlopStrategy(
        fp, ["a"], max_retries=2, on_exhausted="accept", on_accept=lambda *a: accepted.append(a)
    )
    text, events, stats = generate(fp, strategy, max_new_tokens=40)
    assert [(e.position, e.text) for e in events] == [(0, " a"), (0, " cat")]  # two retries, then exhausted
    assert text == " mat." and accepted == [(0, "phrase 'a'")] and stats.finish_reason == "stop"


def test_never_stalls_with_random_model_and_many_bans():
    fp = FakeProvider(seed=1)
    accepted = []
    banned = ["the", "a", "e", "cat", "o"]
    strategy = AntiSlopStrategy(fp, banned, max_retries=3, on_accept=lambda *a: accepted.append(a))
    text, events, stats = generate(fp, strategy, max_new_tokens=50, max_rewound_tokens=10_000)
    assert stats.delivered == 50 and stats.finish_reason == "length" and events
    assert not accepted and not [p for p in banned if p in text.lower()], text


def test_keep_index_holds_back_only_possible_matches():
    fp = scripted(" the cat sat on the mat and ran away.", extra=[" rug"])
    strategy = AntiSlopStrategy(fp, ["the rug"], keep_index_buffer=0)
    sampler = BacktrackSampler(fp, strategy)
    seen = []
    for _token in sampler.generate([fp.ids["<bos>"]], max_new_tokens=12, temperature=0):
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
    fp.logits_fn = lambda t: np.where(
        np.arange(len(vocab)) == want[min(len(t) - 1, 4)],
        9.0,
        np.where(np.arange(len(vocab)) == fp.ids[" rug"], 5.0, -9.0),
    ).astype(np.float32)
    text, events, _ = generate(fp, AntiSlopStrategy(fp, ["é"]), max_new_tokens=6)
    assert "é" not in text and events[0].position == 1 and events[0].text == "é"


def test_errors_are_clear():
    fp = FakeProvider()
    with pytest.raises(ValueError, match="something to ban"):
        AntiSlopStrategy(fp, [])
    with pytest.raises(ValueError, match="something to ban"):
        AntiSlopStrategy(fp, {}, regexes=[])
    with pytest.raises(ValueError, match="not a string"):
        AntiSlopStrategy(fp, "tapestry")
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


# --- regexes: RE2, bounded time ------------------------------------------------------------------
def test_regex_only_ban():
    fp = scripted(" it was not dark, but bright.", extra=[" rug"])
    for slops in ([], None, {}):
        text, events, _ = generate(fp, AntiSlopStrategy(fp, slops, regexes=[r"not [^.!?]{3,60} but"]))
        assert "not dark, but" not in text and events[0].reason == "regex 'not [^.!?]{3,60} but'", text
    text, events, _ = generate(fp, AntiSlopStrategy(fp, [], regexes=r"DARK"))  # one pattern; case-insensitive
    assert "dark" not in text and events[0].text == " dark"


def test_unsupported_regex_features_are_named():
    fp = FakeProvider()
    for pattern, feature in [
        (r"(\w+) \1", "backreference"),
        (r"(?<=not )dark", "lookbehind"),
        (r"dark(?!ness)", "negative lookahead"),
        (r"(?>a+)b", "atomic group"),
        (r"a\Z", r"\\z"),
    ]:
        with pytest.raises(ValueError, match=f"regex .* uses .*{feature}.*RE2.* not support"):
            AntiSlopStrategy(fp, [], regexes=[pattern])


def test_regex_context_before_the_window():
    # \b and ^ see the character before the searched window, as Python's re does with a start position
    fp = scripted(" the cat sat on the mat.", extra=[" rug"])
    for pattern in (r"\bat sat", r"^at sat"):  # the window starts at the "a" of " cat" when " sat" comes
        assert not re.search(pattern, " the cat sat on the mat.")
        text, events, _ = generate(fp, AntiSlopStrategy(fp, [], regexes=[pattern], regex_window=2))
        assert not events and text == " the cat sat on the mat.", pattern


def test_precompiled_python_pattern_is_used_as_it_is():
    fp = scripted(" it was not dark, but bright.", extra=[" rug"])
    pattern = re.compile(r"(?<=not )dark")  # a lookbehind: fine in Python's re, rejected as a string
    text, events, _ = generate(fp, AntiSlopStrategy(fp, [], regexes=[pattern]))
    assert "not dark" not in text and events[0].reason == "regex '(?<=not )dark'"


def test_pathological_regex_finishes_in_bounded_time():
    # (\s*a\s*)*b over "a a a ...": Python's re backtracks exponentially (never finishes); RE2 is linear
    code = (
        "from backtrack_sampler import AntiSlopStrategy\n"
        "from backtrack_sampler.provider.fake_provider import FakeProvider\n"
        "fp = FakeProvider()\n"
        "strategy = AntiSlopStrategy(fp, ['zzz'], regexes=[r'(\\s*a\\s*)*b'])\n"
        "tokens = fp.encode('a ' * 50, add_special_tokens=False)\n"
        "for n in range(1, len(tokens) + 1):\n"
        "    assert strategy.backtrack(tokens[:n]) == tokens[:n]\n"
        "print(len(strategy.matcher.text))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0 and result.stdout.split() == ["100"], result.stderr


# --- phrase matcher: memory and work ---------------------------------------------------------------
def chunked(text, size=1000):
    """A decode function over tokens that are ``size``-character chunks of ``text`` (and the tokens)."""
    chunks = [text[i : i + size] for i in range(0, len(text), size)]
    return (lambda tokens: "".join(chunks[t] for t in tokens)), list(range(len(chunks)))


def test_a_200000_character_phrase_needs_linear_memory_and_still_matches():
    rng = np.random.default_rng(0)
    phrase = "".join(rng.choice(list("abcdefghij "), 200_000))
    tracemalloc.start()
    try:
        matcher = AntiSlopStrategy(FakeProvider(), [phrase]).matcher
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(phrase)  # a folded copy; the old set of every prefix needed len**2 / 2 = 20 GB
    decode, tokens = chunked("x " + phrase.upper() + " y")
    matcher.decode = decode
    found = []
    for n in range(1, len(tokens) + 1):
        found += matcher.update(tokens[:n])
        assert len(matcher.live[-1]) <= 20  # starts still alive: only where the phrase could begin
    assert found == [Match(2, 2 + len(phrase), phrase, False)]


@pytest.mark.parametrize("whole_words", [False, True])
def test_matcher_finds_exactly_the_occurrences_a_brute_force_search_finds(whole_words):
    rng = np.random.default_rng(7)
    for trial in range(30):
        phrases = {"".join(rng.choice(list("ab c"), rng.integers(1, 6))) for _ in range(20)}
        phrases = {p for p in phrases if p.strip()}
        text = "".join(rng.choice(list("ab cA"), 80))
        matcher = TextMatcher(
            lambda tokens: "".join(text[t] for t in tokens),
            {p: -math.inf for p in phrases},
            [],
            whole_words=whole_words,
        )
        found = []
        for n in range(1, len(text) + 1):
            found += matcher.update(list(range(n)), at_end=n == len(text))
        low = text.lower()
        edge = lambda i: i in (0, len(low)) or not (low[i - 1].isalnum() and low[i].isalnum())  # noqa: E731
        expected = {
            (s, e)
            for s in range(len(low))
            for e in range(s + 1, len(low) + 1)
            if low[s:e] in phrases and (not whole_words or (edge(s) and edge(e)))
        }
        assert sorted((m.start, m.end) for m in found) == sorted(expected), (trial, phrases, text)
        assert all(m.pattern == low[m.start : m.end] for m in found)


class CountingList(list):
    """A list that counts how often an item is read."""

    reads = 0

    def __getitem__(self, index):
        CountingList.reads += 1
        return super().__getitem__(index)


def reads_per_character(phrases, text, whole_words):
    matcher = TextMatcher(
        lambda tokens: "".join(text[t] for t in tokens), {p: -math.inf for p in phrases}, [], whole_words=whole_words
    )
    matcher.sorted = CountingList(matcher.sorted)
    CountingList.reads = 0
    for n in range(1, len(text) + 1):
        matcher.update(list(range(n)))
    return CountingList.reads / len(text)


@pytest.mark.parametrize("whole_words", [False, True])
def test_cost_per_character_does_not_grow_with_the_number_of_phrases(many_phrases, whole_words):
    phrases = [p for p, _ in many_phrases]
    fp = FakeProvider(seed=5)
    text = fp.decode([int(t) for t in np.random.default_rng(0).integers(3, 30, 400)])  # words of the phrases
    big, small = reads_per_character(phrases, text, whole_words), reads_per_character(phrases[:50], text, whole_words)
    # a binary search per live start: log2(50,000) ~ 16 reads, not 50,000 (or 1,000 times the 50-phrase cost)
    assert big < 60 and big < 10 * small + 10, (big, small)


def test_the_generated_50000_phrase_list_builds_with_linear_memory(many_phrases):
    total = sum(len(p) for p, _ in many_phrases)
    tracemalloc.start()
    try:
        strategy = AntiSlopStrategy(FakeProvider(), many_phrases, whole_words=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(strategy.matcher.phrases) == len(many_phrases) and peak < 200 * len(many_phrases) + 4 * total


@pytest.mark.model
def test_real_model_never_outputs_banned_phrases(provider, many_phrases):
    banned = SLOPS + ["the", "sun"]
    for prompt, temperature in (
        ("Facts about the sun: The sun is a", 0),  # greedy: writes " the" soon
        ("Once upon a time, in a land of tapestries,", 1.0),
    ):
        sampler = BacktrackSampler(provider, AntiSlopStrategy(provider, banned))
        events = []
        text = "".join(
            sampler.generate_text(prompt, max_new_tokens=40, temperature=temperature, seed=0, on_rewind=events.append)
        )
        assert not [p for p in banned if p.lower() in text.lower()], text
        assert sampler.stats.finish_reason == ("length" if sampler.stats.delivered == 40 else "stop")
        assert all(e.reason.startswith("phrase '") and e.reason[8:-1] in e.text.lower() for e in events)
        if temperature == 0:
            assert events, text
    # the 50,000-phrase list (soft bans, whole words) on the real model: it runs and honours its hard bans
    sampler = BacktrackSampler(provider, AntiSlopStrategy(provider, many_phrases + ["the"], whole_words=True))
    text = "".join(sampler.generate_text("The sun is", max_new_tokens=20, temperature=0))
    assert sampler.stats.finish_reason == ("length" if sampler.stats.delivered == 20 else "stop")
    assert not re.search(r"\bthe\b", text.lower()), text


@pytest.mark.model
def test_real_model_regex_only_ban(provider):
    sampler = BacktrackSampler(provider, AntiSlopStrategy(provider, [], regexes=[r"\bthe\b"]))
    events = []
    text = "".join(
        sampler.generate_text(
            "Facts about the sun: The sun is a", max_new_tokens=30, temperature=0, on_rewind=events.append
        )
    )
    assert events and not re.search(r"\bthe\b", text, re.IGNORECASE), text


def test_strategies_built_from_one_list_share_its_tables_and_keep_their_own_state(many_phrases):
    # a batch builds one strategy per prompt: the 50,000-phrase tables are built once, the state is each one's
    provider = FakeProvider()
    one, two = (AntiSlopStrategy(provider, many_phrases, whole_words=True) for _ in range(2))
    assert one.matcher.phrases is two.matcher.phrases and one.matcher.sorted is two.matcher.sorted
    text = provider.encode(f" and {many_phrases[0][0]} and more", add_special_tokens=False)
    assert one.backtrack(text) != text  # the first phrase: rewound
    assert two.get_keep_index() == 0 and two.matcher.view.tokens == []  # the other saw nothing
    edited = [list(item) for item in many_phrases]
    edited[0][1] = 1.0  # a multiplier of 1: not banned; the same list changed in place is built again
    three = AntiSlopStrategy(provider, edited, whole_words=True)
    assert three.matcher.phrases is not one.matcher.phrases and len(three.matcher.phrases) == len(many_phrases) - 1
    edited[1][1] = 1.0
    assert len(AntiSlopStrategy(provider, edited, whole_words=True).matcher.phrases) == len(many_phrases) - 2
