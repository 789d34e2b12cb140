"""The contract suite: every scenario through every driver.

Drivers (the ``driver`` fixture): ``single`` (``BacktrackSampler`` on the FakeProvider), ``batch``
(``BatchScheduler`` on the FakeProvider, beside a second generation), ``engine`` (an
``EngineProvider`` on the fake llama-server of engine_fakes.py), ``embedded`` (``BacktrackSampler``
on the embedded model in process, llama.cpp), ``llama-server`` (the real one, started once for
the module, on the embedded model) and ``vllm`` (vLLM in process on the embedded chat model: run
in the vLLM venv by scripts/test.sh, marker ``vllm_inprocess``). The server-level scenarios (stop strings, the
time limit, live ``include_backtrack`` events, disconnects, candidates over HTTP) run a ``Runner``
(the server's local runner) on each driver's model: with one slot for ``single``, four for
``batch``, the model's own slots for ``embedded``, the engine's backend for the engines. Scenarios: a rewind (a strategy bans a word the
model writes), chained strategies (every member told of every cut), hard-constraint exhaustion
(``ConstraintError``; a hard strategy over ``max_rewound_tokens``), stop strings, the time limit,
cancellation, live events, candidates for human guidance, traces.

The two seam bugs of issue 14 have a test of their own at the end (both failed on 1dbbbde).
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from dataclasses import dataclass
from typing import List, Optional

import httpx
import pytest
from engine_fakes import FakeEngine
from serving import ServerThread

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, BaseStrategy, ChainStrategy
from backtrack_sampler.core.batch import BatchScheduler
from backtrack_sampler.core.events import Done, EventTracker, Rewind, TraceWriter, Transcript, event_dict, stream_events
from backtrack_sampler.core.generation import GenerationStats
from backtrack_sampler.engine import EngineProvider
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.server.app import Engine, Limits, create_app
from backtrack_sampler.server.playground import CandidateSearch, candidates
from backtrack_sampler.server.schemas import BUILTIN_STRATEGIES
from backtrack_sampler.strategy.base_strategy import ConstraintError

TOKENS = 16  # tokens per generation: the scenarios need few


# ---- strategies of the scenarios, written against the public API ----------------------------------
class Recorder(BaseStrategy):
    """Changes nothing; records every cut it is told of and every reset."""

    reads_probs = False
    edits_logits = False

    def __init__(self):
        self.cuts: List[int] = []
        self.resets = 0

    def on_rewind(self, position):
        self.cuts.append(position)

    def reset(self):
        self.resets += 1


class GiveUp(BaseStrategy):
    """A hard constraint that cannot hold at the 6th token: ``ConstraintError``. It keeps its last
    two tokens from being final, so the 4th to the 6th are not final then and must be dropped."""

    reads_probs = False
    edits_logits = False
    hard_constraint = True

    def __init__(self):
        self.keep = 0

    def backtrack(self, tokens):
        if len(tokens) == 6:
            raise ConstraintError("no way to go on")
        self.keep = len(tokens) - 2
        return tokens

    def get_keep_index(self):
        return self.keep

    def reset(self):
        self.keep = 0


class Stubborn(BaseStrategy):
    """A hard constraint that rewinds every token it is given."""

    reads_probs = False
    edits_logits = False
    hard_constraint = True
    rewind_reason = "never satisfied"

    def backtrack(self, tokens):
        return tokens[:-1]

    def get_keep_index(self):
        return 0


# ---- drivers -----------------------------------------------------------------------------------------
class Pace:
    """Slows a FakeProvider down (``delay`` seconds per evaluation) or holds it after ``hold_after``
    more evaluations until ``release`` is set (to see what a client gets while it generates)."""

    def __init__(self):
        self.delay, self.hold_after, self.release, self.count = 0.0, None, threading.Event(), 0

    def tick(self):
        if self.hold_after is not None:
            self.count += 1
            if self.count > self.hold_after:
                self.release.wait(30)
        if self.delay:
            time.sleep(self.delay)


class PacedFake(FakeProvider):
    def __init__(self, pace: Pace, **kwargs):
        super().__init__(**kwargs)
        self.pace = pace

    def logits_for(self, tokens):
        self.pace.tick()
        return super().logits_for(tokens)


@dataclass
class Run:
    tokens: List[int]
    stats: GenerationStats
    events: list
    live: bool  # an event came while the generation was still running

    def text(self, provider) -> str:
        return provider.decode(self.tokens)


class Driver:
    """One way to run generations, with the same calls for every scenario."""

    def __init__(self, name: str, provider, prompt: str, fake: Optional[FakeEngine] = None):
        self.name, self.provider, self.prompt, self.fake = name, provider, prompt, fake
        self.batched = name == "batch"
        self.pace = Pace()  # the FakeProvider drivers' server models
        self.can_hold = name in ("single", "batch", "engine")  # the fakes can be held mid-generation

    def __repr__(self):
        return self.name

    @property
    def prompt_tokens(self) -> List[int]:
        return self.provider.encode(self.prompt)

    # -- in-process ------------------------------------------------------------------------
    def run(self, strategy: BaseStrategy, **kwargs) -> Run:
        """Generate (greedy, TOKENS tokens unless told) and follow the events after every step."""
        kwargs = {"max_new_tokens": TOKENS, "temperature": 0, **kwargs}
        sampler = BacktrackSampler(self.provider, strategy)
        generation = sampler.start(self.prompt, **kwargs)
        tracker, events, live = EventTracker(generation), [], [False]

        def follow(*_):
            new = tracker.update()
            events.extend(new)
            live[0] |= bool(new) and not generation.done

        if not self.batched:
            tokens = []
            for final in sampler.run(generation):
                tokens.extend(final)
                follow()
            follow()
            return Run(tokens, generation.stats, events, live[0])
        scheduler = BatchScheduler(self.provider, parallel=2)
        other = scheduler.submit(" a dog", AntiSlopStrategy(self.provider, ["the"]), max_new_tokens=TOKENS, seed=1)
        job = scheduler.add(generation, on_step=follow)
        list(scheduler.run())
        follow()
        if job.error is not None:
            raise job.error
        assert other.done and other.error is None and other.stats.finish_reason in ("length", "stop")
        return Run(job.tokens, generation.stats, events, live[0])

    def candidates(self, strategy: BaseStrategy, chosen: List[int], top_n: int = 3) -> dict:
        if not self.batched:
            return candidates(self.provider, strategy, self.prompt_tokens, chosen, top_n=top_n)
        scheduler = BatchScheduler(self.provider, parallel=2)
        scheduler.submit(" a dog", max_new_tokens=TOKENS, seed=1)
        search = CandidateSearch(self.provider, strategy, self.prompt_tokens, chosen, top_n)
        job = scheduler.add(search)
        list(scheduler.run())
        assert job.error is None, job.error
        return search.result

    # -- pacing ----------------------------------------------------------------------------
    def slow(self, seconds: float) -> None:
        """Make every token take ``seconds`` (the fakes); the real server is slow enough."""
        if self.fake is not None:
            self.fake.token_delay = seconds
        self.pace.delay = seconds

    def hold(self, after: int) -> None:
        """Hold the model after ``after`` tokens until ``release()`` (the fakes only)."""
        if self.fake is not None:
            self.fake.release.clear()
            self.fake.hold_after = after
        self.pace.release.clear()
        self.pace.count, self.pace.hold_after = 0, after

    def release(self) -> None:
        if self.fake is not None:
            self.fake.release.set()
        self.pace.release.set()

    def unpace(self) -> None:
        self.release()
        if self.fake is not None:
            self.fake.hold_after, self.fake.token_delay = None, 0.0
        self.pace.delay, self.pace.hold_after = 0.0, None

    # -- the server ------------------------------------------------------------------------
    @contextlib.contextmanager
    def serve(self, limits: Optional[Limits] = None):
        """The HTTP server (a Runner) on this driver's model."""
        if self.name in ("single", "batch"):
            runner = Engine(PacedFake(self.pace), "fake", parallel=1 if self.name == "single" else 4)
        else:
            runner = Engine(self.provider, self.name)
        with ServerThread(create_app(runner, limits=limits)) as server:
            server.runner = runner
            yield server


