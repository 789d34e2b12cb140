"""Engine providers against a fake engine on 127.0.0.1 that speaks each engine's wire format
(tests/engine_fakes.py: shapes written from the engines' sources), with a known model: parsing,
equivalence with in-process sampling, exactness of the draft acceptance (chi-square), errors."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
from engine_fakes import FakeEngine, llama_entry, llama_final, llama_partial, sglang_chunk, vllm_chunk

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, BaseStrategy, CreativeWritingStrategy
from backtrack_sampler.engine import APIS, EngineError, EngineProvider, Finish, Step, accept, loop
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.strategy.base_strategy import BaseStrategy as _Base
from backtrack_sampler.strategy.sampling import Sampling

ENGINES = ["llama-server", "vllm", "sglang"]


class NoOp(_Base):
    """Changes nothing."""


@pytest.fixture
def model():
    return FakeProvider()


@pytest.fixture(params=ENGINES)
def engine(request, model):
    fake = FakeEngine(request.param, model.logits_for, model.vocab_size, eos=model.get_eos_token_id())
    yield fake
    fake.close()


def connect(fake: FakeEngine, model: FakeProvider, **options) -> EngineProvider:
    return EngineProvider(fake.url, fake.engine_type, tokenizer=model, **options)


# ---- wire formats --------------------------------------------------------------------------
def test_llama_server_stream_is_read_token_by_token():
    post = [(7, 0.5), (9, 0.3), (4, 0.2)]
    events = [
        {"index": 0, "content": "", "tokens": [], "stop": False},  # the begin marker carries no token
        llama_partial(9, llama_entry(9, post, True), 1, 5, 4),
        llama_partial(7, llama_entry(7, post, True), 2, 5, 4),
        llama_final([9, 7], "limit", 5, 4),
    ]
    steps = list(APIS["llama-server"].events(iter(events), Sampling(1.0, 3)))
    assert [s.token for s in steps[:2]] == [9, 7] and steps[2] == Finish("length", 4)
    assert steps[0].kind == "post" and steps[0].cached == 4 and steps[1].cached is None
    assert dict(zip(steps[0].ids.tolist(), np.exp(steps[0].logp).round(6).tolist())) == {7: 0.5, 9: 0.3, 4: 0.2}


def test_llama_server_gap_ends_the_request():
    """A token ending in an incomplete UTF-8 character is not streamed: tokens_predicted jumps."""
    entry = llama_entry(5, [(5, 1.0)], True)
    events = [llama_partial(5, entry, 1, 3, 0), llama_partial(5, entry, 3, 3, 0)]
    steps = list(APIS["llama-server"].events(iter(events), Sampling(1.0, 3)))
    assert [type(s) for s in steps] == [Step, Finish] and steps[1].reason == "gap"


def test_vllm_stream_reads_token_id_keys_and_drops_filtered_tokens():
    chunk = vllm_chunk([12, 3], [{12: -0.1, 3: -2.5, 8: -math.inf}, {3: -0.7, 12: -0.7}], [-0.1, -0.7], None)
    final = vllm_chunk([1], [{1: 0.0}], [0.0], "stop")
    usage = {
        "id": "cmpl-fake",
        "object": "text_completion",
        "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 8}},
    }
    steps = list(APIS["vllm"].events(iter([chunk, final, usage]), Sampling(0.8, 2)))
    assert [s.token for s in steps[:3]] == [12, 3, 1] and steps[3] == Finish("stop", 8)
    assert sorted(steps[0].ids.tolist()) == [3, 12]  # -9999.0 (filtered out) is not a candidate


def test_sglang_cumulative_and_incremental_streams_give_the_same_steps():
    own, tops = [(-0.2, 4), (-0.9, 6)], [[(-0.2, 4), (-1.8, 6)], [(-0.9, 6), (-0.6, 4)]]
    cumulative = [
        sglang_chunk([4], own[:1], tops[:1], 7, 6, None),
        sglang_chunk([4, 6], own, tops, 7, 6, {"type": "length", "length": 2}),
    ]
    incremental = [
        sglang_chunk([4], own[:1], tops[:1], 7, 6, None),
        sglang_chunk([6], own[1:], tops[1:], 7, 6, {"type": "length", "length": 2}),
    ]
    incremental[1]["meta_info"]["completion_tokens"] = 2
    for stream in (cumulative, incremental):
        steps = list(APIS["sglang"].events(iter(stream), Sampling(1.0, None)))
        assert [s.token for s in steps[:2]] == [4, 6] and steps[2] == Finish("length", 6)
        assert steps[0].kind == "tempered" and steps[0].cached == 6


# ---- the loop against each engine ------------------------------------------------------------
def _in_process(model, strategy_fn, prompt, **kwargs):
    provider = FakeProvider()
    sampler = BacktrackSampler(provider, strategy_fn(provider))
    return list(sampler.generate(prompt, **kwargs)), sampler.stats


def test_greedy_through_the_engine_equals_in_process(engine, model):
    provider = connect(engine, model)
    for strategy_fn in (lambda p: NoOp(), lambda p: AntiSlopStrategy(p, [" the", " dog", " cat"])):
        expected, _ = _in_process(model, strategy_fn, " it was", max_new_tokens=40, temperature=0)
        sampler = BacktrackSampler(provider, strategy_fn(provider))
        assert list(sampler.generate(" it was", max_new_tokens=40, temperature=0)) == expected
    assert all(r.get("prompt", r.get("input_ids"))[0] == model.encode("x")[0] for r in engine.requests[:1])


def test_bans_hold_at_temperature(engine, model):
    provider = connect(engine, model)
    banned = [" the", " a", " cat"]
    rewinds = 0
    for seed in range(5):
        sampler = BacktrackSampler(provider, AntiSlopStrategy(provider, banned))
        text = provider.decode(list(sampler.generate(" it was", max_new_tokens=30, seed=seed, top_k=8)))
        assert not any(phrase in text for phrase in banned), text
        rewinds += sampler.stats.rewinds
    assert rewinds > 0  # the phrases were drafted and taken back
    # every request carries token ids only (the BOS we added, nothing re-tokenized)
    assert all(isinstance(t, int) for r in engine.requests for t in r.get("prompt", r.get("input_ids", [])))


def test_a_generation_keeps_one_llama_server_slot(model):
    """Every request of a generation asks for the same slot (its prefix stays cached there, and a
    request after a rewind waits for the stream it replaces instead of decoding beside it); running
    generations hold different slots; beyond the engine's slots the engine chooses (-1)."""
    fake = FakeEngine("llama-server", model.logits_for, model.vocab_size, eos=model.get_eos_token_id())
    try:
        provider = connect(fake, model)  # the fake's /props: total_slots 4
        for seed in range(5):  # one after the other: each takes slot 0 and gives it back
            sampler = BacktrackSampler(provider, AntiSlopStrategy(provider, [" the", " a", " cat"]))
            list(sampler.generate(" it was", max_new_tokens=30, seed=seed, top_k=8))
        assert len(fake.requests) > 5 and {r["id_slot"] for r in fake.requests} == {0}  # rewinds asked again
        live = [BacktrackSampler(provider, NoOp()).generate(" it", max_new_tokens=3, seed=i) for i in range(5)]
        for tokens in live:
            next(tokens)  # each holds its slot until it ends
        assert [r["id_slot"] for r in fake.requests[-5:]] == [0, 1, 2, 3, -1]
        for tokens in live:
            tokens.close()
        list(BacktrackSampler(provider, NoOp()).generate(" it", max_new_tokens=3, seed=9))
        assert fake.requests[-1]["id_slot"] in (0, 1, 2, 3)  # given back
    finally:
        fake.close()


