"""Reasoning scopes (``strategy/scope.py``): a fake reasoning model whose script writes a reasoning
block then an answer, strategies scoped to either side, rewinds that cross the boundary."""

import re

import numpy as np
import pytest

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, BaseStrategy, ChainStrategy
from backtrack_sampler.provider.fake_provider import DEFAULT_VOCAB, FakeProvider
from backtrack_sampler.strategy.scope import (
    ReasoningTracker,
    ScopedStrategy,
    prompt_opens_reasoning,
    single_token_markers,
)

VOCAB = DEFAULT_VOCAB + ["<think>", "</think>", "[THINK", "[/THINK", "]"]


def scripted(script, fallback=" dog"):
    """A provider that writes ``script`` (text, tokenized by the fake vocabulary) after its prompt
    (the BOS), then EOS; the next best token is always ``fallback``."""
    provider = FakeProvider(VOCAB)
    ids = provider.encode(script, add_special_tokens=False) + [provider.get_eos_token_id()]

    def logits(tokens):
        out = np.zeros(len(VOCAB), dtype=np.float32)
        out[provider.ids[fallback]] = 5
        out[ids[min(len(tokens) - 1, len(ids) - 1)]] = 10
        return out

    provider.logits_fn = logits
    return provider


def run(provider, strategy, **kwargs):
    sampler = BacktrackSampler(provider, strategy)
    out = list(sampler.generate("<bos>", max_new_tokens=40, temperature=0, **kwargs))
    return "".join(VOCAB[t] for t in out if t != provider.get_eos_token_id()), sampler.stats


def test_the_tracker_finds_markers_by_id_and_by_text_and_reopens_on_rewind():
    provider = FakeProvider(VOCAB)
    tracker = ReasoningTracker(provider)
    tokens = provider.encode(" the<think> cat sat</think> dog", add_special_tokens=False)
    tracker.update(tokens)  # <think> decodes to nothing here: found by its id
    assert [tracker.in_reasoning(i) for i in range(len(tokens))] == [False, True, True, True, True, False]
    assert tracker.inside(len(tokens)) is False
    tracker.rewind(4)  # back before </think>: the reasoning is open again
    assert tracker.inside(4) is True
    tracker.update(tokens[:4] + provider.encode(" rug", add_special_tokens=False))
    assert tracker.in_reasoning(4) and tracker.inside(5)
    text = provider.encode("[THINK] cat[/THINK] dog[THINK]", add_special_tokens=False)  # markers of two tokens
    tracker.reset()
    tracker.update(text)  # the reasoning comes first: a marker in the answer's text is text
    assert [tracker.in_reasoning(i) for i in range(len(text))] == [False, True, True, True, True, False, False, False]
    tracker.reset()
    tracker.update(provider.encode(" a[THINK] cat", add_special_tokens=False))
    assert not tracker.inside(4)  # after answer text, "[THINK]" is text


def test_prompt_and_vocabulary_helpers():
    provider = FakeProvider(VOCAB)
    assert prompt_opens_reasoning(provider, provider.encode(" the cat<think>\n"))  # by its id
    assert prompt_opens_reasoning(provider, provider.encode(" a[THINK]\n"))  # by its text
    assert not prompt_opens_reasoning(provider, provider.encode("<think> a</think>\n"))
    assert not prompt_opens_reasoning(provider, provider.encode(" the cat"))
    assert single_token_markers(FakeProvider(VOCAB)) == [("<think>", "</think>")]
    assert ReasoningTracker(FakeProvider(VOCAB), starts_inside=True).inside(0)
    with pytest.raises(ValueError, match="scope must be one of"):
        ScopedStrategy(FakeProvider(VOCAB), BaseStrategy(), scope="thinking")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "scope, expected",
    [
        ("answer", "<think> the cat sat</think> the dog sat"),
        ("reasoning", "<think> the dog sat</think> the cat sat"),
        ("both", "<think> the dog sat</think> the dog sat"),
    ],
)
def test_a_ban_acts_only_in_its_scope(scope, expected):
    provider = scripted("<think> the cat sat</think> the cat sat")
    bans = AntiSlopStrategy(provider, [" cat"])
    text, stats = run(provider, ScopedStrategy(provider, bans, scope=scope))
    assert text == expected
    assert stats.rewinds == expected.count(" dog")


