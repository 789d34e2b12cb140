"""Structured-output benchmark: JSON objects from the embedded chat model, plain masking vs dead-end
rewinds and budget-aware closing (GrammarStrategy's default).

Cases: 10 schemas with tight limits (maxItems, maxLength, enums, nested objects, arrays of objects,
numbers with ranges, patterns; most strings unbounded, as a schema usually has them) x 2 subjects x
5 seeds = 100 prompts ("Invent ... Reply in JSON with <keys>."), SmolLM2 135M Instruct (llama.cpp),
temperature 1 and top-k 50 (the server's defaults), each with a token limit of 1.5 to 2 times a
typical answer. Settings, on the same cases:

- masking: ``GrammarStrategy(dead_ends=False, close_at_limit=False)``: the mask alone, as llguidance,
  xgrammar, Outlines and vLLM do it;
- rewinds: ``GrammarStrategy(...)`` with its defaults: dead-end rewinds and budget-aware closing.

For each: finished valid within the budget (the whole output is JSON valid for the schema), finish
reasons, tokens per object (delivered), rewinds per object, speed (delivered tokens per second of
the setting's batches: 10 generations at a time through the batch scheduler, prompts included) and
its ratio to masking, and the distortion measure: the mean log-probability per token of the output
under the unconstrained model (temperature 1, before any mask; higher is more natural). The
settings take turns batch by batch, so a busy machine slows them alike.

    .venv/bin/python bench/json_bench.py            # 100 cases, 10 at a time (continuous batching)
    .venv/bin/python bench/json_bench.py --quick    # 10 schemas x 1 subject x 2 seeds
    .venv/bin/python bench/json_bench.py --bans     # + a third setting: rewinds + the slop list as hard bans

The slop list (``--bans``) is read from ../shared/data/antislop (beside the repository), never copied;
without it a small built-in list is used, and the output says so.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "antislop" / "slop_phrase_prob_adjustments.json"

from backtrack_sampler import AntiSlopStrategy, BaseStrategy, ChainStrategy  # noqa: E402
from backtrack_sampler.core.batch import BatchScheduler  # noqa: E402
from backtrack_sampler.provider.chat import chat_prompt_tokens  # noqa: E402
from backtrack_sampler.provider.models import load_provider  # noqa: E402
from backtrack_sampler.strategy.grammar_strategy import GrammarStrategy  # noqa: E402
from backtrack_sampler.strategy.sampling import log_partition  # noqa: E402

FALLBACK_BANS = ["delve", "tapestry", "testament to", "symphony", "whisper", "realm", "vibrant", "bustling"]


def obj(required: bool = True, **properties: Any) -> Dict[str, Any]:
    """A closed object schema whose properties are all required."""
    schema: Dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(properties)
    return schema


def text(max_length: int, **extra: Any) -> Dict[str, Any]:
    return {"type": "string", "maxLength": max_length, **extra}


def integer(low: int, high: int) -> Dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high}


def items(schema: Dict[str, Any], max_items: int) -> Dict[str, Any]:
    return {"type": "array", "items": schema, "maxItems": max_items}


STRING = {"type": "string"}

# name -> (schema, what the prompt asks for, the keys it names, token limit)
SCHEMAS: Dict[str, Tuple[Dict[str, Any], List[str], str, int]] = {
    "person": (
        obj(name=STRING, age=integer(0, 120), hobbies=items(STRING, 3)),
        ["a fictional person", "a retired sailor", "a young painter"],
        "name, age and hobbies",
        80,
    ),
    "book": (
        obj(
            title=text(40),
            author=STRING,
            year=integer(1500, 2030),
            genre={"enum": ["fiction", "non-fiction", "poetry", "drama"]},
        ),
        ["a mystery novel", "a book of poems about the sea", "a history book"],
        "title, author, year and genre",
        70,
    ),
    "product": (
        obj(
            name=STRING,
            price={"type": "number", "minimum": 0, "maximum": 5000},
            in_stock={"type": "boolean"},
            tags=items(text(15), 3),
        ),
        ["a pair of running shoes", "a coffee machine", "a board game"],
        "name, price, in_stock and tags",
        80,
    ),
    "event": (
        obj(
            title=STRING,
            date={"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
            city=STRING,
            attendees=integer(1, 100000),
        ),
        ["a music festival", "a science conference", "a marathon"],
        "title, date, city and attendees",
        70,
    ),
    "review": (
        obj(rating=integer(1, 5), summary=text(120), pros=items(STRING, 2), cons=items(STRING, 2)),
        ["a restaurant", "a smartphone", "a hotel"],
        "rating, summary, pros and cons",
        110,
    ),
    "company": (
        obj(
            name=STRING,
            employees=integer(1, 1000000),
            address=obj(street=STRING, city=STRING, zip={"type": "string", "pattern": "^[0-9]{5}$"}),
        ),
        ["a bakery", "a software startup", "a shipping company"],
        "name, employees and address (street, city, zip)",
        80,
    ),
    "recipe": (
        obj(
            name=STRING,
            servings=integer(1, 12),
            vegetarian={"type": "boolean"},
            ingredients=items(obj(item=STRING, grams=integer(1, 1000)), 3),
        ),
        ["a pancake recipe", "a soup recipe", "a salad recipe"],
        "name, servings, vegetarian and ingredients (item, grams)",
        100,
    ),
    "movie": (
        obj(
            title=STRING,
            year=integer(1900, 2030),
            rating={"type": "number", "minimum": 0, "maximum": 10},
            genres=items({"enum": ["action", "comedy", "drama", "horror", "sci-fi", "romance"]}, 2),
        ),
        ["a space adventure film", "a romantic comedy", "a horror movie"],
        "title, year, rating and genres",
        70,
    ),
    "weather": (
        obj(
            city=STRING,
            temperature_c={"type": "number", "minimum": -50, "maximum": 60},
            condition={"enum": ["sunny", "cloudy", "rain", "snow", "storm"]},
            humidity=integer(0, 100),
        ),
        ["a weather report for a winter day", "a weather report for a summer day", "a weather report for a storm"],
        "city, temperature_c, condition and humidity",
        60,
    ),
    "team": (
        obj(name=STRING, members=items(obj(name=text(20), role={"enum": ["lead", "dev", "design", "qa"]}), 3)),
        ["a small game studio team", "a football team's staff", "a research group"],
        "name and members (name, role)",
        90,
    ),
}


def cases(subjects: int, seeds: List[int]) -> List[Tuple[str, str, int]]:
    """``(schema name, prompt, seed)`` for each schema, subject and seed."""
    rows = []
    for name, (_, about, keys, _limit) in SCHEMAS.items():
        for subject in about[:subjects]:
            for seed in seeds:
                rows.append((name, f"Invent {subject}. Reply in JSON with {keys}.", seed))
    return rows


def valid(value: Any, schema: Dict[str, Any]) -> bool:
    """``value`` against the JSON Schema keywords the schemas above use (type, properties, required,
    additionalProperties, enum, minimum, maximum, maxLength, pattern, items, maxItems)."""
    if "enum" in schema and value not in schema["enum"]:
        return False
    kind = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    }
    if kind and not checks[kind](value):
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", float("-inf")) or value > schema.get("maximum", float("inf")):
            return False
    if isinstance(value, str):
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 10**9):
            return False
        if "pattern" in schema and not re.search(schema["pattern"], value):
            return False
    if isinstance(value, list):
        return len(value) <= schema.get("maxItems", 10**9) and all(valid(v, schema.get("items", {})) for v in value)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        if any(key not in value for key in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and any(key not in properties for key in value):
            return False
        return all(valid(v, properties.get(k, {})) for k, v in value.items())
    return True


def is_valid(output: str, schema: Dict[str, Any]) -> bool:
    try:
        return valid(json.loads(output), schema)
    except json.JSONDecodeError:
        return False


class ModelLogprobs(BaseStrategy):
    """First in a chain: the log-probability of each kept token under the model itself (its raw
    logits at temperature 1, before any other strategy's edit), forgotten on a rewind."""

    reads_probs = False
    edits_logits = False

    def __init__(self) -> None:
        self.logprobs: List[float] = []
        self._last: Optional[np.ndarray] = None

    def reset(self) -> None:
        self._last = None  # the values stay readable after the generation (reset comes at its end too)

    def on_start(self, limit: int) -> None:
        self.logprobs = []

    def on_logits(self, logits: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        self._last = logits - np.float32(log_partition(logits)[0])
        return logits

    def on_next_token(self, continuation_tokens: List[int], probs: Optional[np.ndarray]) -> None:
        del self.logprobs[len(continuation_tokens) - 1 :]
        last = self._last
        self.logprobs.append(float(last[continuation_tokens[-1]]) if last is not None else float("nan"))

    def on_rewind(self, position: int) -> None:
        del self.logprobs[position:]


def read_bans() -> tuple:
    if DATA.is_file():
        return [phrase for phrase, _ in json.loads(DATA.read_text())], f"the 517-phrase list ({DATA.name})"
    return FALLBACK_BANS, f"NOTE: {DATA} is absent: a built-in list of {len(FALLBACK_BANS)} phrases is used"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 schemas x 1 subject x 2 seeds")
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=10, help="generations batched together")
    parser.add_argument("--bans", action="store_true", help="a third setting: rewinds with the slop list as hard bans")
    parser.add_argument("--backend", default="llamacpp", choices=("llamacpp", "transformers"))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--verbose", action="store_true", help="print every output")
    args = parser.parse_args()
    subjects, seeds = (1, 2) if args.quick else (args.subjects, args.seeds)
    rows = cases(subjects, list(range(seeds)))
    provider = load_provider(
        args.backend, args.model, 2048 if args.backend == "llamacpp" else None, args.threads, slots=args.parallel
    )
    started = time.perf_counter()
    GrammarStrategy(provider, json_schema=SCHEMAS["person"][0])  # the tokenizer and the closing ranks, once
    print(
        f"model: {args.model} ({args.backend}); {len(rows)} cases ({len(SCHEMAS)} schemas x {subjects} subjects x "
        f"{seeds} seeds), temperature {args.temperature}, top_k 50, {args.parallel} batched; "
        f"setup {time.perf_counter() - started:.1f} s"
    )
    settings = {
        "masking": lambda schema: GrammarStrategy(provider, json_schema=schema, dead_ends=False, close_at_limit=False),
        "rewinds": lambda schema: GrammarStrategy(provider, json_schema=schema),
    }
    if args.bans:
        bans, note = read_bans()
        print(f"bans: {note}")
        settings["rewinds + bans"] = lambda schema: ChainStrategy(
            [AntiSlopStrategy(provider, bans), GrammarStrategy(provider, json_schema=schema)]
        )
    keys = ("valid", "stop", "length", "constraint", "delivered", "seconds", "rewinds", "rewound", "logprob", "scored")
    totals: Dict[str, Dict[str, float]] = {name: dict.fromkeys(keys, 0.0) for name in settings}
    prompts = {prompt: chat_prompt_tokens(provider, [{"role": "user", "content": prompt}]) for _, prompt, _ in rows}
    for first in range(0, len(rows), args.parallel):
        chunk = rows[first : first + args.parallel]
        for name, make in settings.items():  # the settings take turns, chunk by chunk
            scheduler = BatchScheduler(provider, parallel=len(chunk))
            jobs = []
            for schema_name, prompt, seed in chunk:
                schema, _, _, limit = SCHEMAS[schema_name]
                scorer = ModelLogprobs()
                job = scheduler.submit(
                    prompts[prompt],
                    ChainStrategy([scorer, make(schema)]),
                    max_new_tokens=limit,
                    temperature=args.temperature,
                    top_k=50,
                    seed=seed,
                )
                jobs.append((job, scorer, schema))
            clock = time.perf_counter()
            for _ in scheduler.run():
                pass
            total = totals[name]
            total["seconds"] += time.perf_counter() - clock
            for i, (job, scorer, schema) in enumerate(jobs):
                stats, output = job.stats, provider.decode(job.tokens)
                ok = is_valid(output.strip(), schema)
                total["valid"] += ok
                total[stats.finish_reason or "length"] += 1
                total["delivered"] += stats.delivered
                total["rewinds"] += stats.rewinds
                total["rewound"] += stats.rewound
                scores = [v for v in scorer.logprobs[: len(job.tokens)] if np.isfinite(v)]
                total["logprob"] += sum(scores)
                total["scored"] += len(scores)
                schema_name, _, seed = chunk[i]
                print(
                    f"  {first + i + 1:3d} {schema_name:8} seed {seed} {name:8} {'valid' if ok else 'INVALID':7} "
                    f"{stats.finish_reason:6} {stats.delivered:3d}t {stats.rewinds} rewinds"
                    + (f"  {output!r}" if args.verbose else ""),
                    flush=True,
                )

    count = len(rows)
    base = totals["masking"]["delivered"] / totals["masking"]["seconds"]
    print(f"\n== {count} cases: plain masking vs dead-end rewinds ==")
    print(
        f"{'setting':14} {'valid':>9} {'stop':>5} {'length':>6} {'constr.':>7} {'tokens/obj':>10} "
        f"{'rewinds/obj':>11} {'rewound':>7} {'tok/s':>6} {'vs masking':>10} {'logprob/token':>13}"
    )
    for name, total in totals.items():
        speed = total["delivered"] / total["seconds"]
        print(
            f"{name:14} {int(total['valid']):4d}/{count:<4d} {int(total['stop']):5d} {int(total['length']):6d} "
            f"{int(total['constraint']):7d} {total['delivered'] / count:10.1f} {total['rewinds'] / count:11.2f} "
            f"{int(total['rewound']):7d} {speed:6.1f} {speed / base:10.2f} "
            f"{total['logprob'] / max(total['scored'], 1):13.3f}"
        )
    print(
        "valid: the whole output is JSON valid for its schema, within its token limit; tok/s: delivered tokens per "
        "second of each setting's batches (prompts included); logprob/token: the mean log-probability of the "
        "output's tokens under the unconstrained model (higher: more natural)"
    )


if __name__ == "__main__":
    main()
