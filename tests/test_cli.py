"""The ``backtrack-sampler`` command line: in-process with a FakeProvider (fast) and on the real
embedded model (in-process and as a subprocess)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from backtrack_sampler import cli
from backtrack_sampler.cli import generate
from backtrack_sampler.cli import model as cli_model
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.strategy import registry
from backtrack_sampler.strategy.base_strategy import BaseStrategy

EXE = Path(sys.executable).with_name("backtrack-sampler")


@pytest.fixture
def fake_model(monkeypatch):
    """Make the CLI load a FakeProvider instead of a real model."""
    provider = FakeProvider(context_length=256)
    monkeypatch.setattr(cli_model, "load_provider", lambda *args, **kwargs: provider)
    return provider


def run(argv, stdin=None):
    """main(argv) with captured streams: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(argv, stdin=io.StringIO(stdin) if stdin is not None else io.StringIO(""), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def assert_one_line_error(status, err, *words):
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


# --- help ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["serve", "--help"], ["human", "--help"]])
def test_help(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: backtrack-sampler")


def test_help_lists_the_options(capsys):
    cli.main(["generate", "--help"])
    out = capsys.readouterr().out
    for option in (
        "--backend",
        "--model",
        "--strategy",
        "--slops",
        "--ban",
        "--regex-file",
        "--top-p-flat",
        "--eos-penalty",
        "--find",
        "--temperature",
        "--seed",
        "--max-new-tokens",
        "--show-backtracking",
    ):
        assert option in out


def test_no_command_shows_usage(capsys):
    assert cli.main([]) == 2
    assert "usage:" in capsys.readouterr().err


# --- user errors: one line, no traceback -----------------------------------------------------------
@pytest.mark.parametrize(
    "argv, words",
    [
        (["generate", "hi", "--temperature", "hot"], ["--temperature"]),
        (["generate", "hi", "--top-k", "-1"], ["--top-k"]),
        (["generate", "hi", "--backend", "onnx"], ["--backend"]),
        (["generate", "hi", "--strategy-args", "{}"], ["--strategy-args", "--strategy"]),
        (["serve", "--port", "99999"], ["--port"]),
        (["serve", "--parallel", "0"], ["--parallel"]),
        (["serve", "--max-queue", "-1"], ["--max-queue"]),
    ],
)
def test_bad_arguments(argv, words, capsys):
    status = cli.main(argv)
    assert status == 2
    assert_one_line_error(status, capsys.readouterr().err, *words)


def test_out_of_range_sampling_values(fake_model):
    assert_one_line_error(*run(["generate", "hi", "--temperature", "-1"])[::2], "--temperature")
    assert_one_line_error(*run(["generate", "hi", "--top-p", "1.5"])[::2], "--top-p")
    assert_one_line_error(*run(["generate", "hi", "--min-p", "2"])[::2], "--min-p")


def test_missing_model_file():
    status, _, err = run(["generate", "hi", "--model", "/nonexistent/model.gguf"])
    assert_one_line_error(status, err, "/nonexistent/model.gguf")


def test_not_a_model_file(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_text("not a gguf")
    status, _, err = run(["generate", "hi", "--model", str(bogus), "--n-ctx", "64"])
    assert_one_line_error(status, err, "cannot load")


def test_bad_files(tmp_path, fake_model):
    missing = str(tmp_path / "missing.json")
    assert_one_line_error(*run(["generate", "hi", "--slops", missing])[::2], "not found")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[1, 2")
    assert_one_line_error(*run(["generate", "hi", "--slops", str(bad_json)])[::2], "not valid JSON")
    wrong_shape = tmp_path / "shape.json"
    wrong_shape.write_text("[[1, 2]]")
    assert_one_line_error(*run(["generate", "hi", "--slops", str(wrong_shape)])[::2], "expected")
    assert_one_line_error(*run(["generate", "hi", "--regex", "(unclosed"])[::2], "regular expression")
    assert_one_line_error(*run(["generate", "hi", "--regex-file", missing])[::2], "not found")


def test_prompt_errors(fake_model):
    assert_one_line_error(*run(["generate"], stdin="")[::2], "prompt")
    assert_one_line_error(*run(["generate", "   "])[::2], "empty")
    assert_one_line_error(*run(["generate", "the cat", "--max-length", "1"])[::2], "max_length")


def test_strategy_option_errors(fake_model):
    assert_one_line_error(
        *run(["generate", "the", "--strategy", "magic"])[::2],
        "unknown strategy 'magic'",
        "package.module:Class",
        "path/to/file.py:Class",
    )
    assert_one_line_error(*run(["generate", "the", "--strategy", "replace"])[::2], "--find")
    assert_one_line_error(*run(["generate", "the", "--find", "x", "--replace", "y"])[::2], "--strategy replace")
    assert_one_line_error(*run(["generate", "the", "--whole-words"])[::2], "--ban")


def test_human_needs_a_terminal(fake_model):
    status, _, err = run(["human", "the"])
    assert_one_line_error(status, err, "terminal")


# --- file readers ----------------------------------------------------------------------------------
def test_read_slops_formats(tmp_path):
    plain = tmp_path / "slops.txt"
    plain.write_text("# comment\ntapestry\n\n a testament to \n")
    assert registry.read_slops(str(plain)) == ["tapestry", "a testament to"]
    pairs = tmp_path / "slops.json"
    pairs.write_text(json.dumps([["delve", 0.1], "tapestry"]))
    assert registry.read_slops(str(pairs)) == [["delve", 0.1], "tapestry"]


def test_read_regexes_formats(tmp_path):
    quoted = tmp_path / "regexes.txt"
    quoted.write_text('"(?i)not [^.!?]{3,60} but",\n# comment\nplain\\s+pattern\n')
    assert registry.read_regexes(str(quoted)) == ["(?i)not [^.!?]{3,60} but", "plain\\s+pattern"]
    listed = tmp_path / "regexes.json"
    listed.write_text('["a+", "b?"]')
    assert registry.read_regexes(str(listed)) == ["a+", "b?"]


def test_read_slop_and_regex_lists(slop_files):
    pairs = registry.read_slops(str(slop_files["pairs"]))
    assert len(pairs) == 500 and pairs[0] == ["a tapestry of", pairs[0][1]] and 0 < pairs[0][1] < 1
    assert registry.read_slops(str(slop_files["plain"]))[:2] == ["a tapestry of", "a testament to"]
    assert registry.read_regexes(str(slop_files["regexes"])) == [
        "(?i)not [^.!?]{3,60} but",
        r"(?i)each(?:\s*\w+\s*|\s*)a",
        r"(?i)every(?:\s*\w+\s*|\s*)a",
    ]


def test_regexes_a_linear_time_engine_cannot_run_are_one_line_errors(tmp_path, fake_model):
    assert_one_line_error(*run(["generate", "hi", "--regex", r"(\w+) \1"])[::2], "backreference", "RE2")
    lookbehind = tmp_path / "regexes.txt"
    lookbehind.write_text("(?<=not )dark\n")
    assert_one_line_error(*run(["generate", "hi", "--regex-file", str(lookbehind)])[::2], "lookbehind")


# --- generation with the fake model ----------------------------------------------------------------
def test_generate_streams_text(fake_model):
    status, out, err = run(["generate", "the cat", "--max-new-tokens", "8", "--seed", "1"])
    assert status == 0 and err == ""
    assert out.endswith("\n") and len(out) > 1


def test_generate_reads_the_prompt_from_stdin(fake_model):
    a = run(["generate", "--max-new-tokens", "6", "--seed", "2"], stdin="the dog")
    b = run(["generate", "the dog", "--max-new-tokens", "6", "--seed", "2"])
    assert a[0] == 0 and a[1] == b[1]


def test_generate_is_reproducible_with_a_seed(fake_model):
    args = ["generate", "the", "--max-new-tokens", "10", "--seed", "7", "--temperature", "0.9"]
    assert run(args)[1] == run(args)[1]


class RewindOnce(BaseStrategy):
    """Holds back 3 tokens; the first time the text reaches 6 tokens, rewinds the last 2."""

    def __init__(self):
        self.done = False

    def get_keep_index(self):
        return self.length - 3 if hasattr(self, "length") else 0

    def on_next_token(self, continuation_tokens, probs):
        self.length = len(continuation_tokens)

    def backtrack(self, continuation_tokens):
        if not self.done and len(continuation_tokens) == 6:
            self.done = True
            self.rewind_reason = "test"
            self.length = 4
            return continuation_tokens[:4]
        return continuation_tokens


def test_show_backtracking_marks_rewinds_in_place(fake_model, monkeypatch):
    from backtrack_sampler import BacktrackSampler

    monkeypatch.setattr(generate, "build_strategies", lambda plan, provider, prompt=(): RewindOnce())
    both = io.StringIO()  # stdout and stderr interleaved, as on a terminal
    argv = [
        "generate",
        "the",
        "--max-new-tokens",
        "10",
        "--temperature",
        "0",
        "--show-backtracking",
        "--color",
        "never",
    ]
    assert cli.main(argv, stdin=io.StringIO(""), stdout=both, stderr=both) == 0
    text, summary = both.getvalue().rstrip("\n").rsplit("\n", 1)
    assert summary.startswith("[10 tokens delivered, 2 rewound in 1 rewind,") and "tokens/s" in summary
    # greedy decoding regenerates the same 2 tokens: struck out right after the 4 tokens kept
    tokens = list(BacktrackSampler(fake_model, BaseStrategy()).generate("the", max_new_tokens=10, temperature=0))
    decode = fake_model.decode
    assert text == decode(tokens[:4]) + "[-" + decode(tokens[4:6]) + "-]" + decode(tokens)[len(decode(tokens[:4])) :]


def test_show_backtracking_colours(fake_model, monkeypatch):
    monkeypatch.setattr(generate, "build_strategies", lambda plan, provider, prompt=(): RewindOnce())
    status, out, err = run(
        ["generate", "the", "--max-new-tokens", "8", "--temperature", "0", "--show-backtracking", "--color", "always"]
    )
    assert status == 0
    assert "\x1b[9;31m" in err and "\x1b[0m" in err and "rewound in 1 rewind" in err
    assert "\x1b" not in out


def test_strategy_plan_chains_antislop_first(tmp_path):
    slops = tmp_path / "s.txt"
    slops.write_text("tapestry\n")
    args = cli.build_parser().parse_args(
        [
            "generate",
            "x",
            "--strategy",
            "creative",
            "--top-p-flat",
            "0.5",
            "--slops",
            str(slops),
            "--ban",
            "delve",
            "--regex",
            "a+b",
        ]
    )
    plan = [(call.name, call.kwargs) for call in cli.strategy_plan(args)]
    assert plan == [
        ("antislop", {"slops": ["tapestry", "delve"], "regexes": ["a+b"]}),
        ("creative", {"top_p_flat": 0.5}),
    ]


@pytest.mark.parametrize("strategy", ["none", "debug", "adaptive", "creative", "antislop", "replace"])
def test_each_strategy_runs(strategy, fake_model):
    argv = ["generate", "the cat", "--max-new-tokens", "6", "--seed", "3", "--strategy", strategy]
    if strategy == "antislop":
        argv += ["--ban", " dog", "--show-backtracking"]
    if strategy == "replace":
        argv += ["--find", " the", "--replace", " a"]
    status, out, err = run(argv)
    assert status == 0 and out.strip(), err
    if strategy == "debug":
        assert "[step 0]" in err
    if strategy == "antislop":
        assert " dog" not in out
    if strategy == "replace":
        assert " the" not in out


def test_ban_removes_a_phrase(fake_model):
    plain = run(["generate", "the", "--max-new-tokens", "12", "--temperature", "0"])[1]
    word = max(plain.split(), key=len)
    status, out, err = run(
        [
            "generate",
            "the",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
            "--ban",
            word,
            "--show-backtracking",
            "--color",
            "never",
        ]
    )
    assert status == 0 and word not in out
    assert "rewound" in err


def test_regex_alone_is_an_antislop_ban(fake_model):
    args = cli.build_parser().parse_args(["generate", "x", "--regex", "a+b"])
    assert [(call.name, call.kwargs) for call in cli.strategy_plan(args)] == [
        ("antislop", {"slops": [], "regexes": ["a+b"]})
    ]


# --- the real model ----------------------------------------------------------------------------------
@pytest.mark.model
def test_regex_alone_on_the_real_model(capsys):
    argv = [
        "generate",
        "Facts about the sun: The sun is a",
        "--max-new-tokens",
        "20",
        "--temperature",
        "0",
        "--n-ctx",
        "256",
        "--show-backtracking",
        "--color",
        "never",
    ]
    assert cli.main(argv) == 0
    plain = capsys.readouterr().out
    assert re.search(r"\bthe\b", plain, re.IGNORECASE), plain  # greedy writes "the": the ban has work to do
    status = cli.main(argv + ["--regex", r"(?i)\bthe\b"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert not re.search(r"\bthe\b", captured.out, re.IGNORECASE), captured.out
    assert re.search(r"tokens delivered, [1-9]\d* rewound in [1-9]", captured.err), captured.err


@pytest.mark.model
def test_generate_on_the_real_model_in_process(capsys):
    status = cli.main(
        [
            "generate",
            "The capital of France is",
            "--max-new-tokens",
            "3",
            "--temperature",
            "0",
            "--n-ctx",
            "256",
            "--show-backtracking",
        ]
    )
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert captured.out.strip()
    assert "3 tokens delivered" in captured.err


@pytest.mark.model
def test_console_script_help_and_generate():
    assert EXE.exists(), f"{EXE} is not installed (pip install -e .)"
    result = subprocess.run([str(EXE), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "generate" in result.stdout and "serve" in result.stdout
    result = subprocess.run(
        [str(EXE), "generate", "--max-new-tokens", "3", "--temperature", "0", "--n-ctx", "256", "--chat"],
        input="Hello!",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")


@pytest.mark.model
def test_console_script_error_is_one_line():
    result = subprocess.run(
        [str(EXE), "generate", "hi", "--model", "/no/such/file.gguf"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: no model at /no/such/file.gguf"]


def test_serve_with_a_missing_model_is_one_line_error():
    status, _, err = run(["serve", "--model", "/no/such/model.gguf"])
    assert_one_line_error(status, err, "no model at")


@pytest.mark.model
def test_serve_as_a_subprocess():
    import httpx
    from serving import serve_subprocess

    args = ["--api-key", "secret", "--n-ctx", "256", "--threads", "1", "--model-name", "tiny"]
    with serve_subprocess(args) as url:
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer secret"}, timeout=10).json()
        assert models["data"][0]["id"] == "tiny"
        result = httpx.post(
            url + "/v1/completions",
            headers={"Authorization": "Bearer secret"},
            timeout=120,
            json={"prompt": "Hello", "max_tokens": 2, "temperature": 0},
        ).json()
        assert result["usage"]["completion_tokens"] <= 2
