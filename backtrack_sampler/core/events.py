"""Live events of a generation, for UIs, traces and streams: what is final, what is still
provisional, every rewind, and what was finally chosen where a rewind happened.

The scheduler makes them, once, for a job added with ``events=True``: an ``EventTracker`` reads the
``Generation`` after each step (the rewinds it recorded, the tokens it released, its tail), whatever
backend steps it, and the step's ``Update`` carries them::

    for update in scheduler.step():           # a job added with events=True
        for event in update.events:           # (made by an EventTracker the scheduler keeps)
            ...

``stream_events(sampler, prompt, **generate_kwargs)`` is that loop for one ``BacktrackSampler``.
``Transcript`` rebuilds the text from the events (the final text and every struck-out attempt, at
the place it was written), exactly as the playground page does; ``TraceWriter`` writes the
``generate --trace`` JSON lines (one record per rewind: prefix, rejected, chosen, reason).

Order within a step: ``Rewind`` (the text from ``at`` on is removed), then ``Final`` (text that is
final now, appended to the final text), then ``Provisional`` (the whole not-yet-final tail, which
replaces the previous one; sent only when it changed), then any ``Chosen``. The final text is the concatenation of the
``Final`` texts; ``Done`` ends the stream.
"""

from __future__ import annotations

import json
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import IO, TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Union

from ..provider.text import TextView, text_after
from .generation import Generation

if TYPE_CHECKING:
    from .sampler import BacktrackSampler


@dataclass
class Rewind:
    """The continuation was cut back to ``position`` tokens (``at`` characters of continuation
    text), removing ``text`` (``tokens``) for ``reason``. ``index`` numbers the rewinds from 0."""

    index: int
    position: int
    at: int
    text: str
    tokens: List[int]
    reason: Optional[str]
    type: str = field(default="rewind", init=False)


@dataclass
class Final:
    """``text`` is final now (append it to the final text); ``tokens`` tokens became final."""

    text: str
    tokens: int
    type: str = field(default="final", init=False)


@dataclass
class Provisional:
    """The not-yet-final tail after the final text (it may still be rewound), decoded as
    ``text``; ``tokens`` tokens are not final yet. Sent when it changes."""

    text: str
    tokens: int
    type: str = field(default="provisional", init=False)


@dataclass
class Chosen:
    """What the generation finally wrote where rewind ``rewind`` happened: as many tokens as were
    rejected (fewer if it ended first). ``text`` is None when a later rewind to an earlier
    position discarded the text before that rewind (no final continuation has that prefix)."""

    rewind: int
    text: Optional[str]
    tokens: List[int]
    type: str = field(default="chosen", init=False)


@dataclass
class Done:
    """The generation ended: ``finish_reason`` "stop", "length", or None when it was stopped."""

    finish_reason: Optional[str]
    delivered: int
    rewound: int
    rewinds: int
    steps: int
    seconds: float
    type: str = field(default="done", init=False)


Event = Union[Rewind, Final, Provisional, Chosen, Done]


def event_dict(event: Event) -> Dict[str, Any]:
    """The event as a JSON-ready dict with its ``type`` first."""
    data = asdict(event)
    return {"type": data.pop("type"), **data}


class EventTracker:
    """Turns a ``Generation``'s state into events; call ``update()`` after every step (and once
    more after the generation is done or closed: it then adds ``Done``). Text is read through a
    ``TextView`` of the final tokens (whole characters only; the tokens of a split character wait
    in the provisional tail)."""

    def __init__(self, generation: Generation):
        self.generation = generation
        self.decode = generation.provider.decode
        self._final = TextView(self.decode)  # the final text sent
        self._rewinds = 0  # rewinds seen in generation.stats.events
        self._provisional: Optional[tuple] = None
        self._pending: List[tuple] = []  # (index, position, count) of rewinds whose chosen text is not known
        self._finished = False
        self._reported_final = 0

    def _tail(self, end: int) -> str:
        """Text of the tokens from the end of the final text sent to ``end``, after it."""
        tokens, sent = self.generation.tokens, self._final.committed
        return text_after(self.decode, tokens[:sent], tokens[sent:end])

    def _in_context(self, tokens: Sequence[int], position: int) -> str:
        return text_after(self.decode, self.generation.tokens[:position], tokens)

    def update(self) -> List[Event]:
        """The events since the last call."""
        if self._finished:
            return []
        generation = self.generation
        final = self._final
        events: List[Event] = []
        for record in generation.stats.events[self._rewinds :]:
            index = self._rewinds
            self._rewinds += 1
            position = record.position
            events.append(
                Rewind(
                    index,
                    position,
                    len(final.text) + len(self._tail(position)),
                    self._in_context(record.tokens, position),
                    list(record.tokens),
                    record.reason,
                )
            )
            events.extend(self._resolve(superseded_before=position))
            self._pending.append((index, position, len(record.tokens)))
        released = generation.released
        if released > final.committed:
            delta = final.update(generation.tokens[:released], at_end=generation.done)
            if final.committed > self._reported_final:  # (a character split across tokens waits)
                events.append(Final(delta, final.committed - self._reported_final))
                self._reported_final = final.committed
        tail = self._tail(len(generation.tokens))
        state = (tail, len(generation.tokens) - final.committed)
        if state != self._provisional:
            self._provisional = state
            events.append(Provisional(tail, len(generation.tokens) - released))
        events.extend(self._resolve())
        if generation.done:  # close() also marks a generation that was stopped early as done
            events.extend(self._resolve(end=True))
            stats = generation.stats
            events.append(
                Done(
                    stats.finish_reason,
                    stats.delivered,
                    stats.rewound,
                    stats.rewinds,
                    stats.steps,
                    round(stats.seconds, 4),
                )
            )
            self._finished = True
        return events

    def _resolve(self, superseded_before: Optional[int] = None, end: bool = False) -> List[Chosen]:
        """Chosen events for the pending rewinds whose outcome is known."""
        tokens, released = self.generation.tokens, self.generation.released
        events, pending = [], []
        for index, position, count in self._pending:
            if superseded_before is not None:
                if superseded_before < position:
                    events.append(Chosen(index, None, []))
                else:
                    pending.append((index, position, count))
            elif released >= position + count or (end and released > position):
                chosen = tokens[position : min(position + count, released)]
                events.append(Chosen(index, self._in_context(chosen, position), list(chosen)))
            elif end:
                events.append(Chosen(index, None if released < position else "", []))
            else:
                pending.append((index, position, count))
        self._pending = pending
        return events