class RewindAt(_Base):
    """Rewinds once, from 5 tokens to 3."""

    def __init__(self):
        self.done = False

    def backtrack(self, tokens):
        if len(tokens) == 5 and not self.done:
            self.done = True
            return tokens[:3]
        return tokens

    def get_keep_index(self):
        return 0


def test_a_rewound_generation_chooses_again_in_the_same_step(engine, model):
    # its candidates at the position rewound to were received: it chooses there in the step that
    # rewound (Backend.known), so no step ends with it behind where it was
    from backtrack_sampler.core.batch import BatchScheduler

    provider = connect(engine, model)
    scheduler = BatchScheduler(provider, parallel=2)
    jobs = [scheduler.submit(" it was", s(), max_new_tokens=12, seed=1, top_k=8) for s in (RewindAt, NoOp)]
    lengths = []
    while scheduler.pending:
        scheduler.step()
        lengths.append(len(jobs[0].generation.tokens))
    assert jobs[0].stats.rewinds == 1 and len(jobs[0].tokens) > 5 and lengths == sorted(lengths)


def test_no_op_strategy_takes_every_draft_in_one_request(engine, model):
    provider = connect(engine, model)
    sampler = BacktrackSampler(provider, NoOp())
    before = len(engine.requests)
    tokens = list(sampler.generate(" it was", max_new_tokens=25, seed=3, top_k=10))
    assert len(engine.requests) - before <= 2  # one, or two when the fake draws EOS-free and stops at the limit
    assert len(tokens) <= 25
    stats = provider.stats  # llama-server reports its cache use on the first token and on the final event: counted once
    assert stats.cache_reports <= stats.requests and stats.cached_tokens <= stats.prompt_tokens


