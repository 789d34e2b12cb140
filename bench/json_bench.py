"""Structured-output benchmark: JSON objects of four schemas from the embedded chat model.

20 prompts (5 per schema) ask SmolLM2 135M Instruct (llama.cpp) for a JSON object, each run three ways:

- plain: no strategy (the prompt asks for JSON and names the keys);
- schema: GrammarStrategy with the schema;
- schema + bans: AntiSlop with the 517-phrase slop list as hard bans, chained before the grammar.

For each: validity (the whole output is JSON valid for the schema), banned phrases left (a
lower-case substring search, as antislop_bench does), decoding speed (delivered tokens per second,
the prompt already in the cache, so that short and long answers are compared fairly) and its ratio
to plain, rewinds and rewound tokens, and the generations a conflict ended (finish_reason
"constraint"). Settings alternate per prompt, so a busy machine slows them alike.

    .venv/bin/python bench/json_bench.py            # 20 prompts x up to 120 tokens
    .venv/bin/python bench/json_bench.py --quick    # 4 prompts x up to 80 tokens

The slop list is read from ../shared/data/antislop (beside the repository), never copied; without
it a small built-in list is used, and the output says so.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "antislop" / "slop_phrase_prob_adjustments.json"

from backtrack_sampler import AntiSlopStrategy, BacktrackSampler, BaseStrategy, ChainStrategy  # noqa: E402
from backtrack_sampler.provider.chat import chat_prompt_tokens  # noqa: E402
from backtrack_sampler.provider.models import load_provider  # noqa: E402
from backtrack_sampler.strategy.grammar_strategy import GrammarStrategy  # noqa: E402

# names models like to write and a few slop words: only when ../shared is absent
FALLBACK_BANS = [
    "delve",
    "tapestry",
    "testament to",
    "symphony",
    "mia",
    "alex",
    "lily",
    "sarah",
    "maya",
    "elara",
    "whisper",
    "realm",
    "vibrant",
    "bustling",
]

SCHEMAS: Dict[str, Dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "city": {"type": "string", "maxLength": 40},
            "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
        },
        "required": ["name", "age", "city", "hobbies"],
        "additionalProperties": False,
    },
    "book": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 60},
            "author": {"type": "string", "maxLength": 40},
            "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
            "genre": {"enum": ["fiction", "non-fiction", "poetry", "drama"]},
        },
        "required": ["title", "author", "year", "genre"],
        "additionalProperties": False,
    },
    "product": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "price": {"type": "number", "minimum": 0},
            "in_stock": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        },
        "required": ["name", "price", "in_stock", "tags"],
        "additionalProperties": False,
    },
    "event": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 60},
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "location": {"type": "string", "maxLength": 40},
            "attendees": {"type": "integer", "minimum": 0},
        },
        "required": ["title", "date", "location", "attendees"],
        "additionalProperties": False,
    },
}
SUBJECTS = {
    "person": [
        "a fictional software engineer",
        "a retired sailor",
        "a young painter",
        "a famous chef",
        "a school teacher",
    ],
    "book": [
        "a mystery novel",
        "a book of poems about the sea",
        "a history book",
        "a science fiction novel",
        "a play about a king",
    ],
    "product": ["a pair of running shoes", "a coffee machine", "a laptop", "a garden hose", "a board game"],
    "event": ["a music festival", "a science conference", "a wedding", "a marathon", "a book fair"],
}


def prompts(count: int) -> List[tuple]:
    """``count`` (schema name, prompt) pairs, taking the schemas in turn."""
    rows = []
    for i in range(5):
        for name, subjects in SUBJECTS.items():
            keys = ", ".join(SCHEMAS[name]["properties"])
            rows.append(
                (
                    name,
                    f"Write a JSON object describing {subjects[i]}, with the keys {keys}. Answer with the JSON only.",
                )
            )
    return rows[:count]


def valid(value: Any, schema: Dict[str, Any]) -> bool:
    """``value`` against the JSON Schema keywords the schemas above use (type, properties, required,
    additionalProperties, enum, minimum, maximum, minLength, maxLength, pattern, items, maxItems)."""
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


def is_valid(text: str, schema: Dict[str, Any]) -> bool:
    try:
        return valid(json.loads(text), schema)
    except json.JSONDecodeError:
        return False


def read_bans() -> tuple:
    if DATA.is_file():
        return [phrase for phrase, _ in json.loads(DATA.read_text())], f"the 517-phrase list ({DATA.name})"
    return FALLBACK_BANS, (
        f"NOTE: {DATA} is absent: a built-in list of {len(FALLBACK_BANS)} phrases is used "
        "instead of the 517-phrase list"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 prompts x 80 tokens")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=120, help="max new tokens per answer")
    parser.add_argument("--backend", default="llamacpp", choices=("llamacpp", "transformers"))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=0.8)
    args = parser.parse_args()
    count, tokens = (4, 80) if args.quick else (args.prompts, args.tokens)
    bans, bans_note = read_bans()
    provider = load_provider(args.backend, args.model, 2048 if args.backend == "llamacpp" else None, args.threads)
    started = time.perf_counter()
    GrammarStrategy(provider, json_schema=SCHEMAS["person"])  # the tokenizer, once per model
    tokenizer_seconds = time.perf_counter() - started
    compile_ms = []
    for schema in SCHEMAS.values():
        started = time.perf_counter()
        GrammarStrategy(provider, json_schema=schema)
        compile_ms.append((time.perf_counter() - started) * 1000)
    print(
        f"model: {args.model} ({args.backend}); bans: {bans_note}; {count} prompts x up to {tokens} tokens, "
        f"temperature {args.temperature}, top_k 50"
    )
    print(
        f"llguidance tokenizer: {tokenizer_seconds:.2f} s once per model; a schema compiles in "
        f"{min(compile_ms):.1f}-{max(compile_ms):.1f} ms"
    )

    settings = {
        "plain": lambda schema: BaseStrategy(),
        "schema": lambda schema: GrammarStrategy(provider, json_schema=schema),
        "schema + bans": lambda schema: ChainStrategy(
            [AntiSlopStrategy(provider, bans), GrammarStrategy(provider, json_schema=schema)]
        ),
    }
    totals = {
        name: {
            "valid": 0,
            "hits": 0,
            "delivered": 0,
            "seconds": 0.0,
            "rewinds": 0,
            "rewound": 0,
            "constraint": 0,
            "length": 0,
        }
        for name in settings
    }
    for i, (schema_name, prompt) in enumerate(prompts(count)):
        schema = SCHEMAS[schema_name]
        prompt_tokens = chat_prompt_tokens(provider, [{"role": "user", "content": prompt}])
        line = []
        for name, make in settings.items():
            strategy = make(schema)
            provider.reset()
            provider.next_logits(prompt_tokens)  # the prompt in the cache: every setting times decoding alone
            sampler = BacktrackSampler(provider, strategy)
            out = list(
                sampler.generate(prompt_tokens, max_new_tokens=tokens, temperature=args.temperature, top_k=50, seed=i)
            )
            stats, text = sampler.stats, provider.decode(out)
            total = totals[name]
            ok = is_valid(text.strip(), schema)
            hits = sum(text.lower().count(phrase.lower()) for phrase in bans)
            total["valid"] += ok
            total["hits"] += hits
            total["delivered"] += stats.delivered
            total["seconds"] += stats.seconds
            total["rewinds"] += stats.rewinds
            total["rewound"] += stats.rewound
            total["constraint"] += stats.finish_reason == "constraint"
            total["length"] += stats.finish_reason == "length"
            line.append(f"{name}: {'valid' if ok else 'INVALID'} {hits} hits {stats.finish_reason}")
        print(f"  {i + 1:2d} {schema_name:8} " + " | ".join(line), flush=True)

    base = totals["plain"]["delivered"] / totals["plain"]["seconds"]
    print(f"\n== {count} prompts: plain vs schema vs schema + bans ==")
    print(
        f"{'setting':14} {'valid':>9} {'banned hits':>12} {'tokens':>7} {'tok/s':>7} {'vs plain':>9} "
        f"{'rewinds':>8} {'rewound':>8} {'conflicts':>10} {'length':>7}"
    )
    for name, total in totals.items():
        speed = total["delivered"] / total["seconds"]
        print(
            f"{name:14} {total['valid']:4d}/{count:<4d} {total['hits']:12d} {total['delivered']:7d} {speed:7.1f} "
            f"{speed / base:9.2f} {total['rewinds']:8d} {total['rewound']:8d} {total['constraint']:10d} "
            f"{total['length']:7d}"
        )
    print(
        "conflicts: generations that ended with finish_reason 'constraint' (bans and schema could not both hold); "
        "length: ended by the token limit"
    )


if __name__ == "__main__":
    main()
