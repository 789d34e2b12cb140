"""BatchScheduler and generate_batch with the FakeProvider: outputs equal the single-sequence
driver's, one backend call per step, work counts, joining/leaving, chunked prompts, cancelling."""

from __future__ import annotations

import numpy as np
import pytest

from backtrack_sampler import BacktrackSampler, BaseStrategy
from backtrack_sampler.core.batch import BatchScheduler
from backtrack_sampler.provider.fake_provider import FakeProvider


class Rewinder(BaseStrategy):
    """Rewinds 1..3 tokens with probability 0.4 (its own seeded rng), never below its keep index."""

    def __init__(self, seed=0):
        self.seed = seed
        self.reset()

    def reset(self):
        self.rng, self.keep = np.random.default_rng(self.seed), 0

    def backtrack(self, tokens):
        room = min(3, len(tokens) - self.keep)
        if room > 0 and self.rng.random() < 0.4:
            tokens = tokens[: -int(self.rng.integers(1, room + 1))]
        self.keep = max(self.keep, len(tokens) - 3)
        return tokens

    def get_keep_index(self):
        return self.keep


class CheckLogits(Rewinder):
    """Also asserts that every logits row equals a fresh forward pass over the sequence."""

    def __init__(self, provider, prompt, seed=0):
        self.provider, self.prompt = provider, list(prompt)
        super().__init__(seed)

    def on_logits(self, logits, tokens):
        assert np.array_equal(logits, self.provider.logits_for(self.prompt + list(tokens)))
        return logits


class Boom(BaseStrategy):
    def backtrack(self, tokens):
        if len(tokens) == 3:
            raise RuntimeError("boom")
        return tokens


PROMPTS = [[2, 5, 6], [2, 7], [2, 8, 9, 10, 11], [2, 12], [2, 13, 14], [2, 15, 16, 17]]


def single(prompt, strategy, **kw):
    provider = FakeProvider()
    return list(BacktrackSampler(provider, strategy).generate(prompt, **kw))


def test_each_job_equals_its_single_sequence_run():
    fake = FakeProvider()
    scheduler = BatchScheduler(fake, parallel=4)
    kws = [dict(max_new_tokens=20 + i, temperature=0.5 + 0.1 * i, seed=i) for i in range(len(PROMPTS))]
    jobs = [scheduler.submit(p, CheckLogits(fake, p, seed=i), **kw) for i, (p, kw) in enumerate(zip(PROMPTS, kws))]
    streamed = {job: [] for job in jobs}
    for job, tokens in scheduler.run():
        streamed[job].extend(tokens)
    for i, (job, prompt, kw) in enumerate(zip(jobs, PROMPTS, kws)):
        assert job.done and job.error is None and job.stats.finish_reason == "length"
        assert job.tokens == streamed[job] == single(prompt, Rewinder(seed=i), **kw)
        assert job.stats.rewinds > 0
    assert fake.batch_keys == [] and 0 < fake.batch_calls <= scheduler.steps  # short rewinds evaluate nothing


def test_one_backend_call_per_step_and_work_counts():
    fake = FakeProvider()
    scheduler = BatchScheduler(fake, parallel=3)
    for p in PROMPTS[:3]:
        scheduler.submit(p, max_new_tokens=10, seed=0)
    calls = 0
    while scheduler.pending:
        before = fake.evaluated
        scheduler.step()
        calls += 1
        assert fake.batch_calls == calls
        # the prompts first, then one token per running generation
        assert fake.evaluated - before == (sum(map(len, PROMPTS[:3])) if calls == 1 else 3)
    # no rewinds: each prompt once, then every token but the last (nothing asks for its logits)
    assert fake.evaluated == sum(len(p) + 10 - 1 for p in PROMPTS[:3])
    assert scheduler.steps == 10 and fake.forward_calls == 0


