"""Generation over a file of prompts: what ``backtrack-sampler batch`` runs.

Prompts come from a JSONL file, one JSON object a line::

    {"id": "fox-1", "prompt": "Write a story about a fox.", "temperature": 0.8, "max_tokens": 300}
    {"id": "q-2", "messages": [{"role": "user", "content": "What is a lighthouse?"}]}

``read_prompts`` checks every line (``BadLine``: its number and what is wrong) before anything
runs; ``run_batch`` generates them on one ``BatchScheduler`` (a local provider's batch of
sequences, or a serving engine's backend: the same driver) and appends one JSON line per
completion to the output, written whole and flushed as each generation ends. ``JsonlOutput``
reads what an earlier run wrote, so a rerun skips the ids already there: an interrupted run
loses only the generations that were in flight. With a trace, every rewind becomes a
preference pair (``events.TraceWriter``'s records plus the ``id``); ``preference_pair`` turns one
into TRL's DPO format.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ..core.batch import BatchJob, BatchScheduler
from ..core.events import TraceWriter
from ..core.scheduler import Update
from ..provider.base_provider import BaseProvider
from ..provider.chat import chat_prompt_tokens
from ..strategy.base_strategy import BaseStrategy
from ..strategy.sampling import check_sampling_args

__all__ = ["BadLine", "BatchSummary", "JsonlOutput", "PromptLine", "preference_pair", "read_prompts", "run_batch"]

Id = Union[str, int]
ROLES = ("system", "developer", "user", "assistant")
# per-line sampling fields -> generate()'s arguments
OVERRIDES = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "seed": "seed",
    "max_tokens": "max_new_tokens",
    "max_new_tokens": "max_new_tokens",
}


class BadLine(ValueError):
    """A line of the prompts file that cannot be used: ``line`` (1-based) and why."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line, self.message = line, message


@dataclass
class PromptLine:
    """One prompt of the file: its ``line`` number, ``id`` (given, else the line number), the
    ``prompt`` text or the chat ``messages``, and its sampling ``overrides`` (generate()'s names)."""

    line: int
    id: Id
    prompt: Optional[str] = None
    messages: Optional[List[Dict[str, str]]] = None
    overrides: Dict[str, Any] = field(default_factory=dict)


def id_key(value: Id) -> str:
    """How ids are compared (1 and "1" are different ids)."""
    return json.dumps(value)


def _parse_line(number: int, text: str) -> PromptLine:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadLine(number, f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(data, dict):
        raise BadLine(number, f"expected a JSON object, got {type(data).__name__}")
    ident = data.get("id", number)
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
        raise BadLine(number, f"'id' must be a string or an integer, got {ident!r}")
    prompt, messages = data.get("prompt"), data.get("messages")
    if (prompt is None) == (messages is None):
        raise BadLine(
            number,
            "give either 'prompt' (text) or 'messages' (a chat), not both"
            if prompt is not None
            else "no 'prompt' or 'messages'",
        )
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise BadLine(number, f"'prompt' must be a non-empty string, got {prompt!r:.80}")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise BadLine(number, '\'messages\' must be a non-empty list of {"role", "content"} objects')
        for i, message in enumerate(messages):
            if not (
                isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)
            ):
                raise BadLine(
                    number,
                    f'messages[{i}] must be {{"role": one of {", ".join(ROLES)}, "content": text}}, '
                    f"got {message!r:.80}",
                )
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    overrides: Dict[str, Any] = {}
    for key, name in OVERRIDES.items():
        if key not in data:
            continue
        value = data[key]
        integer = name in ("top_k", "seed", "max_new_tokens")
        if integer and (isinstance(value, bool) or not isinstance(value, int) or (name != "seed" and value < 0)):
            raise BadLine(number, f"'{key}' must be an integer{'' if name == 'seed' else ' >= 0'}, got {value!r}")
        if not integer and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise BadLine(number, f"'{key}' must be a number, got {value!r}")
        overrides[name] = value
    return PromptLine(number, ident, prompt, messages, overrides)


