"""Mining a model's own slop (backtrack_sampler.quality.mine) on fixed texts, and `backtrack-sampler
slop mine` from the command line: on the embedded chat model in process (4 prompts x 40 tokens, two
rounds, then resumed), and through a serving engine (the fake engine's wire format)."""

from __future__ import annotations

import io
import json
import math
import re

import pytest

from backtrack_sampler import cli
from backtrack_sampler.cli import batch as cli_batch
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.quality.mine import Entry, family_pattern, hits, human_frequency, profile, runs, stem
from backtrack_sampler.quality.slop import Output, score
from backtrack_sampler.strategy.lists import read_regexes, read_slops

STORIES = [
    "Once upon a time, Mara whispered to the fox. Her eyes sparkled with mischief.",
    "Once upon a time there was a lighthouse. The keeper whispers to the waves.",
    "Once upon a time a baker was whispering a song, her eyes sparkled with joy.",
    "A dog ran home in the rain. It was cold, and the dog was wet.",
]


def flat(word: str) -> float:
    """A baseline where every word (and phrase) has one frequency: ratios are count / total / 1e-3."""
    return 1e-3


def test_words_phrases_and_families_with_their_evidence():
    entries = {e.pattern: e for e in profile(STORIES, ["Write about a fox"], min_count=2, min_docs=2, min_ratio=20)}
    whisper = entries[family_pattern("whisper")]  # one family: three forms, in three stories
    assert whisper.kind == "regex" and whisper.members == ("whispered", "whispering", "whispers")
    assert (whisper.count, whisper.docs) == (3, 3)
    assert "once upon" in entries and entries["once upon"].docs == 3  # a phrase inside one run of words
    assert "once" not in entries and "upon" not in entries  # only ever in that phrase: the phrase is banned
    assert "time there" not in entries  # a comma ends a run of words: "time, Mara", "time there", "time a"
    assert "once upon a" not in entries  # it holds a banned phrase: banning that bans it too
    assert "eyes sparkled" in entries and "the" not in entries and "dog" not in entries  # 1 text / common words
    assert "fox" not in entries  # a word of the prompts
    words = sum(len(w) for text in STORIES for w in runs(text))
    once = entries["once upon"]
    assert once.ratio == pytest.approx(3 / words / human_frequency("once upon"))
    assert [e.score for e in entries.values()] == sorted((e.score for e in entries.values()), reverse=True)


def test_thresholds_and_ranking_on_a_flat_baseline():
    texts = ["red fox. red fox. blue owl."] * 4 + ["green frog."]
    entries = profile(texts, min_count=3, min_docs=3, min_ratio=20, baseline=flat)
    total = 6 * 4 + 2
    # each word is only ever in one phrase: the phrases are banned, not the words
    assert [(e.pattern, e.count, e.docs) for e in entries] == [("red fox", 8, 4), ("blue owl", 4, 4)]
    assert entries[0].ratio == pytest.approx(8 / total / 1e-3) and entries[0].score == pytest.approx(
        4 * math.log10(8 / total / 1e-3)
    )
    spread = profile(["red fox. red owl. red cat."] * 4, min_count=3, min_docs=3, baseline=flat)
    assert [e.pattern for e in spread] == ["red"]  # in three phrases: the word (its phrases go with it)
    assert profile(texts, min_count=3, min_docs=5, baseline=flat) == []  # nothing is in 5 texts
    assert profile(texts, min_ratio=1000, baseline=flat) == []