class OnlyDog(BaseStrategy):
    """A mask (as a grammar's): only " dog" or EOS; records what it was shown."""

    def __init__(self, provider):
        self.provider, self.seen = provider, []

    def on_logits(self, logits, continuation_tokens):
        self.seen.append(list(continuation_tokens))
        allowed = [self.provider.ids[" dog"], self.provider.get_eos_token_id()]
        masked = np.full_like(logits, -np.inf)
        masked[allowed] = logits[allowed]
        return masked


def test_a_mask_on_the_answer_lets_the_model_open_its_reasoning_first():
    provider = scripted("<think> the cat</think> the cat")
    mask = OnlyDog(provider)
    text, _ = run(provider, ScopedStrategy(provider, mask, scope="answer"))
    assert text == "<think> the cat</think> dog dog"  # the reasoning is free, the answer masked
    assert mask.seen[0] == [] and all(VOCAB[t] == " dog" for seen in mask.seen for t in seen)
    plain, _ = run(provider, OnlyDog(provider))
    assert plain == " dog" * 6  # unscoped, the mask forbids the reasoning too


def test_starts_in_reasoning_and_a_rewind_across_the_boundary():
    """The prompt opened the block; a ban on the whole text rewinds from the answer into the
    reasoning (it re-opens), and the strategy on the answer is told its tokens are gone."""
    provider = scripted(" the cat</think> the rug")
    answer = AntiSlopStrategy(provider, [" rug"])
    across = AntiSlopStrategy(provider, ["cat the"])  # "</think>" decodes to nothing: "cat the" spans it
    chain = ChainStrategy(
        [ScopedStrategy(provider, across, "both"), ScopedStrategy(provider, answer, "answer", None, True)]
    )
    text, stats = run(provider, chain)
    assert text == " the dog</think> the dog" and stats.rewinds == 2  # " cat" rewound: back in the reasoning
    scoped = chain.strategies[1]
    assert isinstance(scoped, ScopedStrategy) and scoped.tracker.starts_inside


def test_the_command_line_scopes_strategies_by_name():
    from backtrack_sampler import cli
    from backtrack_sampler.errors import UsageError

    def plan(*flags):
        args = cli.build_parser().parse_args(["generate", "x", "--ban", "cat", "--json-object", *flags])
        return [(call.name, call.scope) for call in cli.strategy_plan(args)]

    assert plan() == [("antislop", None), ("grammar", None)]  # None: default_scope when built
    assert plan("--scope", "answer", "--scope", "antislop=reasoning") == [
        ("antislop", "reasoning"),
        ("grammar", "answer"),
    ]
    with pytest.raises(UsageError, match="no strategy named 'dry'"):
        plan("--scope", "dry=answer")
    with pytest.raises(UsageError, match="must be one of reasoning, answer, both"):
        plan("--scope", "sideways")


PROMPT = (
    "Question: What is 2+2?\n<think>Two plus two is four. The sum is simple.</think>\nAnswer: The answer is 4.\n\n"
    "Question: What color is the sky?\n<think>The sky looks blue. The light scatters.</think>\nAnswer: The sky is blue.\n\n"
    "Question: Where is Paris?\n<think>"
)


def sides(text):
    """(reasoning, answer) text of an output that starts inside a reasoning block: one block, the
    answer after its "</think>" (a later "<think>" in the text is answer text)."""
    reasoning, _, answer = text.partition("</think>")
    return reasoning, answer


