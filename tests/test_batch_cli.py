"""``backtrack-sampler batch`` with a FakeProvider (fast): records, per-line overrides, bad lines,
resuming after an interruption, traces and preference pairs, and a fake serving engine."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from backtrack_sampler import cli
from backtrack_sampler.cli import batch as cli_batch
from backtrack_sampler.cli import batchfile
from backtrack_sampler.cli import model as cli_model
from backtrack_sampler.cli.batchfile import JsonlOutput, preference_pair, read_prompts
from backtrack_sampler.provider.fake_provider import FakeProvider

PROMPTS = [
    {"id": "a", "prompt": " it was"},
    {"id": "b", "prompt": " the cat", "max_tokens": 5, "temperature": 0},
    {"prompt": " a dog", "seed": 7},  # no id: its line number (3)
    {"id": 4, "messages": [{"role": "system", "content": " it"}, {"role": "user", "content": " the mat"}]},
    {"id": "e", "prompt": " it sat", "top_k": 3, "top_p": 0.9, "min_p": 0.05},
]


@pytest.fixture
def fake_model(monkeypatch):
    provider = FakeProvider(context_length=256)
    monkeypatch.setattr(cli_model, "load_provider", lambda *args, **kwargs: provider)
    # the fake has no chat format: a chat is its messages' contents in a row
    monkeypatch.setattr(
        batchfile, "chat_prompt_tokens", lambda p, messages: p.encode("".join(m["content"] for m in messages))
    )
    return provider


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def read_jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(argv, stdin=""):
    err = io.StringIO()
    status = cli.main(argv, stdin=io.StringIO(stdin), stdout=io.StringIO(), stderr=err)
    return status, err.getvalue()


def test_every_prompt_gets_one_record_with_its_overrides(fake_model, tmp_path):
    prompts, out = write_jsonl(tmp_path / "p.jsonl", PROMPTS), tmp_path / "out.jsonl"
    status, err = run(["batch", str(prompts), "-o", str(out), "--max-new-tokens", "12", "--seed", "1"])
    assert status == 0, err
    records = {r["id"]: r for r in read_jsonl(out)}
    assert sorted(records, key=str) == sorted(["a", "b", 3, 4, "e"], key=str)
    for record in records.values():
        assert set(record) >= {"id", "text", "finish_reason", "delivered", "rewound", "rewinds", "seconds"}
        assert record["finish_reason"] in ("stop", "length") and record["delivered"] <= 12
    assert records["b"]["delivered"] <= 5
    assert "5 completions written" in err and "tokens/s" in err  # the summary
    # the same command again: everything is done, nothing is generated or appended
    status, err = run(["batch", str(prompts), "-o", str(out), "--max-new-tokens", "12", "--seed", "1"])
    assert status == 0 and len(read_jsonl(out)) == 5 and "5 of 5 prompts are done" in err


def test_seeded_runs_are_reproducible_per_line(fake_model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    texts = []
    for name, parallel in (("one.jsonl", "1"), ("many.jsonl", "4")):
        status, err = run(["batch", str(prompts), "-o", str(tmp_path / name), "--seed", "5", "--parallel", parallel])
        assert status == 0, err
        texts.append({r["id"]: r["text"] for r in read_jsonl(tmp_path / name)})
    assert texts[0] == texts[1]  # each line has its own seed (5 + line number), whatever runs beside it


BAD = [
    '{"prompt": "ok"}',
    '{"prompt": "unterminated',
    '["a list"]',
    '{"id": "x"}',
    '{"prompt": "p", "messages": []}',
    '{"messages": [{"role": "robot", "content": "hi"}]}',
    '{"id": 1.5, "prompt": "p"}',
    '{"prompt": "p", "temperature": "hot"}',
    '{"prompt": "p", "max_tokens": -1}',
    '{"prompt": "p", "top_p": 2}',
    '{"id": 1, "prompt": "the same id as line 1"}',
    "",
    '{"prompt": "fine too"}',
]


def test_bad_lines_are_reported_with_their_line_numbers(fake_model, tmp_path):
    _, bad = read_prompts(BAD)
    assert [b.line for b in bad] == list(range(2, 12))
    messages = "\n".join(map(str, bad))
    for words in (
        "line 2: not valid JSON",
        "line 3: expected a JSON object",
        "line 4: no 'prompt' or 'messages'",
        "line 5: give either",
        "line 6: messages[0]",
        "line 7: 'id'",
        "line 8: 'temperature' must be a number",
        "line 9: 'max_tokens' must be an integer >= 0",
        "line 10: top_p",
        "line 11: id 1 is already used on line 1",
    ):
        assert words in messages, words
    prompts, out = write_jsonl(tmp_path / "p.jsonl", BAD), tmp_path / "out.jsonl"
    status, err = run(["batch", str(prompts), "-o", str(out)])  # fatal by default: nothing runs
    assert status == 1 and not out.exists()
    assert f"error: {prompts} line 2: not valid JSON" in err and "10 bad lines" in err and "--skip-bad-lines" in err
    status, err = run(["batch", str(prompts), "-o", str(out), "--skip-bad-lines", "--max-new-tokens", "4"])
    assert status == 0, err
    assert f"warning: {prompts} line 11: id 1 is already used on line 1 (skipped)" in err
    assert sorted(r["id"] for r in read_jsonl(out)) == [1, 13]


def test_a_prompt_too_long_for_the_context_is_a_bad_line(fake_model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "long", "prompt": " it" * 400}, {"id": "ok", "prompt": " it"}])
    out = tmp_path / "out.jsonl"
    status, err = run(["batch", str(prompts), "-o", str(out), "--max-new-tokens", "4"])
    assert status == 1 and "line 1:" in err and "context" in err
    status, err = run(["batch", str(prompts), "-o", str(out), "--max-new-tokens", "4", "--skip-bad-lines"])
    assert status == 0 and [r["id"] for r in read_jsonl(out)] == ["ok"] and "1 bad prompts skipped" in err


INTERRUPT = '''
from backtrack_sampler import BaseStrategy

class Interrupt(BaseStrategy):
    """Changes nothing; Ctrl-C (KeyboardInterrupt) once `after` tokens were drawn in this process."""
    count = 0

    def __init__(self, after: int = 10**9):
        self.after = after

    def on_next_token(self, continuation_tokens, probs):
        Interrupt.count += 1
        if Interrupt.count == self.after:
            raise KeyboardInterrupt
'''


def test_an_interrupted_run_resumes_without_duplicates(fake_model, tmp_path):
    """Ctrl-C midway: exit 130, only whole records written; the same command completes the rest,
    and the result is the same as an uninterrupted run (seeded)."""
    rows = [{"id": f"p{i}", "prompt": " it was" if i % 2 else " the cat"} for i in range(12)]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    (tmp_path / "interrupt.py").write_text(INTERRUPT)
    strategy = ["--strategy", f"{tmp_path / 'interrupt.py'}:Interrupt", "--strategy-args", '{"after": 60}']
    common = ["--max-new-tokens", "10", "--seed", "3", "--parallel", "3", "--ban", " the", "--temperature", "0.8"]
    out, trace = tmp_path / "out.jsonl", tmp_path / "trace.jsonl"
    status, err = run(["batch", str(prompts), "-o", str(out), "--trace", str(trace), *common, *strategy])
    assert status == 130 and "interrupted:" in err, err
    first = read_jsonl(out)
    assert 0 < len(first) < 12
    status, err = run(["batch", str(prompts), "-o", str(out), "--trace", str(trace), *common])
    assert status == 0, err
    assert f"resuming: {len(first)} of 12 prompts are done" in err
    records = read_jsonl(out)
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in rows)  # each once
    assert records[: len(first)] == first
    clean = tmp_path / "clean.jsonl"
    assert run(["batch", str(prompts), "-o", str(clean), *common])[0] == 0
    by_id = lambda rs: {r["id"]: r["text"] for r in rs}  # noqa: E731
    assert by_id(records) == by_id(read_jsonl(clean))
    assert {r["id"] for r in read_jsonl(trace)} <= {r["id"] for r in records}


def test_a_cut_off_last_line_is_dropped_and_a_foreign_file_is_refused(fake_model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:3])
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "a", "text": "done before"}) + "\n" + '{"id": "b", "te')  # killed mid-write
    status, err = run(["batch", str(prompts), "-o", str(out), "--max-new-tokens", "4"])
    assert status == 0 and "cut-off line" in err
    records = read_jsonl(out)
    assert [r["id"] for r in records][0] == "a" and records[0]["text"] == "done before"
    assert sorted(map(str, (r["id"] for r in records))) == ["3", "a", "b"]
    foreign = write_jsonl(tmp_path / "foreign.jsonl", ["not json", '{"id": 1}'])
    status, err = run(["batch", str(prompts), "-o", str(foreign)])
    assert status == 1 and "line 1 is not a JSON record with an 'id'" in err
    assert foreign.read_text() == 'not json\n{"id": 1}\n'  # untouched


def test_a_failing_generation_is_reported_and_not_written(fake_model, tmp_path):
    boom = tmp_path / "boom.py"
    boom.write_text(
        "from backtrack_sampler import BaseStrategy\n\nclass Boom(BaseStrategy):\n"
        "    def backtrack(self, tokens):\n        if len(tokens) == 2:\n"
        "            raise RuntimeError('boom')\n        return tokens\n"
    )
    prompts, out = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2]), tmp_path / "out.jsonl"
    status, err = run(["batch", str(prompts), "-o", str(out), "--strategy", f"{boom}:Boom"])
    assert status == 1 and "error: id 'a' (line 1) failed: RuntimeError: boom" in err and "2 failed" in err
    assert read_jsonl(out) == []


def test_trace_and_pairs(fake_model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out, trace, pairs = tmp_path / "out.jsonl", tmp_path / "trace.jsonl", tmp_path / "pairs.jsonl"
    status, err = run(
        [
            "batch",
            str(prompts),
            "-o",
            str(out),
            "--trace",
            str(trace),
            "--pairs",
            str(pairs),
            "--ban",
            " the",
            "--ban",
            " cat",
            "--seed",
            "2",
            "--max-new-tokens",
            "20",
        ]
    )
    assert status == 0, err
    records = {r["id"]: r for r in read_jsonl(out)}
    rewinds = read_jsonl(trace)
    assert rewinds and all(r["type"] == "rewind" and r["id"] in records for r in rewinds)
    assert sum(r["rewinds"] for r in records.values()) == len(rewinds)
    for r in rewinds:
        assert r["rejected"] in (" the", " cat") or r["rejected"].startswith((" the", " cat")), r
    dpo = read_jsonl(pairs)
    assert dpo and len(dpo) <= len(rewinds) and f"{len(dpo)} preference pairs" in err
    for pair in dpo:
        assert set(pair) == {"id", "prompt", "chosen", "rejected"} and pair["chosen"] != pair["rejected"]
        if pair["id"] == 4:  # a chat: TRL's conversational format
            assert pair["prompt"][-1] == {"role": "user", "content": " the mat"}
            assert pair["chosen"][0]["role"] == "assistant"
        else:
            assert isinstance(pair["prompt"], str) and pair["prompt"].startswith(
                next(p["prompt"] for p in PROMPTS if p.get("id", 3) == pair["id"])
            )


def test_preference_pair_formats():
    text = {"id": 1, "prompt": "Say", "prefix": " the", "rejected": " country", "chosen": " United"}
    assert preference_pair(text) == {"id": 1, "prompt": "Say the", "chosen": " United", "rejected": " country"}
    chat = {**text, "prompt": [{"role": "user", "content": "Say"}]}
    assert preference_pair(chat) == {
        "id": 1,
        "prompt": [{"role": "user", "content": "Say"}],
        "chosen": [{"role": "assistant", "content": " the United"}],
        "rejected": [{"role": "assistant", "content": " the country"}],
    }
    for chosen in (None, "", " country"):
        assert preference_pair({**text, "chosen": chosen}) is None


def test_jsonl_output_keeps_only_the_given_ids(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"id": 1, "x": 1}, {"id": 2, "x": 2}, {"id": 1, "x": 3}])
    with JsonlOutput(str(path), keep={"1"}) as trace:
        assert trace.dropped == 1 and trace.ids == {"1"}
        trace.write([{"id": 3}])
    assert read_jsonl(path) == [{"id": 1, "x": 1}, {"id": 1, "x": 3}, {"id": 3}]


def test_through_a_fake_engine(monkeypatch, tmp_path):
    """--engine: the same command on the engine's backend (N concurrent streams); a failing engine
    stops the run with a clear error, and what was written stays."""
    from engine_fakes import FakeEngine

    from backtrack_sampler.engine import EngineProvider

    model = FakeProvider()
    fake = FakeEngine("vllm", model.logits_for, model.vocab_size, eos=model.get_eos_token_id())
    try:
        monkeypatch.setattr(  # batch imported load by name: patch it where the command reads it
            cli_batch, "load", lambda args, chat, slots=1: EngineProvider(fake.url, "vllm", tokenizer=model, timeout=5)
        )
        rows = [{"id": i, "prompt": " it was"} for i in range(6)]
        prompts, out = write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "out.jsonl"
        argv = [
            "batch",
            str(prompts),
            "-o",
            str(out),
            "--engine",
            fake.url,
            "--engine-type",
            "vllm",
            "--parallel",
            "3",
            "--ban",
            " the",
            "--max-new-tokens",
            "10",
            "--top-k",
            "8",
            "--seed",
            "1",
        ]
        status, err = run(argv)
        assert status == 0, err
        records = read_jsonl(out)
        assert sorted(r["id"] for r in records) == list(range(6))
        assert all(r["text"] and " the" not in r["text"] for r in records)  # the fake model's words, never " the"
        fake.fail = True
        more = write_jsonl(tmp_path / "more.jsonl", rows + [{"id": 6, "prompt": " it"}])
        status, err = run([*argv[:1], str(more), *argv[2:]])
        assert status == 1 and "fake engine failure" in err and "run the same command again" in err
        assert len(read_jsonl(out)) == 6
    finally:
        fake.close()


def test_batch_help_and_usage_errors(fake_model, tmp_path, capsys):
    assert cli.main(["batch", "--help"]) == 0
    help_text = capsys.readouterr().out
    for option in (
        "--output",
        "--parallel",
        "--engine",
        "--strategy",
        "--slops",
        "--ban",
        "--trace",
        "--pairs",
        "--skip-bad-lines",
        "--quiet",
    ):
        assert option in help_text
    status, err = run(["batch", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl")])
    assert status == 1 and "cannot read" in err
    status, err = run(["batch", "-", "-o", str(tmp_path / "o.jsonl"), "--strategy", "human"], stdin='{"prompt": "x"}\n')
    assert status == 1 and "human strategy" in err
    status, err = run(
        ["batch", "-", "-o", str(tmp_path / "o.jsonl"), "--max-new-tokens", "3"], stdin='{"prompt": " it"}\n'
    )
    assert status == 0 and len(read_jsonl(tmp_path / "o.jsonl")) == 1


@pytest.mark.model
def test_in_process_on_the_embedded_chat_model_interrupted_and_resumed(tmp_path):
    """The real command (a subprocess, llama.cpp, the embedded chat model, 2 sequences batched):
    Ctrl-C once a completion is written, then the same command finishes the rest; nothing twice."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    topics = ["a fox", "a lighthouse", "a baker", "a robot", "the sea", "a violin"]
    prompts = write_jsonl(
        tmp_path / "p.jsonl",
        [{"id": t, "messages": [{"role": "user", "content": f"Write a short story about {t}."}]} for t in topics],
    )
    out, pairs = tmp_path / "out.jsonl", tmp_path / "pairs.jsonl"
    argv = [
        sys.executable,
        "-m",
        "backtrack_sampler.cli",
        "batch",
        str(prompts),
        "-o",
        str(out),
        "--pairs",
        str(pairs),
        "--ban",
        "the",
        "--whole-words",
        "--parallel",
        "2",
        "--n-ctx",
        "1024",
        "--max-new-tokens",
        "48",
        "--seed",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(root)}
    process = subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None and not (out.exists() and out.read_text()):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in err, err
    first = read_jsonl(out)
    assert 1 <= len(first) < len(topics)
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = read_jsonl(out)
    assert sorted(r["id"] for r in records) == sorted(topics) and records[: len(first)] == first
    import re

    for record in records:
        assert record["delivered"] > 0 and not re.search(r"(?i)\bthe\b", record["text"]), record
    assert all(p["chosen"][0]["role"] == "assistant" for p in read_jsonl(pairs))


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_and_quiet(fake_model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    err = Terminal()
    status = cli.main(
        ["batch", str(prompts), "-o", str(tmp_path / "o.jsonl"), "--max-new-tokens", "6"],
        stdin=io.StringIO(),
        stdout=io.StringIO(),
        stderr=err,
    )
    assert status == 0
    bar = err.getvalue()
    assert "5/5" in bar and "prompt" in bar and "tok/s" in bar and "rewinds" in bar and "completions written" in bar
    err = Terminal()
    status = cli.main(
        ["batch", str(prompts), "-o", str(tmp_path / "q.jsonl"), "--max-new-tokens", "6", "--quiet"],
        stdin=io.StringIO(),
        stdout=io.StringIO(),
        stderr=err,
    )
    assert status == 0 and err.getvalue() == ""
