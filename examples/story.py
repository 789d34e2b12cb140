"""Ask the embedded instruct model (SmolLM2 135M Instruct) for a short story while AntiSlop bans a
list of overused phrases and RepetitionStrategy cuts loops. Every rewind is shown where it happened,
struck out, and a summary line ends the output. The same seed gives the same story (default 1).

The story streams a sentence at a time: when the token limit comes in the middle of a sentence, the
story ends at the last full sentence, and a line before the summary says how many tokens were left out.

    .venv/bin/python examples/story.py ["Write a story about ..."] [--max-new-tokens N] [--seed N] [--ban PHRASE]
"""

import argparse
import ast
import re
import sys

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, ChainStrategy
from backtrack_sampler.provider.chat import chat_prompt_tokens
from backtrack_sampler.provider.models import load_provider
from backtrack_sampler.strategy.repetition_strategy import RepetitionStrategy
from backtrack_sampler.strategy.slop_phrases import SLOP_PHRASES

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument(
    "request", nargs="?", default="Write a short story about a lighthouse keeper who finds a message in a bottle."
)
parser.add_argument("--max-new-tokens", type=int, default=300)
parser.add_argument("--seed", type=int, default=1, help="(default: 1)")
parser.add_argument("--ban", action="append", default=[], metavar="PHRASE", help="ban this phrase too (repeatable)")
parser.add_argument("--model", default="smollm2-135m-instruct", help="an embedded model's name or a .gguf file")
parser.add_argument(
    "--threads", type=int, default=1, help="llama.cpp threads (default: 1, the fastest on a busy machine)"
)
args = parser.parse_args()

provider = load_provider("llamacpp", args.model, threads=args.threads)
kept = []  # matches AntiSlop had to keep (every alternative at that position was exhausted), loops kept
antislop = AntiSlopStrategy(
    provider, list(SLOP_PHRASES) + args.ban, on_accept=lambda position, reason: kept.append(reason)
)
repetition = RepetitionStrategy(provider, on_accept=lambda position, reason: kept.append(reason))
sampler = BacktrackSampler(provider, ChainStrategy([antislop, repetition]))
prompt = chat_prompt_tokens(provider, [{"role": "user", "content": args.request}])
strike = (lambda text: f"\x1b[9;31m{text}\x1b[0m") if sys.stdout.isatty() else (lambda text: f"[-{text}-]")

# The sampler streams only final tokens; a rewind event (at `position`) arrives while the text
# before it may still be held back. So rewinds wait here until the text reaches their position, then
# are shown at that place in the text (a character offset).
tokens, text, printed = [], "", 0
pending, strikes = [], []  # rewinds not reached yet; (character offset, rewound text) to show
# a sentence ends at . ! ? or an ellipsis, with any closing quotes or brackets after it
SENTENCE_END = re.compile(r"""(?:[.!?\u2026])['"\u2019\u201d)\]]*""")


def on_rewind(event):
    global pending  # a rewind to an earlier position discards the later rewinds' context
    pending = [e for e in pending if e.position <= event.position] + [event]


def reach_rewinds():
    while pending and pending[0].position <= len(tokens):
        event = pending.pop(0)
        strikes.append((len(provider.decode(tokens[: event.position]).rstrip("\ufffd")), event.text))


def show(upto):
    """Print the text up to character `upto`, with the rewinds that happened before it."""
    global printed
    while strikes and strikes[0][0] <= upto:
        offset, gone = strikes.pop(0)
        print(text[printed:offset] + strike(gone), end="")
        printed = offset
    print(text[printed:upto], end="", flush=True)
    printed = upto


def sentence_ends(start, at_end=False):
    """Where the sentences that end after `start` end (followed by a space, or by the end of the text)."""
    return [
        m.end()
        for m in SENTENCE_END.finditer(text, start)
        if m.end() < len(text) and text[m.end()].isspace() or at_end and m.end() == len(text)
    ]


print(f"> {args.request}\n")
for token in sampler.generate(
    prompt, max_new_tokens=args.max_new_tokens, temperature=0.8, min_p=0.05, seed=args.seed, on_rewind=on_rewind
):
    reach_rewinds()
    tokens.append(token)
    decoded = provider.decode(tokens)
    if not decoded.endswith("\ufffd"):  # a character split across tokens: wait for the rest
        text = decoded
        ends = sentence_ends(printed)
        if ends:  # what follows the last sentence end waits: the limit may cut it off
            show(ends[-1])
reach_rewinds()
text = provider.decode(tokens)
left_out, end = 0, len(text.rstrip())
ends = sentence_ends(0, at_end=True)
if sampler.stats.finish_reason == "length" and ends:
    end = ends[-1]  # the limit may have come mid-sentence: the story ends at its last full sentence
    if text[end:].strip():
        left_out = next(n for n in range(len(tokens) + 1) if len(provider.decode(tokens[: len(tokens) - n])) <= end)
        strikes[:] = [(offset, gone) for offset, gone in strikes if offset < end]  # rewinds in what is left out
show(end)  # with the rewinds at the very end

stats = sampler.stats
# rewind reasons: "AntiSlopStrategy: phrase 'a lone'", "RepetitionStrategy: repeat: loop '-h' x10" ("; " between two)
reasons = " ".join(e.reason or "" for e in stats.events)
quoted = re.findall(r"AntiSlopStrategy: phrase ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")", reasons)
avoided = sorted({ast.literal_eval(phrase).strip() for phrase in quoted})
repeats = reasons.count("RepetitionStrategy: repeat: ")
phrases = f"{len(avoided)} banned phrase{'s' * (len(avoided) != 1)} ({', '.join(avoided) or 'none came up'})"
cut = f"{repeats} repeat{'s' * (repeats != 1)} cut" if repeats else "no repeat"
kept_note = f"{len(kept)} kept for want of an alternative; " if kept else ""
if left_out:
    print(
        f"\n\n[stopped at the {args.max_new_tokens}-token limit in the middle of a sentence: "
        f"that sentence ({left_out} token{'s' * (left_out != 1)}) is left out]",
        end="",
    )
print(
    ("\n" if left_out else "\n\n") + f"[avoided {phrases} in {stats.rewinds} rewinds; {cut}; {kept_note}"
    f"{stats.delivered} tokens at {stats.tokens_per_second:.1f} tokens/s]"
)
