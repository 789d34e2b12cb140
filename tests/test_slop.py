"""Slop measures (backtrack_sampler.quality.slop) on fixed texts, the near-repeat loop corpus of
the detector they share with RepetitionStrategy, and `backtrack-sampler slop score` on files
the test writes."""

from __future__ import annotations

import json

import pytest

from backtrack_sampler import cli
from backtrack_sampler.quality import find_repeat, is_degenerate, words_of
from backtrack_sampler.quality.mine import hits, profile
from backtrack_sampler.quality.slop import (
    NOT_X_BUT_Y,
    Output,
    bootstrap,
    compare,
    cross_ngrams,
    mattr,
    overrepresented,
    score,
)

# --- the loop corpus: near-repeats are loops, a refrain or a name is not ---------------------------
LOOPS = [
    "Reflections of our dreams,\nReflecting on our dreams,\nReflections to our dreams,\nReflections of our dreams,",
    "I am super proud of you. I am SUPER proud of you. I am Super proud of you.",
    "Oak is hard. It is often used for furniture making, often used for furniture making.",
    "The ocean is a canvas of beauty. The ocean is a canvas of wonder. The ocean is a canvas of joy.",
    "P.S. I hope you have a great day too.\n\nP.S. I hope you have a good day too.\n\nP.S. I hope you have a great day, too!",
    "A dream's a dream, a dream's a dream.",
]
PROSE = [
    "The keeper looked at the sea. The keeper looked at the sky. Then he went to bed.",
    "Mara opened the door. Outside, Mara saw the fox again, and the fox saw Mara.",
    "A star that never sleeps,\nA river that never rests,\nA heart that always keeps\nIts promise to the rest.",
    "1. Oak: hard and heavy.\n2. Pine: soft and light.\n3. Ash: tough and springy.",
]


@pytest.mark.parametrize("text", LOOPS)
def test_near_repeats_are_loops(text):
    found = find_repeat(text)
    assert found is not None, text
    assert text[: found.start].strip()  # one copy is kept: the loop begins after it


@pytest.mark.parametrize("text", PROSE)
def test_prose_is_not_a_loop(text):
    assert not is_degenerate(text), find_repeat(text)


def test_a_near_loop_is_found_where_it_began():
    text = "Reflections of our dreams,\nReflecting on our dreams,\nReflections to our dreams,\nAnd then"
    found = find_repeat(text)
    assert found.kind == "near" and text[found.start :].startswith("Reflecting on our dreams")  # the 1st near-copy
    assert text[found.source :].startswith("Reflections of our dreams")


# --- the measures on fixed texts ---------------------------------------------------------------------
def test_not_x_but_y_family():
    hits = [
        "It is not just a house, but a home.",
        "She was not afraid; rather, she was curious.",
        "It isn't about winning, it's about love.",
        "It's not the end. It's a beginning.",
    ]
    misses = ["I do not know.", "But the house was not a home", "Not yet. Soon."]
    assert all(len(NOT_X_BUT_Y.findall(t)) == 1 for t in hits)
    assert not any(NOT_X_BUT_Y.findall(t) for t in misses)
    outputs = [Output(" ".join(hits))]
    value = score(outputs, rounds=10)["not_x_but_y_per_1k"].value
    assert value == pytest.approx(4 / len(" ".join(hits)) * 1000)


def test_over_represented_words_against_human_text():
    texts = ["A tapestry of light in the room.", "The tapestry glowed in the room.", "Her tapestry and the room."]
    over = overrepresented(texts, min_count=3, min_ratio=20)
    assert "tapestry" in over and "the" not in over  # "the" is as common in human text
    assert over["tapestry"] > 100 * over["room"]  # "room" is a common word, "tapestry" a rare one
    per_1k = score([Output(t) for t in texts], rounds=10)["overrep_per_1k"].value
    assert per_1k == pytest.approx(6 / 18 * 1000)  # 6 hits ("tapestry", "room": rare at this rate) in 18 words


def test_phrases_across_outputs():
    texts = ["Once upon a time a fox ran.", "Once upon a time a cat sat.", "Once upon a time it rained.", "A dog."]
    grams = cross_ngrams(texts, n=3, min_docs=3)
    assert grams == {("once", "upon", "a"): 3, ("upon", "a", "time"): 3}
    assert cross_ngrams(texts, n=3, min_docs=4) == {}


def test_mattr():
    assert mattr("a b c d") == 1.0 and mattr("a a a a") == 0.25 and mattr("") == 0.0
    text = " ".join(["a", "b"] * 300)  # 600 words, 2 types: every 500-word window has 2 unique words
    assert mattr(text) == pytest.approx(2 / 500)
    assert mattr("a b c d e f", window=3) == 1.0 and mattr("a b a b", window=2) == 1.0
    assert mattr("a a b b", window=2) == pytest.approx((1 + 2 + 1) / 3 / 2)