def test_creative_writing_runs_through_the_engine(engine, model, monkeypatch):
    provider = connect(engine, model)
    sampler = BacktrackSampler(provider, CreativeWritingStrategy(provider, eos_penalty=0.0))
    readers, read = [], loop._HTTPStream._read
    monkeypatch.setattr(
        loop._HTTPStream, "_read", lambda self, *a: (readers.append(threading.current_thread()), read(self, *a))
    )
    existing = set(threading.enumerate())  # idle readers that earlier tests left in the shared pool may serve too
    tokens = list(sampler.generate(" it was", max_new_tokens=20, seed=1, top_k=10))
    # the streams were read by threads kept for the next one, not by a new thread per request (Thread.start waits
    # for the thread to run: tens of ms in the scheduler's thread on a busy machine)
    assert len(readers) == provider.stats.requests and len(set(readers) - existing) <= 2
    assert len(tokens) == 20
    assert provider.stats.requests > 1  # the strategy changes every step: drafts get replaced
    stats = provider.stats  # every streamed request gave a first token, and its wait was timed
    assert stats.first_tokens == stats.requests and stats.first_token_seconds > 0
    assert stats.mean_first_token_seconds == pytest.approx(stats.first_token_seconds / stats.requests)


@pytest.mark.parametrize("opaque", [False, True])
@pytest.mark.parametrize(
    "gap_at", [1, 3]
)  # a token in the middle; the last one (EOS), then only the final event shows it
def test_llama_server_gap_is_bridged_one_token_at_a_time(model, opaque, gap_at):
    """llama-server does not stream a token that ends in an incomplete UTF-8 character: the loop
    notices the jump in tokens_predicted and asks for that token alone (kept as drafted when it
    comes without probabilities); greedy output is unchanged."""
    fake = FakeEngine("llama-server", model.logits_for, model.vocab_size, eos=model.get_eos_token_id())
    try:
        fake.gap_at, fake.opaque_single = gap_at, opaque
        provider = connect(fake, model)
        expected, _ = _in_process(model, lambda p: NoOp(), " it was", max_new_tokens=12, temperature=0)
        got = list(BacktrackSampler(provider, NoOp()).generate(" it was", max_new_tokens=12, temperature=0))
        assert got == expected
        assert any(not r["stream"] and r["n_predict"] == 1 for r in fake.requests)
    finally:
        fake.close()


# ---- exactness ----------------------------------------------------------------------------
Q = np.array([0.40, 0.25, 0.15, 0.12, 0.08])
W = np.array([1.0, 2.0, 1.0, 0.0, 0.5])  # the strategy's reweighting: token 6 banned
IDS = np.arange(3, 8)


class Reweight(BaseStrategy):
    """Multiplies the probabilities of tokens 3..7 by W at every position (0: banned)."""

    def on_logits(self, logits, continuation_tokens):
        with np.errstate(divide="ignore"):
            logits[IDS] += np.log(W).astype(np.float32)
        return logits


def fixed_engine(model: FakeProvider) -> FakeEngine:
    """A fake llama-server whose next-token distribution is Q on tokens 3..7 at every position."""

    def logits_fn(tokens):
        logits = np.full(model.vocab_size, -np.inf, dtype=np.float32)
        logits[IDS] = np.log(Q)
        return logits

    return FakeEngine("llama-server", logits_fn, model.vocab_size, eos=model.get_eos_token_id())


