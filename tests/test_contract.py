"""The contract suite: every scenario through every driver."""

from __future__ import annotations

import json
import threading

import httpx

from backtrack_sampler.engine import EngineProvider
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.server import Engine, create_app
from engine_fakes import FakeEngine
from serving import ServerThread


def test_seam_candidates_through_an_engine_replay_the_chosen_tokens():
    model = FakeProvider()
    fake = FakeEngine("llama-server", model.logits_for, model.vocab_size, eos=model.get_eos_token_id())
    try:
        with ServerThread(create_app(Engine(EngineProvider(fake.url, "llama-server", tokenizer=model)))) as server:
            chosen = [model.ids[" dog"], model.ids[" sat"]]
            answer = httpx.post(server.url + "/v1/backtrack/candidates", timeout=30,
                                json={"prompt": " the cat", "tokens": chosen, "top_n": 4}).json()
    finally:
        fake.close()
    assert answer["tokens"] == chosen and answer["text"] == " dog sat", answer
    assert len(answer["candidates"]) == 4 and answer["finish_reason"] is None


def test_seam_include_backtrack_events_stream_live_through_an_engine():
    model = FakeProvider()
    fake = FakeEngine("llama-server", model.logits_for, model.vocab_size, eos=model.get_eos_token_id())
    fake.hold_after = 4
    got, seen = [], threading.Event()
    try:
        with ServerThread(create_app(Engine(EngineProvider(fake.url, "llama-server", tokenizer=model)))) as server:
            def client():
                body = {"prompt": " the cat", "max_tokens": 12, "seed": 1, "stream": True,
                        "stream_options": {"include_backtrack": True}}
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