def _fake_engine_driver():
    model = FakeProvider()
    fake = FakeEngine("llama-server", model.logits_for, model.vocab_size, eos=model.get_eos_token_id())
    return Driver("engine", EngineProvider(fake.url, "llama-server", tokenizer=model), " the cat", fake), fake.close


def _llama_server_driver():
    from test_engine_llama_server import LlamaServer, llama_server_binary

    from backtrack_sampler.provider.models import default_model_path

    gguf = str(default_model_path())
    process = LlamaServer(llama_server_binary(), gguf)
    provider = EngineProvider(process.url, "llama-server", tokenizer=gguf, timeout=60)

    def stop():
        provider.close()
        process.stop()

    # a prompt whose greedy continuation has no near-tie (tests/test_engine_llama_server.py: CASES)
    return Driver("llama-server", provider, "def fibonacci(n):\n"), stop


@pytest.fixture(
    scope="module",
    params=[
        "single",
        "batch",
        "engine",
        pytest.param("embedded", marks=pytest.mark.model),
        pytest.param("mlx", marks=pytest.mark.model),  # MLX in process (mlx[cpu] here), on the embedded chat model
        pytest.param("llama-server", marks=pytest.mark.model),
        pytest.param("vllm", marks=pytest.mark.vllm_inprocess),  # in the vLLM venv (scripts/test.sh)
    ],
)
def module_driver(request):
    if request.param == "vllm":  # vLLM in process, on the embedded chat model
        yield Driver("vllm", request.getfixturevalue("vllm_provider"), "def fibonacci(n):\n")
        return
    if request.param == "mlx":
        yield Driver("mlx", request.getfixturevalue("mlx_provider"), "def fibonacci(n):\n")
        return
    if request.param in ("single", "batch"):
        yield Driver(request.param, FakeProvider(), " the cat")
        return
    if request.param == "embedded":  # the single driver on a real model (llama.cpp in process)
        yield Driver("embedded", request.getfixturevalue("llama_provider"), "def fibonacci(n):\n")
        return
    made, stop = _fake_engine_driver() if request.param == "engine" else _llama_server_driver()
    try:
        yield made
    finally:
        stop()