def _chi_square(counts: np.ndarray, expected: np.ndarray) -> float:
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_acceptance_is_exact_chi_square():
    """Draws through the loop follow p' = q * W (normalised), not the engine's q. Seeded: deterministic."""
    model = FakeProvider()

    fake = fixed_engine(model)
    try:
        provider = EngineProvider(fake.url, "llama-server", tokenizer=model)
        counts = np.zeros(len(IDS))
        for seed in range(60):
            sampler = BacktrackSampler(provider, Reweight())
            for token in sampler.generate(" it", max_new_tokens=50, seed=seed, top_k=None):
                counts[token - 3] += 1
        n = counts.sum()
        target = Q * W / (Q * W).sum()
        assert n == 3000 and counts[3] == 0  # the banned token never appears
        # df = 3 (four possible tokens): P(chi2 > 16.27) = 0.001
        assert _chi_square(counts, n * target) < 16.27, counts
        naive = Q * (W > 0) / (Q * (W > 0)).sum()  # "keep the draft unless banned" would look like this
        assert _chi_square(counts, n * naive) > 100, counts
        assert provider.stats.requests > 60  # rejected drafts restarted the stream
    finally:
        fake.close()


def test_a_soft_banned_token_chosen_again_keeps_the_stream_chi_square():
    """A soft ban of a one-token phrase: the loop chooses again at that position, locally; when it
    picks the same token, the engine's stream goes on (no new request). The tokens still follow
    in-process AntiSlop: draw from q; on " cat" draw again with its weight times m, then keep it."""
    model = FakeProvider()
    m, cat = 0.8, model.ids[" cat"]

    fake = fixed_engine(model)
    try:
        provider = EngineProvider(fake.url, "llama-server", tokenizer=model)
        counts, rewinds = np.zeros(len(IDS)), 0
        for seed in range(60):
            sampler = BacktrackSampler(provider, AntiSlopStrategy(provider, [["cat", m]]))
            for token in sampler.generate(" it", max_new_tokens=50, seed=seed, top_k=None):
                counts[token - 3] += 1
            rewinds += sampler.stats.rewinds
        n, c = counts.sum(), cat - 3
        again = Q * np.where(IDS == cat, m, 1.0)
        again /= again.sum()
        target = Q * (IDS != cat) + Q[c] * again  # one redraw after a " cat"
        assert n == 3000 and rewinds > 300
        assert _chi_square(counts, n * target) < 18.47, counts  # df = 4: P(chi2 > 18.47) = 0.001
        # every kept " cat" was chosen again after its rewind, and its stream went on
        assert provider.stats.requests - 60 <= rewinds - counts[c], (provider.stats.requests, rewinds, counts)
    finally:
        fake.close()


def test_accept_function_distribution_and_determinism():
    rng = np.random.default_rng(0)
    q = (np.array([1, 2, 3]), np.array([0.5, 0.3, 0.2]))
    p = (np.array([2, 3, 4]), np.array([0.2, 0.2, 0.6]))  # token 4 is outside q
    draws = [accept(int(rng.choice(q[0], p=q[1])), q, p, rng) for _ in range(20000)]
    freq = np.array([draws.count(t) for t in (1, 2, 3, 4)]) / len(draws)
    assert np.allclose(freq, [0.0, 0.2, 0.2, 0.6], atol=0.015)
    greedy = np.random.default_rng(1)
    state = greedy.bit_generator.state
    assert accept(5, (np.array([5]), np.ones(1)), (np.array([9]), np.ones(1)), greedy) == 9
    assert accept(5, (np.array([5]), np.ones(1)), (np.array([5]), np.ones(1)), greedy) == 5
    assert greedy.bit_generator.state == state  # greedy decoding draws no random numbers


# ---- errors -------------------------------------------------------------------------------
def test_unreachable_engine_is_a_clear_error(model):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    started = time.perf_counter()
    with pytest.raises(EngineError, match="cannot reach llama-server"):
        EngineProvider(f"http://127.0.0.1:{port}", "llama-server", tokenizer=model, timeout=5)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("fault", ["fail", "die", "stall", "stream_error"])
def test_engine_faults_are_clear_errors(engine, model, fault):
    provider = connect(engine, model, timeout=1.0)
    messages = {
        "fail": "HTTP 500: fake engine failure",
        "die": "broke off|ended the stream",
        "stall": "did not answer within 1 s",
        "stream_error": "fake error mid-stream",
    }
    if fault == "fail":
        engine.fail = True
    elif fault == "die":
        engine.die_after = 3
    elif fault == "stall":
        engine.stall = 2.5
    else:
        engine.stream_error = True
    sampler = BacktrackSampler(provider, NoOp())
    started = time.perf_counter()
    with pytest.raises(EngineError, match=messages[fault]):
        list(sampler.generate(" it was", max_new_tokens=20, seed=0))
    assert time.perf_counter() - started < 5
    engine.stall = 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown engine type"):
        EngineProvider("http://127.0.0.1:1", "tgi", tokenizer=FakeProvider())
    with pytest.raises(ValueError, match="must start with http"):
        EngineProvider("127.0.0.1:8080", "vllm", tokenizer=FakeProvider())


