"""ReplaceStrategy: scripted FakeProvider tests (fast) and real-model tests (-m model)."""

import numpy as np
import pytest
from test_antislop import generate, scripted

from backtrack_sampler import BacktrackSampler, ReplaceStrategy


def test_replaces_and_keeps_the_rest_of_the_token():
    fp = scripted(" the cat sat on the mat.", extra=[" rug"])
    text, events, _ = generate(fp, ReplaceStrategy(fp, "cat", "dog"))
    assert text.startswith(" the dog sat on the mat.") and "cat" not in text
    assert events[0].position == 1 and events[0].reason == "replace 'cat' with 'dog'"


def test_replacement_containing_find_does_not_loop():
    fp = scripted(" the cat sat.", extra=[" rug"])
    text, events, _ = generate(fp, ReplaceStrategy(fp, "cat", "cat cat"))
    assert text.startswith(" the cat cat.") and len(events) == 1  # the scripted model then wants "."


def test_limits():
    fp = scripted(" the cat and the cat and the cat.", extra=[" rug"])
    text, _, _ = generate(fp, ReplaceStrategy(fp, "cat", "dog", max_replacements=2))
    assert text.count("dog") == 2 and text.count("cat") == 1
    text, _, _ = generate(fp, ReplaceStrategy(fp, "cat", "dog", max_new_tokens_for_replace=4))
    assert text.count("dog") == 1
    text, _, _ = generate(fp, ReplaceStrategy(fp, "cat", "dog", skip_tokens=4))
    assert text.count("dog") == 2 and text.startswith(" the cat")


def test_max_prob_keeps_text_the_model_is_sure_of():
    fp = scripted(" the cat sat.", extra=[" rug"])  # " cat" is sampled with probability ~0.99
    text, events, _ = generate(fp, ReplaceStrategy(fp, "cat", "dog", max_prob=0.5))
    assert "cat" in text and not events
    strategy = ReplaceStrategy(fp, "cat", "dog", max_prob=0.5)
    tokens = fp.encode(" the cat sat", add_special_tokens=False)
    kept = []
    for n, p in ((1, 0.9), (2, 0.3)):  # " cat" was sampled with probability 0.3: replaced
        probs = np.zeros(fp.vocab_size)
        probs[tokens[n - 1]] = p
        strategy.on_next_token(tokens[:n], probs)
        kept.append(strategy.backtrack(tokens[:n]))
    assert kept == [tokens[:1], tokens[:1]] and strategy.rewind_reason == "replace 'cat' with 'dog'"


def test_case_sensitive_by_default():
    fp = scripted(" the Cat sat.", extra=[" rug"])
    assert "Cat" in generate(fp, ReplaceStrategy(fp, "cat", "dog"))[0]
    assert "dog" in generate(fp, ReplaceStrategy(fp, "cat", "dog", case_sensitive=False))[0]


def test_errors():
    fp = scripted(" x")
    with pytest.raises(ValueError, match="non-empty list"):
        ReplaceStrategy(fp, [], "dog")
    with pytest.raises(ValueError, match="max_prob"):
        ReplaceStrategy(fp, "cat", "dog", max_prob=2)


@pytest.mark.model
def test_real_model_output_contains_the_replacement(provider):
    prompt = "<start_of_turn>user\nTell me about the sun.<end_of_turn>\n<start_of_turn>model\n"
    sampler = BacktrackSampler(provider, ReplaceStrategy(provider, ["sun", "Sun"], "moon"))
    text = "".join(sampler.generate_text(prompt, max_new_tokens=30, temperature=0))
    assert "moon" in text and "sun" not in text.lower(), text  # greedy: the model repeats "the sun"
    assert sampler.stats.rewinds >= 1