@pytest.fixture
def driver(module_driver):
    """The module's driver, its pacing undone after each test."""
    yield module_driver
    module_driver.unpace()


def a_word(provider, tokens: List[int], start: int = 1):
    """``(index, word)``: the first token from ``start`` on whose text is a word of 2+ letters."""
    for i in range(start, len(tokens)):
        text = provider.decode([tokens[i]]).strip()
        if len(text) >= 2 and text.isalpha():
            return i, text
    pytest.fail(f"no word in {provider.decode(tokens)!r}")


# ---- scenarios, in process ------------------------------------------------------------------------
def test_a_rewind_bans_a_word_the_model_writes(driver):
    """Greedy writes ``word``; with it banned the same path reaches it, rewinds, and writes
    something else; the events say so as they happen, and rebuild the text."""
    p = driver.provider
    plain = driver.run(BaseStrategy())
    _, word = a_word(p, plain.tokens)
    banned = driver.run(AntiSlopStrategy(p, [word]))
    text = banned.text(p)
    assert word.lower() not in text.lower(), (word, text)
    assert banned.stats.rewinds >= 1 and banned.stats.finish_reason in ("length", "stop")
    rewinds = [e for e in banned.events if isinstance(e, Rewind)]
    assert rewinds and word.lower() in rewinds[0].text.lower() and word in rewinds[0].reason
    assert banned.live and isinstance(banned.events[-1], Done)
    transcript = Transcript()
    for event in banned.events:
        transcript.apply(event_dict(event))
    assert transcript.final == text and transcript.strikes


def test_chained_strategies_hold_together_and_every_member_is_told_of_every_cut(driver):
    p = driver.provider
    plain = driver.run(BaseStrategy())
    i, first = a_word(p, plain.tokens)
    _, second = (
        a_word(p, plain.tokens, i + 1)
        if any(len(p.decode([t]).strip()) >= 2 and p.decode([t]).strip().isalpha() for t in plain.tokens[i + 1 :])
        else (0, first)
    )
    recorder = Recorder()
    run = driver.run(ChainStrategy([AntiSlopStrategy(p, [first]), AntiSlopStrategy(p, [second]), recorder]))
    text = run.text(p).lower()
    assert first.lower() not in text and second.lower() not in text
    assert run.stats.rewinds >= 1
    assert {e.position for e in run.stats.events} <= set(recorder.cuts)  # the recorder never cut anything
    assert "AntiSlopStrategy" in run.stats.events[0].reason


