"""Ask the embedded instruct model (SmolLM2 135M Instruct) for a short story while AntiSlop bans a
list of overused phrases and RepetitionStrategy cuts loops. Every rewind is shown where it happened,
struck out, and a summary line ends the output. The same seed gives the same story (default 1).

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
# before it may still be held back. So rewinds wait here until the text reaches their position.
tokens, shown, pending = [], "", []


def on_rewind(event):
    global pending  # a rewind to an earlier position discards the later rewinds' context
    pending = [e for e in pending if e.position <= event.position] + [event]


def show_rewinds():
    while pending and pending[0].position <= len(tokens):
        event = pending.pop(0)
        print(strike(event.text), end="", flush=True)


print(f"> {args.request}\n")
for token in sampler.generate(
    prompt, max_new_tokens=args.max_new_tokens, temperature=0.8, min_p=0.05, seed=args.seed, on_rewind=on_rewind
):
    show_rewinds()
    tokens.append(token)
    text = provider.decode(tokens)
    if not text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
        print(text[len(shown) :], end="", flush=True)
        shown = text
print(provider.decode(tokens)[len(shown) :], end="")
show_rewinds()

stats = sampler.stats
# rewind reasons: "AntiSlopStrategy: phrase 'a lone'", "RepetitionStrategy: repeat: loop '-h' x10" ("; " between two)
reasons = " ".join(e.reason or "" for e in stats.events)
quoted = re.findall(r"AntiSlopStrategy: phrase ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")", reasons)
avoided = sorted({ast.literal_eval(phrase).strip() for phrase in quoted})
repeats = reasons.count("RepetitionStrategy: repeat: ")
phrases = f"{len(avoided)} banned phrase{'s' * (len(avoided) != 1)} ({', '.join(avoided) or 'none came up'})"
cut = f"{repeats} repeat{'s' * (repeats != 1)} cut" if repeats else "no repeat"
kept_note = f"{len(kept)} kept for want of an alternative; " if kept else ""
print(
    f"\n\n[avoided {phrases} in {stats.rewinds} rewinds; {cut}; {kept_note}"
    f"{stats.delivered} tokens at {stats.tokens_per_second:.1f} tokens/s]"
)
