"""Batched generation on the embedded model (llama.cpp, one context with several sequences):
rewinds of one sequence never disturb the others and stay exact; the scheduler runs AntiSlop
generations with different bans side by side; transformers goes through the same scheduler."""

from __future__ import annotations

import numpy as np
import pytest

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler
from backtrack_sampler.core.batch import BatchScheduler

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def small_llm():
    from backtrack_sampler.provider.models import load_llamacpp

    return load_llamacpp(n_ctx=1024)


def slotted(llm, slots):
    from backtrack_sampler.provider.llamacpp_provider import LlamacppProvider

    return LlamacppProvider(llm, None, "cpu", slots=slots)


@pytest.fixture(scope="module")
def batched(small_llm):
    return slotted(small_llm, 8)


def run(provider, schedule):
    """Feed ``schedule`` (a list of steps, each ``{key: tokens}``) through ``generate_batch``;
    return ``{key: {length: logits}}``. Every key is released at the end."""
    seen = {}
    for step in schedule:
        for key, logits in provider.next_logits_batch(step).items():
            seen.setdefault(key, {})[len(step[key])] = logits
    for key in seen:
        provider.release(key)
    return seen


def test_one_sequences_rewinds_leave_the_others_and_itself_exact(small_llm):
    """Run A: sequence 0 takes a 10-token detour and rewinds it (re-evaluating one token, so each
    call still holds one token per sequence). Run B: the same without the detour. Each run has a
    fresh provider (llama.cpp's numbers depend on the calls a context made before), and every
    call has the same shape in both, so every logits row must be equal, bit for bit."""
    batched = slotted(small_llm, 4)
    rng = np.random.default_rng(0)
    # prompts of one length: a call whose sequences bring unequal token counts is split into several
    # micro-batches, and llama.cpp's numbers for such a call can differ between two identical calls
    prompts = [batched.encode(t)[:4] for t in ("Once upon a time", "The recipe calls for", "def main():", "Dear Sir,")]
    assert {len(p) for p in prompts} == {4}
    paths = [[int(t) for t in rng.integers(1000, 20000, 40)] for _ in prompts]
    detour = [int(t) for t in rng.integers(1000, 20000, 10)]
    prefill = {s: p for s, p in enumerate(prompts)}

    def schedule(with_detour):
        steps = [prefill]
        zero = [prompts[0] + paths[0][:k] for k in range(1, 11)]
        if with_detour:
            zero += [prompts[0] + paths[0][:10] + detour[:k] for k in range(1, 11)]
            zero += [prompts[0] + paths[0][:10]]  # the rewind: its last token is evaluated again
        zero += [prompts[0] + paths[0][:k] for k in range(11, 41)]
        for i in range(40):
            step = {s: prompts[s] + paths[s][: i + 1] for s in (1, 2, 3)}
            step[0] = zero[i]
            steps.append(step)
        return steps

    a, b = run(batched, schedule(True)), run(slotted(small_llm, 4), schedule(False))
    for s in (1, 2, 3):
        assert a[s].keys() == b[s].keys()
        for length in a[s]:
            assert np.array_equal(a[s][length], b[s][length]), f"sequence {s} disturbed at length {length}"
    shared = [n for n in a[0] if n in b[0] and n <= len(prompts[0]) + 29]
    assert len(shared) >= 29
    for length in shared:
        assert np.array_equal(a[0][length], b[0][length]), f"sequence 0 wrong after its rewind at length {length}"
    assert batched.batch_keys == []


def test_slot_logits_match_the_single_sequence_path_closely(batched, llama_provider):
    """Batch composition changes llama.cpp's numbers a little, never the model: the top token
    agrees and the logits stay close to the single-sequence path's."""
    prompts = [batched.encode(t) for t in ("The capital of France is", "1, 2, 3, 4,", "Water boils at")]
    out = run(batched, [{i: p for i, p in enumerate(prompts)}])
    for i, prompt in enumerate(prompts):
        alone = llama_provider.next_logits(prompt)
        together = out[i][len(prompt)]
        assert int(np.argmax(alone)) == int(np.argmax(together))
        assert np.abs(alone - together).max() < 2.0


def test_scheduler_runs_different_bans_side_by_side(batched):
    bans = [["the"], ["and"], ["a"], ["was"], ["of"], ["to"], ["in"], ["he", "she"]]
    scheduler = BatchScheduler(batched)
    prompt = "Write a short story about a dragon who learns to bake bread."
    jobs = [
        scheduler.submit(
            prompt, AntiSlopStrategy(batched, ban, whole_words=True), max_new_tokens=40, temperature=0.8, seed=i
        )
        for i, ban in enumerate(bans)
    ]
    assert scheduler.queued == 8
    list(scheduler.run())
    for job, ban in zip(jobs, bans):
        words = {w.strip(".,;:!?\"'").lower() for w in job.text.split()}
        assert job.error is None and job.stats.finish_reason == ("length" if len(job.tokens) == 40 else "stop"), job
        assert not words & set(ban), (ban, job.text)
    assert sum(len(job.tokens) for job in jobs) >= 150  # real stories, not empty ones
    assert sum(job.stats.rewinds for job in jobs) > 0
    assert batched.batch_keys == []


def test_scheduler_greedy_equals_the_single_sequence_driver_on_transformers(transformers_provider):
    """transformers runs the sequences one after the other (one cache each) inside a step: the
    numbers are those of a single sequence, so greedy batched output equals generate()'s."""
    from backtrack_sampler.provider.transformers_provider import TransformersProvider

    provider = TransformersProvider(transformers_provider.model, transformers_provider.tokenizer, "cpu", slots=3)
    prompts = ["The capital of France is", "Once upon a time", "List three colours:"]
    scheduler = BatchScheduler(provider)
    jobs = [
        scheduler.submit(p, AntiSlopStrategy(provider, ["the"], whole_words=True), max_new_tokens=12, temperature=0)
        for p in prompts
    ]
    list(scheduler.run())
    for job, prompt in zip(jobs, prompts):
        sampler = BacktrackSampler(provider, AntiSlopStrategy(provider, ["the"], whole_words=True))
        assert job.tokens == list(sampler.generate(prompt, max_new_tokens=12, temperature=0))
    assert provider.batch_keys == []


def test_batch_rows_go_in_sequence_order_whatever_the_slots(small_llm, monkeypatch):
    """llama.cpp splits a batch whose sequences are out of order into one decode per sequence:
    keys that hold slots in reverse order must still be sent as one batch in slot order, each
    with its own logits."""
    provider = slotted(small_llm, 4)
    prompts = {
        key: provider.encode(text)
        for key, text in zip("abcd", ("The sea", "A cat sat on", "Once upon a time", "In the morning"))
    }
    alone = {}
    for key, prompt in prompts.items():
        alone[key] = provider.next_logits_batch({key: prompt})[key]
        provider.release(key)
    for key in "dcba":  # slots handed out in reverse: d holds slot 0, a slot 3
        provider.next_logits_batch({key: prompts[key][:1]})
    orders, decode = [], provider._decode

    def recording(ctx, n, rows, results):  # the sequence id of every row of each llama_decode
        orders.append(provider._seq[:n].tolist())
        decode(ctx, n, rows, results)

    monkeypatch.setattr(provider, "_decode", recording)
    got = provider.next_logits_batch(prompts)  # keys in the order a, b, c, d: slots 3, 2, 1, 0
    assert len(orders) == 1 and orders[0] == sorted(orders[0]), orders
    for key in prompts:
        assert got[key].argmax() == alone[key].argmax(), key
        provider.release(key)