def test_a_constraint_error_ends_with_constraint_and_drops_the_tail(driver):
    plain = driver.run(BaseStrategy())
    run = driver.run(GiveUp())
    assert run.stats.finish_reason == "constraint" and "no way to go on" in run.stats.constraint
    assert run.tokens == plain.tokens[:3]  # the final ones; the two held back are dropped
    last = [e for e in run.events if isinstance(e, Rewind)][-1]
    assert last.reason.startswith("constraint") and last.tokens == plain.tokens[3:6]
    assert run.events[-1].finish_reason == "constraint"


def test_a_hard_strategy_over_its_rewind_budget_ends_with_constraint(driver):
    run = driver.run(Stubborn(), max_rewound_tokens=5)
    assert run.stats.finish_reason == "constraint" and "max_rewound_tokens=5" in run.stats.constraint
    assert run.tokens == [] and run.stats.rewound >= 5


def test_cancelling_ends_the_generation_and_resets_the_strategy(driver):
    p = driver.provider
    recorder = Recorder()
    driver.slow(0.005)
    if driver.batched:
        scheduler = BatchScheduler(p, parallel=2)
        other = scheduler.submit(driver.prompt, max_new_tokens=TOKENS, seed=1)
        job = scheduler.submit(driver.prompt, recorder, max_new_tokens=2000, seed=2)
        while len(job.tokens) < 3:
            scheduler.step()
        job.cancel()
        list(scheduler.run())
        assert job.done and job.stats.finish_reason is None and len(job.tokens) < 2000
        assert other.stats.finish_reason in ("length", "stop") and p.batch_keys == []
    else:
        sampler = BacktrackSampler(p, recorder)
        tokens = sampler.generate(driver.prompt, max_new_tokens=2000, temperature=0)
        got = [next(tokens) for _ in range(3)]
        tokens.close()
        assert len(got) == 3 and sampler.stats.finish_reason is None
        if driver.fake is not None:  # the engine stopped decoding the closed stream
            before = driver.fake.decoded
            time.sleep(0.3)
            assert driver.fake.decoded - before <= 2
    assert recorder.resets == 2  # before and after
    driver.unpace()
    assert len(driver.run(BaseStrategy()).tokens) > 0  # and the next generation runs


def test_candidates_replay_the_chosen_tokens(driver):
    p = driver.provider
    plain = driver.run(BaseStrategy())
    chosen = plain.tokens[:2]
    answer = driver.candidates(BaseStrategy(), chosen)
    assert answer["tokens"] == chosen and answer["text"] == p.decode(chosen) and answer["rewind"] is None
    options = answer["candidates"]
    assert len(options) == 3 and options[0]["token"] == plain.tokens[2]  # greedy took the most likely
    assert [o["probability"] for o in options] == sorted((o["probability"] for o in options), reverse=True)
    hooked = driver.candidates(Recorder(), chosen)  # a strategy with hooks replays through the model
    assert hooked["tokens"] == chosen and [o["token"] for o in hooked["candidates"]] == [o["token"] for o in options]


def test_candidates_report_a_rewind_of_the_chosen_tokens(driver):
    p = driver.provider
    plain = driver.run(BaseStrategy())
    i, word = a_word(p, plain.tokens)
    chosen = plain.tokens[: i + 1]
    answer = driver.candidates(AntiSlopStrategy(p, [word]), chosen, top_n=10)
    assert answer["rewind"] is not None and answer["rewind"]["position"] <= i
    assert answer["tokens"] == chosen[: answer["rewind"]["position"]]
    assert word.lower() in answer["rewind"]["text"].lower()
    if answer["rewind"]["position"] == i:
        assert plain.tokens[i] not in [o["token"] for o in answer["candidates"]]  # banned there now


def test_a_trace_records_every_rewind_and_the_end(driver):
    p = driver.provider
    _, word = a_word(p, driver.run(BaseStrategy()).tokens)
    out = io.StringIO()
    writer = TraceWriter(out, driver.prompt)
    if driver.batched:
        events = driver.run(AntiSlopStrategy(p, [word])).events
    else:
        events = list(
            stream_events(
                BacktrackSampler(p, AntiSlopStrategy(p, [word])), driver.prompt, max_new_tokens=TOKENS, temperature=0
            )
        )
    for event in events:
        writer.write(event)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    rewinds, end = [r for r in records if r["type"] == "rewind"], records[-1]
    assert rewinds and word.lower() in rewinds[0]["rejected"].lower() and rewinds[0]["prompt"] == driver.prompt
    assert end["type"] == "end" and word.lower() not in end["text"].lower() and end["rewinds"] == len(rewinds)


