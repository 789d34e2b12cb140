"""The execution behind ``POST /v1/backtrack/candidates`` (human guidance in the browser), with the
deterministic FakeProvider; the route itself is tested against the real server in test_playground.py."""

from __future__ import annotations

import numpy as np

from backtrack_sampler import AntiSlopStrategy, CreativeWritingStrategy
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.server.playground import STATIC, candidates, public_path
from backtrack_sampler.strategy.base_strategy import BaseStrategy


def test_candidates_are_the_top_of_the_filtered_distribution():
    p = FakeProvider()
    prompt = p.encode(" the cat")
    answer = candidates(p, BaseStrategy(), prompt, [], top_n=4, temperature=1.0, top_k=50)
    probs = [c["probability"] for c in answer["candidates"]]
    assert len(probs) == 4 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-9
    logits = p.next_logits(prompt).astype(np.float64)
    expected = np.argsort(-logits)[:4]
    assert [c["token"] for c in answer["candidates"]] == [int(t) for t in expected]
    shares = np.exp(logits - logits.max())
    top50 = np.sort(shares)[-50:]
    assert abs(probs[0] - shares.max() / top50.sum()) < 1e-6
    assert answer == {**answer, "tokens": [], "text": "", "finish_reason": None, "rewind": None}


def test_choosing_a_token_moves_on_and_back_is_dropping_it():
    p = FakeProvider()
    prompt = p.encode(" the cat")
    first = candidates(p, BaseStrategy(), prompt, [])
    token = first["candidates"][1]["token"]
    second = candidates(p, BaseStrategy(), prompt, [token])
    assert second["tokens"] == [token] and second["text"] == first["candidates"][1]["text"]
    assert candidates(p, BaseStrategy(), prompt, [])["candidates"] == first["candidates"]  # stateless


def test_a_banned_phrase_completed_by_the_user_is_rewound_and_then_banned():
    p = FakeProvider()
    prompt, ids = p.encode(" the cat"), p.ids
    chosen = [ids[" dog"], ids[" sat"], ids[" on"], ids[" the"]]
    answer = candidates(p, AntiSlopStrategy(p, [" sat on"]), prompt, chosen, top_n=50)
    assert answer["rewind"] == {
        "position": 1,
        "tokens": [ids[" sat"], ids[" on"]],
        "reason": "phrase ' sat on'",
        "text": " sat on",
    }
    assert answer["tokens"] == [ids[" dog"]] and answer["text"] == " dog"
    assert ids[" sat"] not in [c["token"] for c in answer["candidates"]]  # banned at that position now


def test_the_strategy_edits_the_candidates():
    p = FakeProvider()
    prompt = p.encode(" the cat")
    plain = candidates(p, BaseStrategy(), prompt, [], top_n=3)["candidates"]
    creative = candidates(p, CreativeWritingStrategy(p), prompt, [], top_n=3)["candidates"]
    assert creative[0]["token"] != plain[0]["token"]  # CreativeWriting bans the most likely token


def test_end_of_text_and_the_token_limit_finish():
    p = FakeProvider()
    prompt, eos = p.encode(" the cat"), p.get_eos_token_id()
    ended = candidates(p, BaseStrategy(), prompt, [p.ids[" dog"], eos])
    assert ended["finish_reason"] == "stop" and ended["candidates"] == [] and ended["tokens"] == [p.ids[" dog"], eos]
    full = candidates(p, BaseStrategy(), prompt, [p.ids[" dog"]] * 3, max_new_tokens=2)
    assert full["finish_reason"] == "length" and full["tokens"] == [p.ids[" dog"]] * 2


def test_the_page_is_served_without_a_key_and_ships_its_files():
    assert public_path("/") and public_path("/static/app.js")
    assert not public_path("/v1/models") and not public_path("/v1/backtrack/candidates")
    assert {f.name for f in STATIC.iterdir()} >= {"index.html", "app.js", "style.css"}
    for name in ("index.html", "app.js", "style.css"):
        assert "http" not in (STATIC / name).read_text(), name  # nothing is loaded from the network
