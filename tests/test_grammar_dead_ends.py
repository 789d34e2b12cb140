"""GrammarStrategy's dead-end rewinds and budget-aware closing (issue 26), on a FakeProvider whose
"model" wants what the grammar refuses, through every driver; the real-model cases are in
tests/test_grammar.py (they share its server and providers)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("llguidance")

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, BaseStrategy, ChainStrategy  # noqa: E402
from backtrack_sampler.core.batch import BatchScheduler  # noqa: E402
from backtrack_sampler.provider.fake_provider import FakeProvider  # noqa: E402
from backtrack_sampler.strategy.grammar_paths import Closer, JsonTrack  # noqa: E402
from backtrack_sampler.strategy.grammar_strategy import GrammarStrategy  # noqa: E402

LETTERS = list("abcdefghijklmnopqrstuvwxyz")
VOCAB = (
    ["<pad>", "<eos>", "<bos>", '{"', "tags", '": ', '["', '",', ' "', '"]}', '"', "]", "}", "cat", "dog"]
    + ["{", "[", ":", ",", " ", "\\"]
    + LETTERS
    + list("0123456789")
)
TAGS = {
    "type": "object",
    "properties": {"tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}},
    "required": ["tags"],
    "additionalProperties": False,
}


STRUCTURE = {'{"': "tags", "tags": '": ', '": ': '["', '",': ' "'}  # what follows each piece


def model(runaway: bool = False) -> FakeProvider:
    """A model of lists of tags: it starts each tag with "dog" (or "cat", less likely), always wants
    one more tag after "dog" and closes the list after "cat". With ``maxItems: 2`` a second "dog"
    is a dead end: the grammar refuses '",' (a third tag) and closing is unlikely, so plain masking
    writes letters on inside the string. ``runaway``: it never wants to close a tag at all (a
    runaway of the model's own, which the grammar does not cause)."""
    base = FakeProvider(vocab=VOCAB)
    ids = base.ids

    def logits(tokens):
        text = base.decode(tokens[1:])  # after the prompt (one BOS token)
        values = np.full(len(VOCAB), -10.0, dtype=np.float32)
        content = text[text.rfind('"') + 1 :]  # of the string being written (the quotes are even outside)
        if not text:
            wants = {'{"': 10}
        elif text.endswith('"]}'):
            wants = {"<eos>": 10}
        elif any(text.endswith(piece) for piece in STRUCTURE):
            wants = {next(after for piece, after in STRUCTURE.items() if text.endswith(piece)): 10}
        elif text.count('"') % 2 == 0:
            wants = {}
        elif not content:
            wants = {"dog": 6, "cat": 4}
        elif content.endswith("cat") and not runaway:
            wants = {'"]}': 8, '",': 4}
        elif runaway:
            wants = dict.fromkeys(LETTERS, 6)
        else:  # after "dog" or a letter: one more tag
            wants = {'",': 8, '"]}': -5, **dict.fromkeys(LETTERS, 1)}
        for piece, value in wants.items():
            values[ids[piece]] = value
        return values

    return FakeProvider(vocab=VOCAB, logits_fn=logits)


def run(provider, strategy, **kwargs):
    sampler = BacktrackSampler(provider, strategy)
    kwargs.setdefault("max_new_tokens", 40)
    text = "".join(sampler.generate_text([2], **kwargs))
    return text, sampler.stats


def tags(text: str) -> list:
    value = json.loads(text)
    assert set(value) == {"tags"} and len(value["tags"]) <= 2
    return value["tags"]


def masking(provider, **options):
    return GrammarStrategy(provider, json_schema=TAGS, dead_ends=False, close_at_limit=False, **options)


# --- dead ends ----------------------------------------------------------------------------------------
def test_plain_masking_runs_into_the_dead_end():
    """The failure of issue 26: the second "dog" never ends (letters to the token limit, invalid JSON)."""
    provider = model()
    ended = [run(provider, masking(provider), seed=seed) for seed in range(4)]
    runaways = [text for text, stats in ended if stats.finish_reason == "length"]
    assert len(runaways) >= 3, ended
    for text in runaways:
        assert text.startswith('{"tags": ["dog", "dog') and len(text) > 40
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


def test_a_dead_end_rewinds_to_the_value_and_bans_its_first_token():
    """Where plain masking ran into the dead end (the same draws up to it), the second tag loses the
    model's probability at every letter: after three steps the text rewinds to the tag's first free
    token ("dog"; the quote before it is forced), bans it there, and "cat" follows, which closes
    the list: valid JSON, with finish_reason "stop"."""
    provider = model()
    saved = 0
    for seed in range(6):
        plain, _ = run(provider, masking(provider), seed=seed)
        text, stats = run(provider, GrammarStrategy(provider, json_schema=TAGS, close_at_limit=False), seed=seed)
        assert stats.finish_reason == "stop" and tags(text)[1] == "cat", text
        if plain.startswith('{"tags": ["dog", "dog'):
            saved += 1
            dead = [event for event in stats.events if "dead end" in (event.reason or "")]
            assert len(dead) == stats.rewinds == 1
            assert dead[0].position == 7 and dead[0].text.startswith("dog")  # {" tags ": [" dog ", ' "' | dog
            assert "refused" in dead[0].reason and "nats" in dead[0].reason
        else:
            assert text == plain and stats.rewinds == 0
    assert saved >= 3


def test_a_value_that_cannot_be_saved_is_kept_after_max_rewinds():
    """Nothing but "dog" can start a tag: each rewind bans it, the ban is dropped where it would
    leave no token, and after max_rewinds the text goes on as with plain masking (valid, as the
    closing finishes it)."""
    base = model()

    def only_dogs(tokens):
        values = base.logits_for(tokens).copy()
        values[base.ids["cat"]] = -np.inf
        return values

    provider = FakeProvider(vocab=VOCAB, logits_fn=only_dogs)
    text, stats = run(provider, GrammarStrategy(provider, json_schema=TAGS, max_rewinds=3), seed=0)
    assert stats.finish_reason == "stop" and tags(text)[0].startswith("dog"), text
    assert sum("dead end" in (event.reason or "") for event in stats.events) <= 3


def test_dead_ends_off_is_plain_masking():
    provider = model()
    for seed in range(3):
        plain = run(provider, masking(provider), seed=seed)
        off = run(
            provider, GrammarStrategy(provider, json_schema=TAGS, dead_ends=False, close_at_limit=False), seed=seed
        )
        assert plain[0] == off[0] and off[1].rewinds == 0


def test_with_bans_and_repetition_chained_first():
    """AntiSlop bans "cat" (so "dog" is the only tag), a repetition detector watches too: the output
    is valid, free of the ban, and ends."""
    from backtrack_sampler import RepetitionStrategy

    provider = model()
    for seed in range(3):
        chain = ChainStrategy(
            [
                AntiSlopStrategy(provider, ["cat"]),
                RepetitionStrategy(provider),
                GrammarStrategy(provider, json_schema=TAGS),
            ]
        )
        text, stats = run(provider, chain, seed=seed)
        assert stats.finish_reason == "stop" and "cat" not in text and tags(text), (text, stats.constraint)


# --- budget-aware closing -------------------------------------------------------------------------------
@pytest.mark.parametrize("limit", [12, 20, 40])
def test_the_text_closes_within_the_token_limit(limit):
    """A model that never ends a tag: masking is cut at the limit; closing ends valid within it."""
    provider = model(runaway=True)
    text, stats = run(provider, masking(provider), seed=0, max_new_tokens=limit)
    assert stats.finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    text, stats = run(
        provider, GrammarStrategy(provider, json_schema=TAGS, dead_ends=False), seed=0, max_new_tokens=limit
    )
    assert stats.finish_reason == "stop" and stats.delivered < limit and tags(text), text


def test_a_limit_too_short_for_any_valid_text_ends_with_length():
    provider = model(runaway=True)
    text, stats = run(provider, GrammarStrategy(provider, json_schema=TAGS), seed=0, max_new_tokens=4)
    assert stats.finish_reason == "length" and text == '{"tags": ["'


class LimitSeen(BaseStrategy):
    """Records the limit ``on_start`` gives."""

    reads_probs = False
    edits_logits = False
    limits: list = []

    def on_start(self, limit: int) -> None:
        self.limits.append(limit)


def test_every_driver_tells_the_strategy_its_token_limit():
    """``on_start(limit)``: BacktrackSampler (chained), the batch scheduler, and closing works there."""
    provider = model(runaway=True)
    LimitSeen.limits = []
    run(provider, ChainStrategy([LimitSeen(), GrammarStrategy(provider, json_schema=TAGS)]), max_new_tokens=17)
    assert LimitSeen.limits == [17]
    scheduler = BatchScheduler(provider, parallel=3)
    jobs = [
        scheduler.submit([2], GrammarStrategy(provider, json_schema=TAGS), max_new_tokens=n, seed=n)
        for n in (12, 20, 30)
    ]
    for _ in scheduler.run():
        pass
    for job in jobs:
        assert job.stats.finish_reason == "stop" and tags(provider.decode(job.tokens)), provider.decode(job.tokens)


@pytest.mark.parametrize("engine_type,n_probs", [("llama-server", len(VOCAB)), ("vllm", 4)])
def test_through_an_engine(engine_type, n_probs):
    """Through a serving engine (its K candidates): the dead end rewinds, the closing closes (with
    K = 4, '"]}' is never a candidate of the runaway: the closing takes it as a forced token)."""
    from engine_fakes import FakeEngine

    from backtrack_sampler.engine import EngineProvider

    for runaway, limit in ((False, 40), (True, 16)):
        local = model(runaway)
        engine = FakeEngine(engine_type, local.logits_for, local.vocab_size, eos=local.get_eos_token_id())
        try:
            provider = EngineProvider(engine.url, engine_type, tokenizer=local, n_probs=n_probs)
            text, stats = run(
                provider, GrammarStrategy(provider, json_schema=TAGS), seed=1, top_k=0, max_new_tokens=limit
            )
            assert stats.finish_reason == "stop" and tags(text), text
            assert runaway or tags(text) == ["dog", "cat"]
        finally:
            engine.close()


# --- the parts ------------------------------------------------------------------------------------------
def test_json_track_finds_where_values_begin():
    track = JsonTrack()
    pieces = [b'{"', b"tags", b'": ', b'["', b"dog", b'",', b' "', b'd\\"og', b"x", b'"]}']
    for piece in pieces:
        track.push(piece)
    assert track.value_start(5) == 3  # '",' continues the string '["' began
    assert track.value_start(8) == 6  # an escaped quote does not end it
    assert track.value_start(10) is None  # after '"]}'
    assert track.anchors == [0, 2, 3, 5, 6, 9]  # tokens with a quote or a bracket ("tags" is inside a key)
    track.truncate(6)
    assert len(track) == 6 and track.anchors == [0, 2, 3, 5]


def test_closer_measures_the_shortest_way_and_leaves_the_matcher_as_it_was():
    provider = model()
    strategy = GrammarStrategy(provider, json_schema=TAGS)
    tokens = [provider.ids[p] for p in ('{"', "tags", '": ', '["', "dog")]
    strategy.matcher.consume_tokens(tokens)
    closer = Closer(strategy.matcher, strategy.tokenizer, lambda: None)
    assert closer.cost(10) == 1 and provider.decode([closer.first]) == '"]}'
    assert closer.cost_after(provider.ids['",'], 10) == 2  # ' "' then '"]}': an empty third tag
    assert closer.cost_after(provider.ids["<eos>"], 10) is None  # the grammar refuses it here
    assert closer.cost(0) is None
    assert strategy.matcher.validate_tokens([provider.ids["x"]]) == 1 and not strategy.matcher.is_accepting()