# ---- scenarios at the server ------------------------------------------------------------------------
def _post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=120)


def _stream(server, body, chunks: list, first_event: Optional[threading.Event] = None, stop_after: int = 0):
    """Streams a completion into ``chunks`` as ``(seconds since start, payload)``."""
    started = time.monotonic()
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks.append((time.monotonic() - started, json.loads(line[6:])))
                if first_event is not None and "backtrack" in chunks[-1][1]:
                    first_event.set()
                if stop_after and len(chunks) >= stop_after:
                    return


def _text(chunks) -> str:
    return "".join(c["choices"][0]["text"] for _, c in chunks if c["choices"])


def test_server_stop_strings_cut_the_text(driver):
    with driver.serve() as server:
        body = {"prompt": driver.prompt, "max_tokens": 24, "temperature": 0}
        plain = _post(server, "/v1/completions", body).json()["choices"][0]["text"]
        stop = plain[4:7]
        expected = plain[: plain.find(stop)]
        cut = _post(server, "/v1/completions", {**body, "stop": [stop]}).json()
        assert cut["choices"][0]["text"] == expected and cut["choices"][0]["finish_reason"] == "stop", (plain, stop)
        chunks: list = []
        _stream(server, {**body, "stop": [stop], "stream_options": {"include_backtrack": True}}, chunks)
        assert _text(chunks) == expected
        assert [c["choices"][0]["finish_reason"] for _, c in chunks if c["choices"]][-1] == "stop"


def test_server_time_limit_ends_with_length(driver):
    driver.slow(0.005)
    with driver.serve(Limits(max_seconds=0.5)) as server:
        started = time.monotonic()
        answer = _post(
            server,
            "/v1/completions",
            {"prompt": driver.prompt, "max_tokens": 2000, "temperature": 0, "banned_strings": ["zebra"]},
        ).json()
        assert time.monotonic() - started < 10
        assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] < 2000
        chunks: list = []
        _stream(
            server,
            {
                "prompt": driver.prompt,
                "max_tokens": 2000,
                "temperature": 0,
                "stream_options": {"include_backtrack": True},
            },
            chunks,
        )
        events = [c["backtrack"] for _, c in chunks if "backtrack" in c]
        assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "length"


def test_server_include_backtrack_events_arrive_live(driver):
    chunks: list = []
    first = threading.Event()
    body = {
        "prompt": driver.prompt,
        "max_tokens": 48,
        "temperature": 0,
        "banned_strings": ["zebra"],
        "stream_options": {"include_backtrack": True},
    }
    with driver.serve() as server:
        if driver.can_hold:
            driver.hold(after=4)
        reader = threading.Thread(target=_stream, args=(server, body, chunks, first))
        reader.start()
        live = first.wait(10)
        driver.release()
        reader.join(120)
    events = [(t, c["backtrack"]) for t, c in chunks if "backtrack" in c]
    assert events and events[-1][1]["type"] == "done"
    if driver.can_hold:
        assert live, "no event came while the model was held mid-generation"
    else:  # the real engine: the first event comes well before the end, not in one burst with it
        assert events[-1][0] - events[0][0] > 0.25 * events[-1][0], events[:2]
    finals = "".join(e["text"] for _, e in events if e["type"] == "final")
    assert finals == _text(chunks)


def test_server_a_client_that_goes_away_frees_its_slot(driver):
    driver.slow(0.005)
    with driver.serve() as server:
        chunks: list = []
        _stream(server, {"prompt": driver.prompt, "max_tokens": 2000, "temperature": 0}, chunks, stop_after=3)
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(server.url + "/health").json()["running"] == 0
        if driver.fake is not None:
            before = driver.fake.decoded
            time.sleep(0.3)
            assert driver.fake.decoded - before <= 2  # the engine stopped decoding it


def test_server_candidates(driver):
    plain = driver.run(BaseStrategy())
    chosen = plain.tokens[:2]
    with driver.serve() as server:
        answer = _post(
            server,
            "/v1/backtrack/candidates",
            {"prompt": driver.prompt, "tokens": chosen, "top_n": 3, "banned_strings": ["zebra"]},
        ).json()
    assert answer["tokens"] == chosen and answer["finish_reason"] is None, answer
    assert len(answer["candidates"]) == 3 and answer["candidates"][0]["token"] == plain.tokens[2]