def test_a_rewound_generation_draws_again_in_the_same_step():
    # a short rewind goes back to logits the cache kept: the generation draws its next token in
    # the step that rewound, so every step reads one token of every running generation (none sits
    # a step out), and the outputs are those of the single-sequence driver
    fake = FakeProvider()
    scheduler = BatchScheduler(fake, parallel=3)
    scheduler.KNOWN_ROUNDS = 50  # (the default bounds a step's work: a 5th rewind in a row would wait a step)
    jobs = [scheduler.submit(p, Rewinder(seed=i), max_new_tokens=30, seed=i) for i, p in enumerate(PROMPTS[:3])]
    scheduler.step()  # the prompts
    while scheduler.pending:
        running, before = scheduler.running, fake.evaluated
        scheduler.step()
        assert fake.evaluated - before == running
    for i, job in enumerate(jobs):
        assert job.stats.rewinds > 3 and job.tokens == single(PROMPTS[i], Rewinder(seed=i), max_new_tokens=30, seed=i)


def test_at_most_parallel_running_first_come_first_served():
    fake = FakeProvider()
    scheduler = BatchScheduler(fake, parallel=2)
    lengths = [3, 8, 2, 5, 4, 1]
    jobs = [scheduler.submit(p, max_new_tokens=n, seed=0) for p, n in zip(PROMPTS, lengths)]
    started, finished, step = {}, {}, 0
    while scheduler.pending:
        scheduler.step()
        step += 1
        assert scheduler.running <= 2 and len(fake.batch_keys) <= 2
        for job in jobs:
            if job.state != "queued":
                started.setdefault(job, step)
            if job.done:
                finished.setdefault(job, step)
    order = [started[j] for j in jobs]
    assert order == sorted(order), "admitted out of arrival order"
    # a freed slot is taken at the very next step
    for job in jobs[2:]:
        earlier = sorted(finished[j] for j in jobs if started[j] < started[job])
        assert started[job] == earlier[jobs.index(job) - 2] + 1
    assert all(len(j.tokens) == n for j, n in zip(jobs, lengths))


def test_long_prompt_is_read_in_chunks_without_stalling_the_others():
    fake = FakeProvider()
    scheduler = BatchScheduler(fake, parallel=3, step_tokens=32)
    a = scheduler.submit([2, 5], max_new_tokens=40, seed=1)
    b = scheduler.submit([2, 6], max_new_tokens=40, seed=2)
    scheduler.step()
    long_prompt = [2] + [int(t) for t in np.random.default_rng(0).integers(3, fake.vocab_size, 200)]
    c = scheduler.submit(long_prompt, max_new_tokens=5, seed=3)
    while not c.tokens:
        before, delivered = fake.evaluated, (len(a.tokens), len(b.tokens))
        scheduler.step()
        assert fake.evaluated - before <= 32
        assert (len(a.tokens), len(b.tokens)) == (delivered[0] + 1, delivered[1] + 1), "a decoding job stalled"
    list(scheduler.run())
    assert c.tokens == single(long_prompt, BaseStrategy(), max_new_tokens=5, seed=3)
    assert a.tokens == single([2, 5], BaseStrategy(), max_new_tokens=40, seed=1)


def test_cancel_frees_the_slot_at_the_next_step():
    fake = FakeProvider()
    scheduler = BatchScheduler(fake, parallel=2)
    a, b, c, d = (scheduler.submit(p, max_new_tokens=30, seed=0) for p in PROMPTS[:4])
    scheduler.step()
    assert (a.state, b.state, c.state) == ("running", "running", "queued")
    d.cancel()  # queued: never runs
    a.cancel()
    scheduler.step()
    assert a.done and a.stats.finish_reason is None and a not in fake.batch_keys
    assert c.state == "running" and c.tokens and d.done and not d.tokens
    list(scheduler.run())
    assert b.stats.finish_reason == c.stats.finish_reason == "length" and len(a.tokens) == 1