@pytest.mark.model
def test_a_real_model_writing_think_blocks(chat_llama_provider):
    """The chat model, prompted to reason in <think> blocks (several tokens each here): bans on
    "The"/" the" scoped to each side keep it out of that side only."""
    from backtrack_sampler.strategy.scope import scoped

    provider = chat_llama_provider
    prompt = provider.encode(PROMPT)
    assert prompt_opens_reasoning(provider, prompt)
    seen = {}
    for scope in ("reasoning", "answer", "both"):
        strategy = scoped(provider, AntiSlopStrategy(provider, [" the", "The"]), scope, prompt)
        out = list(BacktrackSampler(provider, strategy).generate(prompt, max_new_tokens=40, temperature=0))
        seen[scope] = sides(provider.decode(out))
        assert "</think>" in provider.decode(out)  # both sides were written
    has_the = lambda text: bool(re.search(r"\b[Tt]he\b", text))  # noqa: E731
    assert not has_the(seen["reasoning"][0]) and has_the(seen["reasoning"][1])
    assert has_the(seen["answer"][0]) and not has_the(seen["answer"][1])
    assert not has_the(" ".join(seen["both"]))


def test_a_request_scopes_its_bans_and_strategies():
    import json

    from backtrack_sampler.server.errors import APIError
    from backtrack_sampler.server.limits import Limits
    from backtrack_sampler.server.plan import build_strategy
    from backtrack_sampler.server.schemas import CompletionRequest, parse_request

    provider = FakeProvider(VOCAB)

    def strategy(**fields):
        body = json.dumps({"prompt": "the", "banned_strings": ["cat"], **fields}).encode()
        request = parse_request(CompletionRequest, body, Limits())
        return build_strategy(provider, request, Limits(), provider.encode(" the<think>"))

    assert isinstance(strategy(), AntiSlopStrategy)  # default: bans everywhere
    scoped = strategy(ban_scope="answer", strategy=[{"name": "dry", "scope": "reasoning"}])
    assert isinstance(scoped, ChainStrategy)
    kinds = [(type(s).__name__, getattr(s, "scope", None)) for s in scoped.strategies]
    assert ("ScopedStrategy", "answer") in kinds and ("ScopedStrategy", "reasoning") in kinds
    assert all(
        s.tracker.starts_inside for s in scoped.strategies if isinstance(s, ScopedStrategy)
    )  # the prompt opened it
    with pytest.raises(APIError, match="ban_scope"):
        strategy(ban_scope="sideways")


class Recorder(BaseStrategy):
    """A hard constraint that changes nothing and records the limits it is told."""

    hard_constraint = True

    def __init__(self):
        self.limits = []

    def on_start(self, limit):
        self.limits.append(limit)


def test_a_hard_constraint_on_the_answer_is_told_its_limit_and_forbids_ending_in_the_reasoning():
    provider = scripted("<think> the cat</think> the cat")
    recorder = Recorder()
    run(provider, ScopedStrategy(provider, recorder, "answer"))
    assert recorder.limits == [40, 36]  # the generation's, then what is left when the answer begins
    provider = scripted("<think> the cat")  # ends inside its reasoning
    text, stats = run(provider, ScopedStrategy(provider, Recorder(), "answer"))
    assert text.startswith("<think> the cat dog") and stats.finish_reason == "length"
    text, stats = run(provider, ScopedStrategy(provider, AntiSlopStrategy(provider, [[" rug", 0.5]]), "answer"))
    assert text == "<think> the cat" and stats.finish_reason == "stop"  # a soft strategy lets it end


def test_the_batch_command_reads_a_block_the_prompt_opens(monkeypatch, tmp_path):
    # the prompt ends with "<think>" (a chat template that starts the model's turn reasoning): a
    # ban scoped to the answer leaves the reasoning alone, as generate and the server do
    import io
    import json

    from backtrack_sampler import cli
    from backtrack_sampler.cli import model as cli_model

    provider = scripted(" the cat sat</think> the cat sat")
    monkeypatch.setattr(cli_model, "load_provider", lambda *args, **kwargs: provider)
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    prompts.write_text(json.dumps({"id": 1, "prompt": "<bos><think>"}) + "\n")
    argv = ["batch", str(prompts), "-o", str(out), "--temperature", "0", "--max-new-tokens", "20"]
    status = cli.main(
        [*argv, "--ban", " cat", "--scope", "answer"], stdin=io.StringIO(), stdout=io.StringIO(), stderr=io.StringIO()
    )
    assert status == 0
    # the script's first token is the prompt's "<think>"; "</think>" decodes to nothing here
    assert json.loads(out.read_text())["text"] == " cat sat the dog sat"