def test_loops_and_early_endings():
    outputs = [Output(LOOPS[0], "length"), Output(PROSE[0], "stop"), Output(" ".join(["word"] * 3 + PROSE), "length")]
    result = score(outputs, rounds=50)
    assert result["loops"].value == pytest.approx(1 / 3)
    assert result["early_endings"].value == pytest.approx(1 / 3)  # the short one that stopped
    assert score(outputs, rounds=50, early_words=5)["early_endings"].value == 0.0


def test_bootstrap_intervals():
    pairs = [(float(i % 2), 1.0) for i in range(200)]  # half: a share of 0.5
    e = bootstrap(pairs, 1.0, rounds=500)
    assert e.value == 0.5 and 0.40 < e.low < 0.5 < e.high < 0.60
    same = bootstrap([(1.0, 1.0)] * 20, 1.0, rounds=100)
    assert (same.low, same.value, same.high) == (1.0, 1.0, 1.0)
    a = [Output("It is not just a house, but a home.")] * 30
    b = [Output("The house is a home for them all.")] * 30
    diff = compare(a, b, rounds=200)["not_x_but_y_per_1k"]
    assert diff.value < 0 and diff.high < 0  # b has none: a real difference, its interval excludes 0


# --- the command -----------------------------------------------------------------------------------
def write(path, texts, reason="length"):
    path.write_text(
        "".join(json.dumps({"id": i, "text": t, "finish_reason": reason}) + "\n" for i, t in enumerate(texts))
    )
    return str(path)


def run(*argv):
    import io

    out, err = io.StringIO(), io.StringIO()
    status = cli.main(list(argv), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def test_slop_score_command(tmp_path):
    sloppy = write(tmp_path / "a.jsonl", ["It is not just a house, but a home. " + LOOPS[0]] * 12)
    clean = write(tmp_path / "b.jsonl", PROSE * 3)
    status, out, err = run("slop", "score", sloppy, "--rounds", "100")
    assert status == 0, err
    assert "not_x_but_y_per_1k" in out and "mattr" in out and "95% interval" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("loops")] == ["1.000"]
    status, out, err = run("slop", "score", "--compare", sloppy, clean, "--json", "--rounds", "100")
    assert status == 0, err
    diff = json.loads(out)[f"{clean} - {sloppy}"]
    assert diff["loops"]["value"] == -1.0 and diff["loops"]["high"] == -1.0
    assert diff["not_x_but_y_per_1k"]["high"] < 0 < diff["mattr"]["low"]
    (tmp_path / "bad.jsonl").write_text("not json\n")
    status, _, err = run("slop", "score", str(tmp_path / "bad.jsonl"))
    assert status == 1 and "bad.jsonl:1: not JSON" in err
    status, _, err = run("slop", "score")
    assert status == 1 and "give FILE.jsonl" in err


def test_slop_score_leaves_out_the_prompts_words(tmp_path):
    """The prompts' words are not over-represented slop (a story asked about a lighthouse says
    "lighthouse"), as the miner leaves them out: from --prompts (batch's input), or from the
    records' own "prompt" / "messages"."""
    texts = [f"The lighthouse keeper saw the lighthouse glow. A tapestry hung there, number {i}." for i in range(6)]
    plain = write(tmp_path / "out.jsonl", texts)
    prompts = tmp_path / "prompts.jsonl"
    request = "Write a story about a lighthouse keeper."
    prompts.write_text("".join(json.dumps({"id": i, "prompt": request}) + "\n" for i in range(6)))

    def rate(*argv):
        status, out, err = run("slop", "score", *argv, "--json", "--rounds", "20")
        assert status == 0, err
        return json.loads(out)[argv[0]]["overrep_phrases_per_1k"]["value"]

    words = sum(len(words_of(t)) for t in texts)
    entries = profile(texts, [request])
    assert entries and not any("lighthouse" in e.pattern or "keeper" in e.pattern for e in entries)
    assert any("lighthouse" in e.pattern for e in profile(texts))  # (without the prompts)
    blind, told = rate(plain), rate(plain, "--prompts", str(prompts))
    assert told == pytest.approx(1000 * sum(hits(t, entries) for t in texts) / words)
    assert blind > told  # without the prompts, "lighthouse" and "keeper" count too
    with_messages = tmp_path / "chat.jsonl"
    with_messages.write_text(
        "".join(
            json.dumps({"id": i, "text": t, "messages": [{"role": "user", "content": request}]}) + "\n"
            for i, t in enumerate(texts)
        )
    )
    assert rate(str(with_messages)) == pytest.approx(told)
    outputs = [Output(t, prompt=request) for t in texts]
    assert score(outputs, rounds=20)["overrep_phrases_per_1k"].value == pytest.approx(told)
    assert score([Output(t) for t in texts], rounds=20, prompts=[request])["overrep_phrases_per_1k"].value == (
        pytest.approx(told)
    )
    (tmp_path / "bad.jsonl").write_text("{}\n")
    status, _, err = run("slop", "score", plain, "--prompts", str(tmp_path / "bad.jsonl"))
    assert status == 1 and "no 'prompt' or 'messages'" in err
