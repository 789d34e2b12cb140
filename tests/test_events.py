"""Live generation events (backtrack_sampler.core.events), the Transcript that rebuilds text from them,
and ``generate --trace``: with the FakeProvider (fast, exact) and on the real embedded model."""

from __future__ import annotations

import io
import json

import pytest

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, CreativeWritingStrategy, ReplaceStrategy, cli
from backtrack_sampler.cli import generate
from backtrack_sampler.cli import model as cli_model
from backtrack_sampler.core.events import (
    Chosen,
    Done,
    EventTracker,
    Final,
    Provisional,
    Rewind,
    Transcript,
    event_dict,
    stream_events,
)
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.strategy.base_strategy import BaseStrategy


def strategies(p):
    return {
        "antislop": lambda: AntiSlopStrategy(p, [" the", "a", " cat sat"]),
        "creative": lambda: CreativeWritingStrategy(p, top_k_threshold_flat=3),
        "replace": lambda: ReplaceStrategy(p, find=["a"], replace=" the"),
        "none": lambda: BaseStrategy(),
    }


@pytest.mark.parametrize("name", ["antislop", "creative", "replace", "none"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_events_rebuild_the_exact_final_text(name, seed):
    p = FakeProvider()
    make = strategies(p)[name]
    expected = "".join(BacktrackSampler(p, make()).generate_text(" the cat", max_new_tokens=40, seed=seed))
    sampler = BacktrackSampler(p, make())
    transcript, events = Transcript(), list(stream_events(sampler, " the cat", max_new_tokens=40, seed=seed))
    for event in events:
        transcript.apply(event_dict(event))  # as a client of the server's stream would
        assert transcript.text.startswith(transcript.final)
    assert transcript.final == expected == "".join(e.text for e in events if isinstance(e, Final))
    assert transcript.provisional == ""
    done = events[-1]
    assert isinstance(done, Done) and [e for e in events if isinstance(e, Done)] == [done]
    assert (done.delivered, done.rewound, done.rewinds) == (
        sampler.stats.delivered,
        sampler.stats.rewound,
        sampler.stats.rewinds,
    )
    rewinds = [e for e in events if isinstance(e, Rewind)]
    assert len(rewinds) == done.rewinds and sum(len(e.tokens) for e in rewinds) == done.rewound
    chosen = {e.rewind: e for e in events if isinstance(e, Chosen)}
    assert sorted(chosen) == [e.index for e in rewinds]  # every rewind is resolved exactly once
    if name in ("antislop", "creative", "replace"):
        assert rewinds, "the strategy never rewound: the test proves nothing"


def test_rewound_text_is_shown_where_it_was_written():
    p = FakeProvider()
    sampler = BacktrackSampler(p, AntiSlopStrategy(p, [" the", "a"]))
    transcript = Transcript()
    for event in stream_events(sampler, " the cat", max_new_tokens=40, seed=3):
        transcript.apply(event)
        if isinstance(event, Rewind):
            # the rewind removes what follows `at`; the kept text is unchanged
            assert event.text in (" the", " a") and event.reason.startswith("phrase")
            assert transcript.text == transcript.rewinds[event.index]["prefix"]
    rendered = transcript.render()
    assert rendered.replace("[- the-]", "").replace("[- a-]", "") == transcript.final
    assert rendered.count("[-") == sampler.stats.rewinds > 0


def test_chosen_is_the_final_text_at_the_rewind():
    p = FakeProvider()
    sampler = BacktrackSampler(p, AntiSlopStrategy(p, [" the", "a", " cat sat"]))
    transcript, found = Transcript(), 0
    for event in stream_events(sampler, " the cat", max_new_tokens=60, seed=2):
        transcript.apply(event)
    for _index, record in transcript.rewinds.items():
        if record.get("chosen"):
            found += 1
            at = record["at"]
            assert transcript.final[at:].startswith(record["chosen"])
            assert record["chosen"] != record["text"]
    assert found


class RewindTwice(BaseStrategy):
    """Holds everything back; at 6 tokens rewinds to 4, then at 6 again rewinds to 1."""

    def reset(self):
        self.count = 0

    def get_keep_index(self):
        return 0

    def backtrack(self, tokens):
        if len(tokens) == 6 and self.count < 2:
            self.count += 1
            self.rewind_reason = f"test {self.count}"
            return tokens[: 4 if self.count == 1 else 1]
        return tokens


def test_a_rewind_to_an_earlier_position_discards_the_later_attempt_and_nests_it():
    p = FakeProvider()
    sampler = BacktrackSampler(p, RewindTwice())
    events = list(stream_events(sampler, " the", max_new_tokens=10, temperature=0))
    rewinds = [e for e in events if isinstance(e, Rewind)]
    assert [(e.position, e.reason) for e in rewinds] == [(4, "test 1"), (1, "test 2")]
    chosen = {e.rewind: e for e in events if isinstance(e, Chosen)}
    assert chosen[0].text is None  # its prefix (4 tokens) was rewound later: no final continuation
    assert chosen[1].text is not None and len(chosen[1].tokens) == len(rewinds[1].tokens)
    provisional = [e for e in events if isinstance(e, Provisional)]
    assert max(e.tokens for e in provisional) == 9  # everything is held back until the end (keep index 0)
    transcript = Transcript()
    for event in events:
        transcript.apply(event)
    assert len(transcript.strikes) == 1 and len(transcript.strikes[0].inner) == 1  # the first attempt, nested
    assert transcript.strikes[0].inner[0].at == rewinds[0].at - rewinds[1].at


def test_the_tracker_works_for_any_driver():
    """A driver of its own (as the server's scheduler is) gets the same events from a Generation."""
    p = FakeProvider()
    reference = [
        event_dict(e)
        for e in stream_events(BacktrackSampler(p, AntiSlopStrategy(p, ["a"])), " the", max_new_tokens=30, seed=5)
    ]
    generation = BacktrackSampler(p, AntiSlopStrategy(p, ["a"])).start(" the", max_new_tokens=30, seed=5)
    tracker, events = EventTracker(generation), []
    p.reset()
    while not generation.done:
        generation.advance(p.next_logits(generation.sequence))
        events += tracker.update()
    generation.close()
    events += tracker.update()
    strip = lambda es: [{k: v for k, v in e.items() if k != "seconds"} for e in es]  # noqa: E731
    assert strip([event_dict(e) for e in events]) == strip(reference)


def test_a_closed_generation_ends_with_done_without_finish_reason():
    p = FakeProvider()
    sampler = BacktrackSampler(p, RewindTwice())
    events = stream_events(sampler, " the", max_new_tokens=50, temperature=0)
    seen = [next(events) for _ in range(3)]
    events.close()
    assert not any(isinstance(e, Done) for e in seen)
    generation = sampler.start(" the", max_new_tokens=50, temperature=0)
    tracker = EventTracker(generation)
    generation.advance(p.next_logits(generation.sequence))
    tracker.update()
    generation.close()
    last = tracker.update()
    assert isinstance(last[-1], Done) and last[-1].finish_reason is None
    assert tracker.update() == []


# --- generate --trace --------------------------------------------------------------------------------
@pytest.fixture
def fake_model(monkeypatch):
    provider = FakeProvider(context_length=256)
    monkeypatch.setattr(cli_model, "load_provider", lambda *args, **kwargs: provider)
    return provider


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(argv, stdin=io.StringIO(""), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def read_trace(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_trace_writes_one_record_per_rewind(fake_model, tmp_path):
    trace = tmp_path / "trace.jsonl"
    status, out, err = run(
        [
            "generate",
            " the cat",
            "--max-new-tokens",
            "40",
            "--seed",
            "3",
            "--ban",
            " the",
            "--ban",
            "a",
            "--trace",
            str(trace),
        ]
    )
    assert status == 0, err
    records = read_trace(trace)
    rewinds, end = records[:-1], records[-1]
    assert end["type"] == "end" and end["text"] == out[:-1] and end["rewinds"] == len(rewinds) > 0
    for r in rewinds:
        assert set(r) == {
            "type",
            "index",
            "prompt",
            "prefix",
            "rejected",
            "chosen",
            "reason",
            "position",
            "rejected_tokens",
            "chosen_tokens",
        }
        assert r["prompt"] == " the cat" and r["rejected"] in (" the", " a") and r["reason"].startswith("phrase")
        assert out.startswith(r["prefix"] + r["chosen"])  # chosen: the final text at that prefix
        assert r["chosen"] != r["rejected"]
        assert fake_model.decode(r["rejected_tokens"]) == r["rejected"]
    assert sorted(r["index"] for r in rewinds) == list(range(len(rewinds)))


def test_trace_with_chat_records_the_messages_and_show_backtracking_still_works(fake_model, tmp_path, monkeypatch):
    monkeypatch.setattr(generate, "chat_prompt_tokens", lambda provider, messages: provider.encode(" the cat"))
    trace = tmp_path / "t.jsonl"
    status, out, err = run(
        [
            "generate",
            "the cat",
            "--chat",
            "--system",
            "be brief",
            "--max-new-tokens",
            "30",
            "--seed",
            "1",
            "--ban",
            "a",
            "--trace",
            str(trace),
            "--show-backtracking",
            "--color",
            "never",
        ]
    )
    assert status == 0, err
    records = read_trace(trace)
    assert records[-1]["type"] == "end"
    for r in records[:-1]:
        assert r["prompt"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
    assert ("[-" in err) == (len(records) > 1)


def test_trace_to_an_unwritable_path_is_a_one_line_error(fake_model, tmp_path):
    status, out, err = run(["generate", "the", "--trace", str(tmp_path / "missing" / "t.jsonl")])
    assert status == 1 and err.startswith("error: cannot write the trace file") and len(err.splitlines()) == 1


# --- the real model ------------------------------------------------------------------------------------
@pytest.mark.model
def test_events_on_the_real_model(llama_provider):
    prompt = "The capital of France is"
    plain = "".join(
        BacktrackSampler(llama_provider, BaseStrategy()).generate_text(prompt, max_new_tokens=12, temperature=0)
    )
    word = max(plain.split(), key=len)
    sampler = BacktrackSampler(llama_provider, AntiSlopStrategy(llama_provider, [word]))
    expected = "".join(sampler.generate_text(prompt, max_new_tokens=20, temperature=0))
    transcript = Transcript()
    for event in stream_events(sampler, prompt, max_new_tokens=20, temperature=0):
        transcript.apply(event)
    assert transcript.final == expected and word.lower() not in expected.lower()
    assert transcript.rewinds and all(
        word.lower() in r["text"].lower() or r["text"].strip() for r in transcript.rewinds.values()
    )
    assert word in transcript.render()  # the rejected attempt is still visible, struck out


@pytest.mark.model
def test_trace_on_the_real_model(tmp_path, monkeypatch):
    trace = tmp_path / "trace.jsonl"
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(
        [
            "generate",
            "The capital of France is",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
            "--n-ctx",
            "256",
            "--ban",
            "country",
            "--trace",
            str(trace),
        ],
        stdin=io.StringIO(""),
        stdout=out,
        stderr=err,
    )
    assert status == 0, err.getvalue()
    records = read_trace(trace)
    assert records[-1]["type"] == "end" and records[-1]["text"] == out.getvalue()[:-1]
    assert "country" not in out.getvalue().lower()  # greedy decoding writes "the capital of the country of France"
    assert any("country" in r["rejected"].lower() for r in records[:-1])
    for r in records[:-1]:
        if r["chosen"] is not None:
            assert out.getvalue().startswith(r["prefix"] + r["chosen"])