def stream_events(sampler: BacktrackSampler, prompt, **kwargs) -> Iterator[Event]:
    """Generate with ``sampler`` (the arguments of ``BacktrackSampler.generate``) and yield the
    events of every step; the last one is ``Done``. ``sampler.stats`` describes the run. It is
    ``BacktrackSampler.steps`` (the one driver) with ``events=True``: the scheduler's updates carry them."""
    generation = sampler.start(prompt, **kwargs)
    with closing(sampler.steps(generation, events=True)) as updates:
        for update in updates:
            yield from update.events


@dataclass
class Strike:
    """Text that was written and then rewound, at ``at`` characters into the continuation (or
    into the strike it is nested in); ``inner`` holds the attempts rewound inside it before."""

    at: int
    text: str
    reason: Optional[str]
    inner: List[Strike] = field(default_factory=list)


class Transcript:
    """Rebuilds a generation from its events: ``final`` text, ``provisional`` tail, and
    ``strikes`` (every rewound attempt where it was written). ``apply`` takes events or their
    dicts (as sent by the server's stream)."""

    def __init__(self) -> None:
        self.final = ""
        self.provisional = ""
        self.strikes: List[Strike] = []
        self.rewinds: Dict[int, Dict[str, Any]] = {}

    @property
    def text(self) -> str:
        return self.final + self.provisional

    def apply(self, event: Union[Event, Dict[str, Any]]) -> None:
        e = event if isinstance(event, dict) else event_dict(event)
        kind = e["type"]
        if kind == "rewind":
            at = e["at"]
            self.rewinds[e["index"]] = {"prefix": self.text[:at], **e}
            self.provisional = self.provisional[: max(at - len(self.final), 0)]
            inner = [Strike(s.at - at, s.text, s.reason, s.inner) for s in self.strikes if s.at > at]
            self.strikes = [s for s in self.strikes if s.at <= at] + [Strike(at, e["text"], e["reason"], inner)]
        elif kind == "final":
            self.final += e["text"]
        elif kind == "provisional":
            self.provisional = e["text"]
        elif kind == "chosen" and e["rewind"] in self.rewinds:
            self.rewinds[e["rewind"]]["chosen"] = e["text"]

    def render(self, strike=lambda text, reason: f"[-{text}-]") -> str:
        """The text with every rewound attempt shown in place, ``strike(text, reason)`` each."""

        def show(text: str, strikes: List[Strike]) -> str:
            out, done = [], 0
            for s in strikes:
                out.append(text[done : s.at])
                done = max(done, s.at)
                inner = show(s.text, s.inner)
                out.append(strike(inner, s.reason))
            out.append(text[done:])
            return "".join(out)

        return show(self.text, self.strikes)


class TraceWriter:
    """Writes ``generate --trace`` JSON lines to ``file``: one ``rewind`` record per rewind, once
    its chosen continuation is known, then an ``end`` record. See the README for the format.
    ``records(event)`` gives the records without writing them (``file`` may then be None)."""

    def __init__(self, file: Optional[IO[str]], prompt: Union[str, List[Dict[str, str]]]):
        self.file, self.prompt = file, prompt
        self.transcript = Transcript()

    def records(self, event: Event) -> List[Dict[str, Any]]:
        """The records ``event`` completes (none, a rewind's, or the end's)."""
        self.transcript.apply(event)
        if isinstance(event, Chosen):
            r = self.transcript.rewinds.pop(event.rewind)
            return [
                {
                    "type": "rewind",
                    "index": r["index"],
                    "prompt": self.prompt,
                    "prefix": r["prefix"],
                    "rejected": r["text"],
                    "chosen": event.text,
                    "reason": r["reason"],
                    "position": r["position"],
                    "rejected_tokens": r["tokens"],
                    "chosen_tokens": event.tokens,
                }
            ]
        if isinstance(event, Done):
            return [
                {
                    "type": "end",
                    "text": self.transcript.final,
                    **{k: v for k, v in event_dict(event).items() if k != "type"},
                }
            ]
        return []

    def write(self, event: Event) -> None:
        if self.file is None:
            raise ValueError("this TraceWriter has no file: call records(event) instead")
        for record in self.records(event):
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.file.flush()