def test_a_family_bans_forms_not_seen_yet_and_hits_count_once():
    assert [stem(w) for w in ("whispered", "whispers", "whispering", "sparkle", "sparkling", "hope")] == [
        "whisper",
        "whisper",
        "whisper",
        "sparkl",
        "sparkl",
        "hope",
    ]
    family = Entry(family_pattern("whisper"), "regex", 3, 3, 100.0, ("whispered", "whispers"))
    assert read_regexes_ok([family.pattern])  # RE2 takes it (AntiSlop's --regex-file)
    assert hits("She Whisperer, whispery; they WHISPERED.", [family]) == 3
    assert hits("a star, the start, lingerie", [Entry(family_pattern("star"), "regex", 3, 3, 100.0)]) == 1
    once = Entry("once upon a", "phrase", 3, 3, 30.0)
    assert hits("Once upon a time... once upon a hill; Once-upon a; 'once upon a'", [once]) == 3  # any case
    assert hits("once upon a time", [once, Entry("upon a time", "phrase", 3, 3, 30.0)]) == 2  # each entry's
    assert hits("light light light", [Entry("light light", "phrase", 2, 1, 30.0)]) == 2  # as profile counts


def read_regexes_ok(patterns):
    from backtrack_sampler.strategy.lists import check_regexes

    return check_regexes(patterns) == patterns


def test_the_over_represented_phrase_rate():
    outputs = [Output(t) for t in STORIES]
    value = score(outputs, rounds=20)["overrep_phrases_per_1k"].value
    entries = profile(STORIES)
    words = sum(len(re.findall(r"\w+", t)) for t in STORIES)
    assert entries and value == pytest.approx(1000 * sum(hits(t, entries) for t in STORIES) / words, rel=0.02)
    plain = ["The dog ran home.", "We ate bread at noon.", "It rained all day.", "She read a book."]
    assert score([Output(t) for t in plain], rounds=20)["overrep_phrases_per_1k"].value == 0.0


def test_phrases_with_a_word_of_the_prompts_are_left_out():
    """A phrase holding a content word of the prompts is prompt-specific ("the old lighthouse" in
    stories asked about a lighthouse): left out, like the word. A function word of the prompts ("a",
    "about": common in human text) does not rule a phrase out."""
    texts = [
        "Once upon a time the old lighthouse stood alone.",
        "Once upon a time the old lighthouse was dark.",
        "Once upon a time the old lighthouse fell.",
    ]

    def baseline(text):  # function words common, every other word (and phrase) rare
        return 1e-2 if text in ("a", "about", "the", "write") else 1e-5

    loose = {e.pattern for e in profile(texts, min_count=3, min_docs=3, baseline=baseline)}
    assert "old lighthouse" in loose  # without the prompts: over-represented, and banned as the phrase
    asked = ["Write a story about a lighthouse"]
    entries = {e.pattern for e in profile(texts, asked, min_count=3, min_docs=3, baseline=baseline)}
    assert not any("lighthouse" in e for e in entries), entries  # neither the word nor a phrase holding it
    assert "once upon" in entries  # "a" is in the prompt too, but as a function word it rules out nothing
    assert "once upon" in loose and entries < loose


# --- the command -----------------------------------------------------------------------------------
def run(argv, stdin=""):
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_round_trip(folder, rounds):
    """The list files are what --slops/--regex-file read, and every entry's evidence is the truth
    about the round that found it; the rounds after it never hold a phrase it banned."""
    evidence = json.loads((folder / "evidence.json").read_text())
    entries = evidence["entries"]
    assert [r["round"] for r in evidence["rounds"]] == list(range(1, len(evidence["rounds"]) + 1))
    phrases = read_slops(str(folder / "slops.json"))
    regexes = read_regexes(str(folder / "regexes.json"))
    assert phrases == [e["pattern"] for e in entries if e["kind"] == "phrase"]
    assert regexes == [e["pattern"] for e in entries if e["kind"] == "regex"]
    for e in entries:
        texts = [r["text"] for r in read_jsonl(folder / f"round-{e['round']}.jsonl")]
        entry = Entry(e["pattern"], e["kind"], e["count"], e["docs"], e["ratio"])
        found = (sum(hits(t, [entry]) for t in texts), sum(hits(t, [entry]) > 0 for t in texts))
        if e["kind"] == "phrase":
            assert found == (e["count"], e["docs"]), e
        else:  # a family's regex also takes forms that were not counted in it (whisperer, whisper's)
            assert found >= (e["count"], e["docs"]), e
        for later in range(e["round"] + 1, rounds + 1):
            assert not any(hits(r["text"], [entry]) for r in read_jsonl(folder / f"round-{later}.jsonl")), e
    return evidence