# ---- the OpenAI-compatible server in front of an engine -------------------------------------
def test_server_in_front_of_an_engine_streams_and_reports_engine_failures(model):
    """create_app(Engine(EngineProvider)) on a real uvicorn: completions come from the engine with
    the bans held, and an engine failure answers 502 with code "engine_error"."""
    from serving import ServerThread

    from backtrack_sampler.server.app import Engine, create_app

    fake = FakeEngine("vllm", model.logits_for, model.vocab_size, eos=model.get_eos_token_id())
    engine = Engine(connect(fake, model, timeout=5))
    try:
        with ServerThread(create_app(engine)) as server:
            import httpx

            body = {
                "model": "x",
                "prompt": " it was",
                "max_tokens": 20,
                "seed": 1,
                "top_k": 8,
                "banned_strings": [" the", " a"],
            }
            answer = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            text = answer.json()["choices"][0]["text"]
            assert text and " the" not in text.lower() and " a" not in text.lower(), text
            assert all(isinstance(t, int) for t in fake.requests[-1]["prompt"])
            fake.fail = True
            answer = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
            assert answer.status_code == 502 and answer.json()["error"]["code"] == "engine_error", answer.text
            assert "fake engine failure" in answer.json()["error"]["message"]
    finally:
        engine.close()
        fake.close()


def test_health_reports_an_engine_that_is_down(model):
    """/health in front of an engine is 200 only while the engine answers its own /health: 503 with
    the reason while it says it is not ready, and once it is gone (a load balancer then takes the
    server out of rotation); 200 again when it is back."""
    from serving import ServerThread

    from backtrack_sampler.server.app import Engine, create_app

    fake = FakeEngine("llama-server", model.logits_for, model.vocab_size, eos=model.get_eos_token_id())
    engine = Engine(connect(fake, model, timeout=5))
    try:
        with ServerThread(create_app(engine)) as server:
            import httpx

            ok = httpx.get(server.url + "/health", timeout=10)
            assert ok.status_code == 200 and ok.json()["status"] == "ok", ok.text
            fake.healthy = False
            down = httpx.get(server.url + "/health", timeout=10)
            assert down.status_code == 503 and down.json()["status"] == "error", down.text
            assert "HTTP 503" in down.json()["error"] and fake.url in down.json()["error"]
            fake.healthy = True
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
            fake.close()
            gone = httpx.get(server.url + "/health", timeout=10)
            assert gone.status_code == 503 and "does not answer" in gone.json()["error"], gone.text
    finally:
        engine.close()
        fake.close()


def test_a_vocabulary_mismatch_is_a_clear_error(model):
    """An engine serving another model (larger vocabulary) is caught: at connection for
    llama-server (/v1/models n_vocab), at the first token id out of range for the others."""

    def wider(tokens):
        logits = np.zeros(model.vocab_size + 10, dtype=np.float32)
        logits[model.vocab_size + 5] = 10.0
        return logits

    for engine_type in ("llama-server", "vllm"):
        fake = FakeEngine(engine_type, wider, model.vocab_size + 10, eos=model.get_eos_token_id())
        try:
            with pytest.raises(EngineError, match="tokenizer"):
                provider = connect(fake, model)
                list(BacktrackSampler(provider, NoOp()).generate(" it was", max_new_tokens=5, temperature=0))
        finally:
            fake.close()


def test_reader_threads_are_reused_and_end_when_idle():
    readers = loop._Readers()
    readers.idle_seconds = 0.2
    ran, done = [], threading.Event()
    for _ in range(3):  # one after the other: one thread for all
        done.clear()
        readers.run(lambda: (ran.append(threading.current_thread()), done.set()))
        assert done.wait(5)
        time.sleep(0.02)
    assert len(ran) == 3 and len(set(ran)) == 1
    ran[0].join(5)  # idle for idle_seconds: it ends
    assert not ran[0].is_alive()
    done.clear()
    readers.run(done.set)  # and a new one takes the next task
    assert done.wait(5)
