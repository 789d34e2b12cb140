"""Provider correctness on the real embedded model (Gemma 3 270M), on both backends.

After any sequence of extensions and rewinds, the next-token logits must be those of a fresh
forward pass over the same tokens, including rewinds that cross Gemma 3's 512-token window.
"""

import numpy as np
import pytest

from backtrack_sampler import BacktrackSampler, BaseStrategy

pytestmark = pytest.mark.model

ANIMALS = ["fox", "owl", "bear", "heron", "otter", "lynx", "crow", "hare"]
TEXT = " ".join(
    f"On day {i} the {ANIMALS[i % 8]} walked {i * 7 % 13} miles to the {ANIMALS[(i * 3) % 8]}'s den." for i in range(60)
)
CHECKPOINTS = [130, 300, 515, 600, 640]
# (at this length, rewind to that length): crossing back over the 512-token window and forth again
REWINDS = {300: 200, 560: 450, 620: 600}


def _walk(provider, tokens, rewinds):
    """Feed ``tokens`` one at a time (so every position is computed the same way), rewinding as
    scheduled; return the logits seen at each checkpoint the last time it was reached."""
    provider.reset()
    seen, length, done = {}, 1, set()
    while length <= len(tokens):
        logits = provider.next_logits(tokens[:length])
        if length in CHECKPOINTS:
            seen[length] = logits
        if length in rewinds and length not in done:
            done.add(length)
            length = rewinds[length]
        else:
            length += 1
    return seen


@pytest.fixture(scope="module")
def tokens(llama_provider):
    ids = llama_provider.encode(TEXT)
    assert len(ids) >= CHECKPOINTS[-1], len(ids)
    return ids[: CHECKPOINTS[-1]]


def _tolerance(provider):
    # llama.cpp's quantized kernels differ slightly with the batch size (seen: up to ~1.3 on logits
    # of magnitude ~25 between one batch and token-by-token); transformers runs in float32.
    return 2.0 if type(provider).__name__ == "LlamacppProvider" else 2e-3


def test_logits_after_rewinds_equal_fresh_pass(provider, tokens):
    reference = _walk(provider, tokens, {})
    rewound = _walk(provider, tokens, REWINDS)
    for length in CHECKPOINTS:
        diff = np.abs(reference[length] - rewound[length]).max()
        assert diff < 1e-3, (length, diff)
        assert reference[length].argmax() == rewound[length].argmax()
    provider.reset()
    fresh = provider.next_logits(tokens)  # the whole sequence in one batch
    assert fresh.argmax() == rewound[CHECKPOINTS[-1]].argmax()
    assert np.abs(fresh - rewound[CHECKPOINTS[-1]]).max() < _tolerance(provider)


def test_crop_cache_and_prefix_reuse(provider, tokens):
    provider.reset()
    full = provider.next_logits(tokens[:200])
    provider.crop_cache(50)
    assert provider.cached_tokens == tokens[:150]
    again = provider.next_logits(tokens[:200])
    assert np.abs(full - again).max() < _tolerance(provider)
    assert full.argmax() == again.argmax()
    with pytest.raises(ValueError):
        provider.crop_cache(-1)


def test_logits_shape_and_dtype(provider, tokens):
    logits = provider.next_logits(tokens[:10])
    assert logits.shape == (provider.vocab_size,) == (262144,)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()


def test_backends_agree(llama_provider, transformers_provider, tokens):
    """The same GGUF through both backends: the same tokens, end markers and greedy choice."""
    assert llama_provider.eos_token_ids == transformers_provider.eos_token_ids == {1, 106}
    ids = tokens[:40]
    llama_provider.reset()
    a = llama_provider.next_logits(ids)
    b = transformers_provider.next_logits(ids)
    assert a.argmax() == b.argmax()
    assert llama_provider.encode("Hello world") == transformers_provider.encode("Hello world")
    assert llama_provider.decode(ids) == transformers_provider.decode(ids)


def test_greedy_generation_is_deterministic_and_terminates(provider):
    sampler = BacktrackSampler(provider, BaseStrategy())
    first = list(sampler.generate("Once upon a time", max_new_tokens=25, temperature=0))
    second = list(sampler.generate("Once upon a time", max_new_tokens=25, temperature=0))
    assert first == second and len(first) == 25
    assert sampler.stats.finish_reason == "length"
    text = "".join(sampler.generate_text("Once upon a time", max_new_tokens=25, temperature=0))
    assert text == provider.decode(first) and text.strip()