# ---- the two seam bugs of issue 14 (each failed before the one driver) ---------------------------------
def test_seam_candidates_through_an_engine_replay_the_chosen_tokens():
    """``/v1/backtrack/candidates`` on a server in front of an engine ignored the chosen tokens
    (the engine loop generated on: the answer was null here)."""
    model = FakeProvider()
    fake = FakeEngine("llama-server", model.logits_for, model.vocab_size, eos=model.get_eos_token_id())
    try:
        with ServerThread(create_app(Engine(EngineProvider(fake.url, "llama-server", tokenizer=model)))) as server:
            chosen = [model.ids[" dog"], model.ids[" sat"]]
            answer = httpx.post(
                server.url + "/v1/backtrack/candidates",
                timeout=30,
                json={"prompt": " the cat", "tokens": chosen, "top_n": 4},
            ).json()
    finally:
        fake.close()
    assert answer["tokens"] == chosen and answer["text"] == " dog sat", answer
    assert len(answer["candidates"]) == 4 and answer["finish_reason"] is None
    local = candidates(model, BaseStrategy(), model.encode(" the cat"), chosen, top_n=4)
    assert [c["token"] for c in answer["candidates"]] == [c["token"] for c in local["candidates"]]


def test_seam_include_backtrack_events_stream_live_through_an_engine():
    """``include_backtrack`` on a server in front of an engine sent nothing until the request had
    finished (EngineScheduler never called on_step): here the engine holds after 4 tokens, and an
    event must arrive meanwhile."""
    model = FakeProvider()
    fake = FakeEngine("llama-server", model.logits_for, model.vocab_size, eos=model.get_eos_token_id())
    fake.hold_after = 4
    got, seen = [], threading.Event()
    try:
        with ServerThread(create_app(Engine(EngineProvider(fake.url, "llama-server", tokenizer=model)))) as server:

            def client():
                body = {
                    "prompt": " the cat",
                    "max_tokens": 12,
                    "seed": 1,
                    "stream": True,
                    "stream_options": {"include_backtrack": True},
                }
                with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: {"):
                            got.append(json.loads(line[6:]))
                            if "backtrack" in got[-1]:
                                seen.set()

            reader = threading.Thread(target=client)
            reader.start()
            live = seen.wait(5)
            fake.release.set()
            reader.join(30)
    finally:
        fake.release.set()
        fake.close()
    assert live, "no event came while the engine was still generating"
    assert [c["backtrack"]["type"] for c in got if "backtrack" in c][-1] == "done"


# ---- every built-in strategy, by name, on every driver ------------------------------------------
BUILTIN_PARAMS = {  # the least each needs; the rest are its defaults
    "antislop": {"slops": ["cat"]},
    "replace": {"find": ["cat"], "replace": "dog"},
    "grammar": {"regex": "( [a-z]+)+"},
    "logit_bias": {"bias": {"5": -100}},
    "xtc": {"seed": 0},  # XTC draws its own
}


@pytest.mark.parametrize("name", BUILTIN_STRATEGIES.names(per_request=True))
def test_every_builtin_strategy_by_name_runs_on_every_driver(driver, name):
    """Each strategy a request can name, built the way the server and the CLI build it (its
    parameters validated by the registry), runs to a normal end on every driver; the batch
    driver gives the single driver's tokens; the grammar's output matches it (a prefix of a
    match when the token limit ended it)."""
    kind = BUILTIN_STRATEGIES.get(name, per_request=True)

    def build():
        return kind.build(driver.provider, kind.validate(BUILTIN_PARAMS.get(name, {})))

    run = driver.run(build())
    assert run.stats.finish_reason in ("length", "stop"), (name, run.stats.constraint)
    assert run.tokens and isinstance(run.events[-1], Done)
    if driver.batched:
        alone = list(
            BacktrackSampler(driver.provider, build()).generate(driver.prompt, max_new_tokens=TOKENS, temperature=0)
        )
        assert run.tokens == alone, name
    if name == "grammar":
        import re

        whole = run.stats.finish_reason == "stop"  # the token limit may end it inside a word: a prefix
        assert re.fullmatch(r"( [a-z]+)+" if whole else r"( [a-z]*)+", run.text(driver.provider)), run.text(
            driver.provider
        )