def read_prompts(
    lines: Iterable[str], defaults: Optional[Dict[str, Any]] = None
) -> Tuple[List[PromptLine], List[BadLine]]:
    """Parse a JSONL prompts file (its lines): the good prompts and the bad lines, in order.
    Blank lines are skipped; a repeated id is a bad line (the first one counts). Each line's
    sampling (its overrides over ``defaults``, generate()'s arguments) is checked too."""
    prompts: List[PromptLine] = []
    bad: List[BadLine] = []
    seen: Dict[str, int] = {}
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            prompt = _parse_line(number, text)
        except BadLine as error:
            bad.append(error)
            continue
        sampling = {**(defaults or {}), **prompt.overrides}
        try:
            check_sampling_args(
                sampling.get("temperature", 1.0),
                sampling.get("top_k", 50),
                sampling.get("top_p"),
                sampling.get("min_p"),
            )
        except ValueError as error:
            bad.append(BadLine(number, str(error)))
            continue
        key = id_key(prompt.id)
        if key in seen:
            bad.append(BadLine(number, f"id {prompt.id!r} is already used on line {seen[key]}"))
            continue
        seen[key] = number
        prompts.append(prompt)
    return prompts, bad


class JsonlOutput:
    """A JSONL file that records are appended to, each line written whole (one ``os.write``).

    Opening it reads what is already there: ``ids`` are the ids of its records (``id_key``). A
    last line without its newline (the writer was killed mid-line) is cut off; any other line
    that is not a JSON object with an ``id`` is an error (ValueError), so a foreign file is never
    appended to. ``keep``: ids to keep; records of other ids are dropped (the file is rewritten),
    e.g. a trace's records of generations whose completion was never written."""

    def __init__(self, path: str, keep: Optional[set] = None):
        self.path = path
        self.ids: set = set()
        self.dropped = 0  # records removed on opening (cut-off line, ids not kept)
        lines: List[bytes] = []
        if os.path.exists(path):
            with open(path, "rb") as file:
                data = file.read()
            lines = data.split(b"\n")
            if lines[-1]:  # cut off mid-write
                self.dropped += 1
            lines = lines[:-1]
        kept = []
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                key = id_key(record["id"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f"{path} line {number} is not a JSON record with an 'id': is it the output of "
                    "`backtrack-sampler batch`? (move it away or name another file)"
                ) from None
            if keep is not None and key not in keep:
                self.dropped += 1
                continue
            self.ids.add(key)
            kept.append(raw + b"\n")
        if self.dropped:
            temporary = f"{path}.tmp{os.getpid()}"
            with open(temporary, "wb") as file:
                file.writelines(kept)
            os.replace(temporary, path)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, records: Sequence[Dict[str, Any]]) -> None:
        """Append ``records``, all in one write."""
        if not records:
            return
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        while data:
            written = os.write(self._fd, data)
            data = data[written:]
        for record in records:
            self.ids.add(id_key(record["id"]))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> JsonlOutput:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def preference_pair(record: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """A trace's rewind record as a DPO preference pair in TRL's format, or None when it is not
    a pair (the chosen text is unknown or empty, or the same as the rejected one).

    Text prompts give the standard format: ``{"prompt": prompt + prefix, "chosen", "rejected"}``.
    Chat prompts give the conversational one: ``{"prompt": messages, "chosen": [{"role":
    "assistant", "content": prefix + chosen}], "rejected": [... prefix + rejected]}`` (the prefix is
    the same in both answers, so its terms cancel in the DPO loss)."""
    chosen, rejected, prefix = record.get("chosen"), record["rejected"], record["prefix"]
    if not chosen or chosen == rejected:
        return None
    prompt = record["prompt"]
    if isinstance(prompt, list):
        answer = lambda text: [{"role": "assistant", "content": prefix + text}]  # noqa: E731
        return {"id": record["id"], "prompt": prompt, "chosen": answer(chosen), "rejected": answer(rejected)}
    return {"id": record["id"], "prompt": prompt + prefix, "chosen": chosen, "rejected": rejected}


@dataclass
class BatchSummary:
    """What a ``run_batch`` did: ``completions`` written, ``failed`` generations (not written: a
    rerun tries them again), ``bad`` prompts refused when submitted (e.g. too long for the
    context), tokens ``delivered``/``rewound``, ``rewinds`` (``banned``: those at a banned phrase
    or pattern), ``pairs`` written, ``reasons`` (rewinds per reason), wall ``seconds``."""

    completions: int = 0
    failed: int = 0
    bad: int = 0
    delivered: int = 0
    rewound: int = 0
    rewinds: int = 0
    banned: int = 0
    pairs: int = 0
    reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0


class _Run:
    """The state of one run_batch: the scheduler's callbacks write the records."""

    def __init__(
        self,
        provider: BaseProvider,
        output: JsonlOutput,
        trace: Optional[JsonlOutput],
        pairs: Optional[JsonlOutput],
        summary: BatchSummary,
        progress: Optional[Callable[[BatchSummary, int], None]],
        on_error: Callable[[PromptLine, BaseException], None],
        fatal_types: Tuple[type, ...],
    ):
        self.provider, self.output, self.trace, self.pairs = provider, output, trace, pairs
        self.summary, self.progress, self.on_error, self.fatal_types = summary, progress, on_error, fatal_types
        self.fatal: Optional[BaseException] = None
        self.tokens = 0
        self.jobs: Dict[BatchJob, Tuple[PromptLine, Optional[TraceWriter], List[Dict[str, Any]]]] = {}

    def submit(
        self,
        scheduler: BatchScheduler,
        item: PromptLine,
        make_strategy: Callable[..., BaseStrategy],
        sampling: Dict[str, Any],
        messages: Optional[List[Dict[str, str]]],
    ) -> BatchJob:
        source: Union[str, List[Dict[str, str]]]  # the prompt as the trace records it
        prompt: Union[str, Sequence[int]]  # as the scheduler takes it
        if messages:
            source, prompt = messages, chat_prompt_tokens(self.provider, messages)
        else:
            assert item.prompt is not None  # a line without messages has a prompt (_parse_line)
            source = prompt = item.prompt
        if inspect.signature(make_strategy).parameters:  # it reads the prompt (a reasoning block it opens)
            if isinstance(prompt, str):
                prompt = self.provider.encode(prompt, add_special_tokens=True) if prompt else prompt
            strategy = make_strategy(prompt)
        else:
            strategy = make_strategy()
        writer = TraceWriter(None, source) if self.trace or self.pairs else None
        job = scheduler.submit(prompt, strategy, events=writer is not None, **sampling)
        self.jobs[job] = (item, writer, [])
        return job

    def apply(self, update: Update) -> None:
        """Take one ``Update`` of the scheduler: count the tokens, keep the rewind records of the
        trace, and write the line when the job is done."""
        item, writer, records = self.jobs[update.job]
        self.tokens += len(update.tokens)
        if writer is not None:
            for event in update.events:
                records.extend(
                    {"type": r["type"], "id": item.id, **r} for r in writer.records(event) if r["type"] == "rewind"
                )
        if update.finished:
            del self.jobs[update.job]
            self.finish(update.job, item, records)

    def finish(self, job: BatchJob, item: PromptLine, records: List[Dict[str, Any]]) -> None:
        summary, stats = self.summary, job.stats
        if job.error is not None:
            if isinstance(job.error, self.fatal_types):
                self.fatal = self.fatal or job.error
                return
            summary.failed += 1
            self.on_error(item, job.error)
            return
        if stats.finish_reason is None:  # cancelled (interrupted): not written, a rerun does it
            return
        record = {
            "id": item.id,
            "text": job.text,
            "finish_reason": stats.finish_reason,
            "delivered": stats.delivered,
            "rewound": stats.rewound,
            "rewinds": stats.rewinds,
            "seconds": round(stats.seconds, 3),
        }
        if stats.constraint:
            record["constraint"] = stats.constraint
        if self.trace is not None:  # first the pairs, then the completion: a rerun drops pairs without one
            self.trace.write(records)
        if self.pairs is not None:
            pairs = [p for p in map(preference_pair, records) if p is not None]
            self.pairs.write(pairs)
            summary.pairs += len(pairs)
        self.output.write([record])
        summary.completions += 1
        summary.delivered += stats.delivered
        summary.rewound += stats.rewound
        summary.rewinds += stats.rewinds
        for event in stats.events:
            reason = event.reason or "(no reason)"
            summary.reasons[reason] += 1
            summary.banned += reason.startswith(("phrase ", "regex "))
        if self.progress is not None:
            self.progress(summary, self.tokens)


def run_batch(
    provider: BaseProvider,
    prompts: Sequence[PromptLine],
    make_strategy: Callable[..., BaseStrategy],
    output: JsonlOutput,
    *,
    defaults: Optional[Dict[str, Any]] = None,
    parallel: Optional[int] = None,
    chat: bool = False,
    system: Optional[str] = None,
    base_seed: Optional[int] = None,
    trace: Optional[JsonlOutput] = None,
    pairs: Optional[JsonlOutput] = None,
    progress: Optional[Callable[[BatchSummary, int], None]] = None,
    on_error: Optional[Callable[[PromptLine, BaseException], None]] = None,
    on_bad: Optional[Callable[[BadLine], None]] = None,
    fatal: Tuple[type, ...] = (),
) -> BatchSummary:
    """Generate every prompt whose id ``output`` does not hold yet, ``parallel`` at a time (default:
    the provider's ``max_sequences``) on one ``BatchScheduler``, appending a record per completion:
    ``{"id", "text", "finish_reason", "delivered", "rewound", "rewinds", "seconds"}`` (and
    ``constraint`` when a hard constraint ended it).

    make_strategy: a new strategy instance per generation; given the prompt's token ids when it
    takes an argument (``build_strategies``'s ``prompt``: a reasoning block the prompt opens). defaults: generate()'s sampling
    arguments, under each line's overrides. chat: a ``prompt`` line is the user message of a
    chat (after a ``system`` message, if given), else plain text; ``messages`` lines are chats
    as they are. base_seed: a line without a seed gets ``base_seed + its line number`` (the same
    on a rerun). trace: the rewind records of each completion (``TraceWriter``'s, with the
    ``id``); pairs: their ``preference_pair`` s; both written just before the completion.
    progress(summary, delivered tokens so far) after each completion.

    A generation that fails is reported to ``on_error(prompt, error)`` and not written (a rerun
    tries it again); an error of a ``fatal`` type (e.g. the engine went away) stops the run and
    is raised. A prompt the sampler refuses (ValueError: too long for the context, ...) is a
    ``BadLine``: given to ``on_bad`` and skipped, or raised when there is no ``on_bad``. Whatever
    stops the run (Ctrl-C too), what was written stays and only the generations in flight are lost."""
    summary = BatchSummary()
    run = _Run(provider, output, trace, pairs, summary, progress, on_error or (lambda item, error: None), fatal)
    todo = [p for p in prompts if id_key(p.id) not in output.ids]
    scheduler = BatchScheduler(provider, parallel=parallel)
    started = time.perf_counter()
    position = 0
    try:
        while True:
            while position < len(todo) and scheduler.queued < scheduler.parallel:  # the next ones wait queued
                item = todo[position]
                position += 1
                sampling = {**(defaults or {}), **item.overrides}
                if "seed" not in item.overrides and base_seed is not None:
                    sampling["seed"] = base_seed + item.line
                messages = item.messages
                if messages is None and item.prompt is not None and (chat or system is not None):
                    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
                        {"role": "user", "content": item.prompt}
                    ]
                try:
                    run.submit(scheduler, item, make_strategy, sampling, messages)
                except ValueError as error:
                    summary.bad += 1
                    if on_bad is None:
                        raise BadLine(item.line, str(error)) from None
                    on_bad(BadLine(item.line, str(error)))
            if not scheduler.pending:
                break
            for update in scheduler.step():
                run.apply(update)
            if run.fatal is not None:
                raise run.fatal
    finally:
        summary.seconds = time.perf_counter() - started
        for update in scheduler.close():
            run.apply(update)
    return summary