def test_llamacpp_pruned_sliding_window_falls_back_to_a_full_evaluation(llama_provider):
    """With swa_full=False llama.cpp forgets keys outside the window; a rewind past them must
    re-evaluate instead of silently returning wrong logits (which is what happens without the check)."""
    import llama_cpp

    from backtrack_sampler.provider.llamacpp_provider import LlamacppProvider
    from backtrack_sampler.provider.models import load_llamacpp

    def pruned_provider():
        with pytest.warns(UserWarning, match="swa_full"):
            return LlamacppProvider(load_llamacpp(n_ctx=2048, swa_full=False, n_batch=64, n_ubatch=64), None, "cpu")

    tokens = llama_provider.encode(TEXT)[:1000]
    fresh = pruned_provider()
    fresh.next_logits(tokens[:200])
    expected = fresh.next_logits(tokens)

    results = {}
    for check in (True, False):
        provider = pruned_provider()
        provider._swa_pruned = check  # False: what a provider without the check would do
        provider.next_logits(tokens)
        assert llama_cpp.llama_memory_seq_pos_min(llama_cpp.llama_get_memory(provider.llm.ctx), 0) > 200  # pruned
        provider.next_logits(tokens[:200])  # back past the window: the cache cannot serve this
        results[check] = np.abs(provider.next_logits(tokens) - expected).max()
    assert results[True] < 1e-3, results
    assert results[False] > 0.1, results  # the test would catch a provider that trusts the cache


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu"])
def test_unknown_device_is_a_clear_error(llm, hf_model, device):
    from backtrack_sampler.provider.llamacpp_provider import LlamacppProvider
    from backtrack_sampler.provider.transformers_provider import TransformersProvider

    with pytest.raises(ValueError, match="unknown device"):
        LlamacppProvider(llm, None, device)
    with pytest.raises(ValueError, match="unknown device"):
        TransformersProvider(*hf_model, device)


def test_prompt_longer_than_context_is_a_clear_error(llama_provider):
    sampler = BacktrackSampler(llama_provider, BaseStrategy())
    too_long = [2] + [496] * llama_provider.context_length
    with pytest.raises(ValueError, match="context"):
        next(sampler.generate(too_long, max_new_tokens=5))


CHAT = "<start_of_turn>user\nWrite a haiku.<end_of_turn>\n<start_of_turn>model\n"


def test_text_that_starts_with_bos_gets_one_bos(provider):
    bos = provider.encode("Hi")[0]
    plain = provider.encode(CHAT)
    assert plain[0] == bos and plain[1] != bos
    assert provider.encode("<bos>" + CHAT) == plain  # a rendered chat template already holds BOS: not [bos, bos, ...]
    assert provider.encode("<bos>" + CHAT, add_special_tokens=False) == plain
    sampler = BacktrackSampler(provider, BaseStrategy())
    list(sampler.generate("<bos>" + CHAT, max_new_tokens=1, temperature=0))
    assert provider.cached_tokens[: len(plain)] == plain


def test_llamacpp_notices_a_direct_evaluation_of_the_same_length(llama_provider, llm):
    first = llama_provider.encode("The capital of France is Paris. The capital of Italy is")
    other = llama_provider.encode("My favourite animals are cats, dogs, owls and small brown foxes in the")
    other = (other * 2)[: len(first)]
    assert len(other) == len(first) and other != first
    llama_provider.reset()
    llama_provider.next_logits(first)
    expected = llama_provider.next_logits(first + [first[-1]])
    llama_provider.reset()
    llama_provider.next_logits(first)
    llm.n_tokens = 0  # use the Llama directly: a different sequence of the same length
    llm.eval(other)
    assert llm.n_tokens == len(first)
    got = llama_provider.next_logits(first + [first[-1]])
    assert np.abs(got - expected).max() < _tolerance(llama_provider) and got.argmax() == expected.argmax()
    assert llama_provider.cached_tokens == first + [first[-1]]
    llama_provider.reset()


def test_batch_of_one_after_generate_sees_only_its_own_tokens(provider, tokens):
    """With one slot, generate_batch and generate use the same backend cache: a batch sequence
    that starts after a generation keeps only the prefix it shares with that generation's tokens
    (the prompt cache), never the rest."""
    prompt = tokens[:12]
    provider.reset()
    fresh = provider.next_logits(prompt)
    provider.next_logits(tokens[:30] + tokens[5:15])  # another sequence now fills the cache
    assert provider.claim(prompt, key="job") == 12
    got = provider.next_logits_batch({"job": prompt})["job"]
    provider.release("job")
    assert np.abs(got - fresh).max() < _tolerance(provider) and got.argmax() == fresh.argmax()
    assert provider.next_logits(tokens[:40]).shape == fresh.shape and provider.cached_tokens == tokens[:40]
    provider.reset()