@pytest.mark.model
def test_slop_mine_on_the_embedded_model(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    subjects = ["a fox in the snow", "a lighthouse keeper", "a baker at dawn", "a robot who paints"]
    prompts.write_text(
        "".join(
            json.dumps({"id": i, "prompt": f"Write a short story about {s}."}) + "\n" for i, s in enumerate(subjects)
        )
    )
    folder = tmp_path / "mined"
    argv = ["slop", "mine", str(prompts), "-o", str(folder), "--chat", "--iterations", "2", "--max-new-tokens", "40"]
    argv += ["--seed", "3", "--n-ctx", "512", "--parallel", "4", "--min-count", "2", "--min-docs", "2"]
    status, out, err = run(argv)
    assert status == 0, err
    evidence = check_round_trip(folder, len(json.loads((folder / "evidence.json").read_text())["rounds"]))
    assert len(read_jsonl(folder / "round-1.jsonl")) == 4 and evidence["entries"], err
    assert "slops.json" in out and "--whole-words" in out and evidence["entries"][0]["pattern"] in out
    rounds = evidence["rounds"]
    assert len(rounds) == 2 and rounds[0]["bans"] == "0 phrases and 0 regexes"
    assert set(rounds[1]["measures"]) >= {"overrep_phrases_per_1k", "mattr", "early_endings", "rewind_endings"}
    second = read_jsonl(folder / "round-2.jsonl")
    pairs = read_jsonl(folder / "round-2.pairs.jsonl")
    assert len(second) == 4 and len(pairs) <= sum(r["rewinds"] for r in second)
    for pair in pairs:  # TRL's conversational format, as batch writes it
        assert pair["prompt"][-1]["role"] == "user" and pair["chosen"][0]["role"] == "assistant"
    before = {p.name: p.read_text() for p in folder.iterdir()}
    status, again, err = run(argv)  # the same command again: everything is read back, nothing generated
    assert status == 0 and again == out and "resuming: 4 of 4 prompts are done" in err
    assert {p.name: p.read_text() for p in folder.iterdir()} == before


def test_slop_mine_through_an_engine(monkeypatch, tmp_path):
    """--engine: the rounds run on the engine's backend (the fake engine's vLLM wire format and a
    model of known words); what round 1 finds is banned in round 2."""
    from engine_fakes import FakeEngine

    from backtrack_sampler.engine import EngineProvider

    words = [" the", " cat", " sat", " on", " a", " mat", " tapestry", " of", " light", " and", " it", " was", "."]
    model = FakeProvider(vocab=["<pad>", "<eos>", "<bos>", *words])
    fake = FakeEngine("vllm", model.logits_for, model.vocab_size, eos=model.get_eos_token_id())
    try:
        monkeypatch.setattr(
            cli_batch, "load", lambda args, chat, slots=1: EngineProvider(fake.url, "vllm", tokenizer=model, timeout=5)
        )
        starts = [" it was", " the cat", " a mat", " the light"]
        lines = "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(starts))
        folder = tmp_path / "mined"
        argv = ["slop", "mine", "-", "-o", str(folder), "--engine", fake.url, "--engine-type", "vllm"]
        argv += ["--iterations", "2", "--max-new-tokens", "30", "--seed", "1", "--min-docs", "2"]
        status, out, err = run(argv, stdin=lines)  # stdin is read once, into DIR/prompts.jsonl, for every round
        assert status == 0, err
        assert (folder / "prompts.jsonl").read_text() == lines
        evidence = check_round_trip(folder, 2)
        assert "tapestry" in {e["pattern"] for e in evidence["entries"]}, out  # the rarest word of the fake's
        assert (
            "tapestry" in (folder / "round-1.jsonl").read_text()
            and "tapestry" not in (folder / "round-2.jsonl").read_text()
        )
        assert len(read_jsonl(folder / "round-2.jsonl")) == 4 and read_jsonl(folder / "round-2.trace.jsonl")
    finally:
        fake.close()


class FakeRounds:
    """Stands in for ``batch.run`` under ``slop mine``: writes round K's completions (every prompt's
    text is ``texts[K]``) and notes the list it was given to ban, or fails at ``fail_at``."""

    def __init__(self, texts, fail_at=None):
        self.texts, self.fail_at, self.banned, self.regexes = texts, fail_at, {}, {}

    def __call__(self, args, stdin, stderr):
        k = int(re.search(r"round-(\d+)\.jsonl$", args.output).group(1))
        if k == self.fail_at:
            stderr.write("error: the engine is down\n")
            return 1
        lists = [p for p in args.slops if "round-" in p]  # the list round k bans: the one after round k-1
        self.banned[k] = (lists, read_slops(lists[0]) if lists else [])
        self.regexes[k] = [read_regexes(p) for p in args.regex_file if "round-" in p]
        prompts = [json.loads(line) for line in open(args.input, encoding="utf-8") if line.strip()]
        texts = self.texts[k] if isinstance(self.texts[k], list) else [self.texts[k]] * len(prompts)
        records = [
            {"id": p["id"], "text": t, "finish_reason": "length", "delivered": 20} for p, t in zip(prompts, texts)
        ]
        with open(args.output, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(r) + "\n" for r in records)
        open(args.trace, "w").close()
        return 0


def test_a_failed_rerun_keeps_the_list(monkeypatch, tmp_path):
    """The list files are written whole, after a round is mined: a rerun (resume) that fails leaves
    the finished run's list as it was (it used to write an empty slops.json before round 1), and a
    run that fails in round 2 leaves round 1's list (round-1.slops.json), and no partial files."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"Tell me about item {i}."}) + "\n" for i in range(4)))
    texts = {1: "A tapestry of moonlight glowed.", 2: "A mosaic of starlight shimmered.", 3: "Nothing else."}
    folder = tmp_path / "mined"
    argv = ["slop", "mine", str(prompts), "-o", str(folder), "--iterations", "2", "--quiet", "--min-gain", "0"]
    fake = FakeRounds(texts)
    monkeypatch.setattr(cli_batch, "run", fake)
    status, out, err = run(argv)
    assert status == 0, err
    finished = {p.name: p.read_text() for p in folder.iterdir()}
    listed = read_slops(str(folder / "slops.json"))
    assert any("tapestry" in p for p in listed) and any("mosaic" in p for p in listed)  # rounds 1 and 2 mined
    first = read_slops(str(folder / "round-1.slops.json"))
    assert any("tapestry" in p for p in first) and not any("mosaic" in p for p in first)
    assert fake.banned[1] == ([], []) and fake.banned[2] == ([str(folder / "round-1.slops.json")], first)

    for fail_at in (1, 2):  # the same command again, and the engine fails: nothing of the list is lost
        monkeypatch.setattr(cli_batch, "run", FakeRounds(texts, fail_at=fail_at))
        status, _, err = run(argv)
        assert status == 1 and "engine is down" in err
        assert {p.name: p.read_text() for p in folder.iterdir()} == finished

    fresh = tmp_path / "fresh"  # a first run that fails in round 2: round 1's list is there, whole
    monkeypatch.setattr(cli_batch, "run", FakeRounds(texts, fail_at=2))
    status, _, _ = run([*argv[:4], str(fresh), *argv[5:]])
    assert status == 1
    assert read_slops(str(fresh / "round-1.slops.json")) == first
    assert not (fresh / "slops.json").exists() and not [p for p in fresh.iterdir() if ".tmp" in p.name]


def test_soft_bans_and_documents_that_are_prompts(monkeypatch, tmp_path):
    """--multiplier X writes the list as [phrase, X] pairs (a family as its forms: soft bans take
    phrases only) and the rounds ban that way; outputs of one prompt (under other ids) are one
    document: an entry must recur across different prompts."""
    requests = ["Tell me about a cat.", "Tell me about a dog.", "Tell me about an owl."]
    lines = [json.dumps({"id": f"{i}-{k}", "prompt": r}) for k in range(2) for i, r in enumerate(requests)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    first = [  # whisper* in all three requests' stories; "velvet moon" six times, but for one request only
        "She whispered to the velvet moon.",
        "He whispers, then sleeps.",
        "They were whispering all night.",
        "The velvet moon rose. The velvet moon set.",
        "He whispers. It whispered back.",
        "A velvet moon, a velvet moon.",
    ]
    fake = FakeRounds({1: first, 2: "Nothing here at all."})
    monkeypatch.setattr(cli_batch, "run", fake)
    folder = tmp_path / "soft"
    argv = ["slop", "mine", str(prompts), "-o", str(folder), "--iterations", "2", "--quiet", "--min-gain", "0"]
    status, _, err = run([*argv, "--multiplier", "0.1", "--min-count", "3", "--min-docs", "3"])
    assert status == 0, err
    evidence = json.loads((folder / "evidence.json").read_text())
    entries = {e["pattern"]: e for e in evidence["entries"]}
    whisper = entries[family_pattern("whisper")]
    assert whisper["docs"] == 3 and whisper["count"] == 5 and "velvet moon" not in entries  # 1 request of 3
    assert not any("velvet" in p for p in entries)
    pairs = read_slops(str(folder / "slops.json"))
    assert read_regexes(str(folder / "regexes.json")) == []  # a regex is a hard ban: the family goes as phrases
    assert ["whispered", 0.1] in pairs and ["whispering", 0.1] in pairs and ["whisper", 0.1] in pairs
    assert all(multiplier == 0.1 for _, multiplier in pairs)
    assert fake.banned[2] == ([str(folder / "round-1.slops.json")], pairs) and fake.regexes[2] == [[]]
    loose = tmp_path / "loose"  # every output its own document (distinct prompts): "velvet moon" passes
    unique = tmp_path / "unique.jsonl"
    unique.write_text("".join(json.dumps({"id": i, "prompt": f"Tell me about thing {i}."}) + "\n" for i in range(6)))
    monkeypatch.setattr(cli_batch, "run", FakeRounds({1: first}))
    status, _, err = run(["slop", "mine", str(unique), "-o", str(loose), "--quiet", "--min-docs", "3"])
    assert status == 0, err
    assert "velvet moon" in read_slops(str(loose / "slops.json"))
    status, _, err = run([*argv, "--multiplier", "1.5"])
    assert status == 2


def test_documents_can_be_groups_of_outputs():
    texts = ["red fox.", "red fox.", "red fox.", "red fox."]
    assert [(e.pattern, e.docs) for e in profile(texts, min_docs=3, baseline=flat)] == [("red fox", 4)]
    assert profile(texts, min_docs=3, baseline=flat, groups=["a", "a", "b", "b"]) == []  # two prompts only
    entries = profile(texts, min_docs=2, baseline=flat, groups=["a", "a", "b", "b"])
    assert [(e.pattern, e.count, e.docs) for e in entries] == [("red fox", 4, 2)]


def test_slop_mine_usage_errors(tmp_path, capsys):
    status, _, err = run(["slop", "mine", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o")])
    assert status == 1 and "cannot" in err and "missing.jsonl" in err
    status, _, _ = run(["slop", "mine", "-", "-o", str(tmp_path / "o"), "--iterations", "0"])
    assert status == 2 and "--iterations: expected an integer >= 1" in capsys.readouterr().err
    assert cli.main(["slop", "mine", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in ("--iterations", "--min-ratio", "--engine", "--slops", "--parallel"))


# --- a rewind does not end the text (AntiSlopStrategy) ---------------------------------------------
def test_a_ban_does_not_make_the_text_end():
    """Where a banned phrase is rewound, end-of-text is excluded too: the model had not ended
    there. It stays possible when nothing else is left, and one token later."""
    import numpy as np

    from backtrack_sampler import AntiSlopStrategy, BacktrackSampler

    vocab = ["<pad>", "<eos>", "<bos>", " a", " tapestry", " rug", "."]
    ids = {piece: i for i, piece in enumerate(vocab)}

    def logits(tokens, others=1.0):
        out = np.full(len(vocab), -np.inf, np.float32)
        if tokens[-1] == ids[" rug"]:
            out[ids["<eos>"]] = 0.0  # the story ends after the rug
            return out
        out[[ids[" tapestry"], ids["<eos>"], ids[" rug"]]] = [3.0, 2.0, others]  # banned, then the end, then rug
        return out

    for others, text, rewinds in ((1.0, " rug", 1), (-np.inf, "", 1)):  # (-inf: the end is all that is left)
        provider = FakeProvider(vocab=vocab, logits_fn=lambda tokens: logits(tokens, others))
        sampler = BacktrackSampler(provider, AntiSlopStrategy(provider, ["tapestry"]))
        assert "".join(sampler.generate_text(" a", max_new_tokens=5, temperature=0)) == text
        assert (sampler.stats.finish_reason, sampler.stats.rewinds) == ("stop", rewinds)


@pytest.mark.model
def test_slop_mine_through_llama_server(tmp_path):
    """--engine with a real llama-server (the engine tests' fixture: the embedded Gemma 3 270M on
    4 slots): two rounds of 4 continuations; what round 1 finds, round 2 never writes."""
    from test_engine_llama_server import LlamaServer, llama_server_binary

    from backtrack_sampler.provider.models import default_model_path

    gguf = str(default_model_path())
    server = LlamaServer(llama_server_binary(), gguf, slots=4, n_ctx=2048)
    try:
        prompts = tmp_path / "p.jsonl"
        starts = [
            "Once upon a time, a fox",
            "The old lighthouse keeper",
            "In the morning the baker",
            "The robot painter",
        ]
        prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(starts)))
        folder = tmp_path / "mined"
        argv = ["slop", "mine", str(prompts), "-o", str(folder), "--engine", server.url, "--tokenizer", gguf]
        argv += ["--iterations", "2", "--max-new-tokens", "40", "--seed", "2", "--parallel", "4"]
        argv += ["--min-count", "2", "--min-docs", "2"]
        status, out, err = run(argv)
        assert status == 0, err
        evidence = check_round_trip(folder, len(json.loads((folder / "evidence.json").read_text())["rounds"]))
        assert evidence["entries"] and all(
            len(read_jsonl(folder / f"round-{r['round']}.jsonl")) == 4 for r in evidence["rounds"]
        )
        assert all(r["text"] for r in read_jsonl(folder / "round-1.jsonl"))  # decoded with the served model's tokenizer
    finally:
        server.stop()


def test_slop_score_counts_endings_at_a_rewind(tmp_path):
    """`slop score FILE --trace TRACE`: an output that stopped at (or 2 tokens after) a place a rewind
    went back to is an ending at a rewind; one that wrote on after its rewinds is not."""
    out, trace = tmp_path / "out.jsonl", tmp_path / "trace.jsonl"
    records = [(0, "stop", 10), (1, "stop", 30), (2, "length", 30), (3, "stop", 12)]
    out.write_text(
        "".join(
            json.dumps({"id": i, "text": "A fox ran. " * n, "finish_reason": why, "delivered": n}) + "\n"
            for i, why, n in records
        )
    )
    rewinds = [(0, 9), (1, 5), (2, 29), (3, 9)]  # id 0: 1 token before its end, id 3: 3 tokens before
    trace.write_text("".join(json.dumps({"type": "rewind", "id": i, "position": p}) + "\n" for i, p in rewinds))
    status, text, err = run(["slop", "score", str(out), "--trace", str(trace), "--json", "--rounds", "50"])
    assert status == 0, err
    assert json.loads(text)[str(out)]["rewind_endings"]["value"] == 0.25
    status, text, _ = run(["slop", "score", str(out), "--json", "--rounds", "50"])
    assert "rewind_endings" not in json.loads(text)[str(out)]  # unknown without the trace
    status, _, err = run(["slop", "score", str(out), str(out), "--trace", str(trace)])
    assert status == 1 and "--trace goes with one FILE" in err