def test_a_failing_strategy_ends_only_its_job():
    fake = FakeProvider()
    scheduler = BatchScheduler(fake)
    good = scheduler.submit(PROMPTS[0], max_new_tokens=8, seed=0)
    bad = scheduler.submit(PROMPTS[1], Boom(), max_new_tokens=8, seed=0)
    finished = []
    bad.on_finish = finished.append
    list(scheduler.run())
    assert isinstance(bad.error, RuntimeError) and bad.done and finished == [bad]
    assert good.error is None and good.tokens == single(PROMPTS[0], BaseStrategy(), max_new_tokens=8, seed=0)
    assert fake.batch_keys == []


def test_callbacks_and_text():
    fake = FakeProvider()
    scheduler = BatchScheduler(fake)
    seen, done = [], []
    job = scheduler.submit(
        "the cat", max_new_tokens=6, seed=4, on_tokens=lambda j, t: seen.extend(t), on_finish=done.append
    )
    list(scheduler.run())
    assert seen == job.tokens and done == [job] and job.text == fake.decode(job.tokens)


def test_checks_at_submit():
    fake = FakeProvider(slots=2)
    scheduler = BatchScheduler(fake)
    strategy = Rewinder()
    scheduler.submit(PROMPTS[0], strategy, max_new_tokens=3)
    with pytest.raises(ValueError, match="strategy instance"):
        scheduler.submit(PROMPTS[1], strategy, max_new_tokens=3)
    with pytest.raises(ValueError):
        scheduler.submit(PROMPTS[1], temperature=-1)
    with pytest.raises(ValueError):
        scheduler.submit("", max_new_tokens=3)
    with pytest.raises(ValueError, match="parallel"):
        BatchScheduler(fake, parallel=3)
    zero = scheduler.submit(PROMPTS[1], max_new_tokens=0)
    list(scheduler.run())
    assert zero.done and zero.tokens == [] and zero.stats.finish_reason == "length"


def test_generate_batch_keeps_one_cache_per_key():
    fake = FakeProvider(slots=3)
    seqs = {"a": [2, 5, 6, 7], "b": [2, 8], "c": [2, 9, 10]}
    out = fake.next_logits_batch(seqs)
    assert fake.batch_calls == 1 and fake.evaluated == 9
    for key, tokens in seqs.items():
        assert np.array_equal(out[key], fake.logits_for(tokens))
    # a rewinds 2 (its last token is evaluated again), b extends by 1, c diverges after 2
    out = fake.next_logits_batch({"a": [2, 5], "b": [2, 8, 11], "c": [2, 9, 12, 13]})
    assert fake.evaluated == 9 + 1 + 1 + 2 and fake.batch_calls == 2
    assert np.array_equal(out["a"], fake.logits_for([2, 5]))
    assert np.array_equal(out["c"], fake.logits_for([2, 9, 12, 13]))
    out = fake.next_logits_batch({"a": [2, 5, 3], "b": [2, 8]})  # b: a short rewind, its logits are known
    assert fake.evaluated == 13 + 1 and np.array_equal(out["b"], fake.logits_for([2, 8]))
    with pytest.raises(RuntimeError, match="release"):
        fake.next_logits_batch({"d": [2]})
    fake.release("a")
    fake.next_logits_batch({"d": [2, 3]})
    assert sorted(fake.batch_keys) == ["b", "c", "d"]
    assert fake.next_logits([2, 5, 6]) is not None and fake.cached_tokens == [2, 5, 6]  # generate() has its own


def test_providers_without_batching_run_one_at_a_time():
    class Single(FakeProvider):
        max_sequences = 1
        _forward_batch = FakeProvider.__mro__[1]._forward_batch
        _truncate_slot = FakeProvider.__mro__[1]._truncate_slot

    provider = Single()
    scheduler = BatchScheduler(provider)
    jobs = [scheduler.submit(p, Rewinder(seed=i), max_new_tokens=12, seed=i) for i, p in enumerate(PROMPTS[:3])]
    list(scheduler.run())
    for i, job in enumerate(jobs):
        assert job.tokens == single(PROMPTS[i], Rewinder(seed=i), max_new_tokens=12, seed=i)
