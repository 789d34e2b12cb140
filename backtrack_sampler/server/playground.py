"""The server's playground: the page at ``/`` (plain files in ``static/``, no build step) and the
execution behind ``POST /v1/backtrack/candidates`` (human guidance in the browser).

The candidates call is stateless: the page sends the prompt, the strategy and the tokens chosen so
far; the server replays those tokens through a fresh ``Generation`` with the ``CandidateSearch``
policy (so the strategy sees them, edits the logits and may rewind, exactly as during generation)
and returns the top candidates for the next token, with their probabilities after the strategy's
edits and the sampling filters. "Back" on the page is just dropping the last token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from pydantic import Field, model_validator
from typing_extensions import Annotated

from ..core.generation import Generation
from ..core.scheduler import Policy, Proposal, backend_for, drive
from ..provider.base_provider import BaseProvider
from ..provider.text import text_after
from ..strategy.base_strategy import BaseStrategy
from ..strategy.sampling import check_sampling_args
from .errors import field_error
from .request import GenerationRequest
from .schemas import ChatMessage

STATIC = Path(__file__).with_name("static")
MAX_TOP_N = 20
MAX_CHOSEN = 1024  # tokens a candidates request may replay


class CandidatesRequest(GenerationRequest):
    """``POST /v1/backtrack/candidates``: ``prompt`` (a string or token ids) or ``messages``, the
    ``tokens`` chosen so far, ``top_n`` candidates wanted, and the sampling and strategy fields of
    the completion routes (``max_tokens`` is the token limit the choices count against)."""

    prompt: Optional[Union[str, List[int]]] = None
    messages: Optional[List[ChatMessage]] = Field(None, min_length=1)
    tokens: List[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=MAX_CHOSEN)
    top_n: int = Field(5, ge=1, le=MAX_TOP_N)

    @model_validator(mode="after")
    def _one_prompt(self) -> CandidatesRequest:
        if (self.prompt is None) == (self.messages is None):
            raise field_error("invalid_value", "give either prompt or messages")
        if self.prompt is not None and len(self.prompt) == 0:
            raise field_error("invalid_value", "prompt is empty")
        return self

    def message_dicts(self) -> List[Dict[str, str]]:
        return [{"role": m.role, "content": m.content or ""} for m in self.messages or []]


def public_path(path: str) -> bool:
    """Paths served without the API key: the page and its files (the page asks for the key)."""
    return path == "/" or path.startswith("/static/")


def routes() -> list:
    """Starlette routes: ``GET /`` (the page) and ``/static/...`` (its CSS and JS)."""
    from starlette.responses import FileResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    async def index(request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    return [
        Route("/", index, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]


class CandidateSearch(Policy):
    """The policy behind human guidance: its ``generation`` replays ``chosen`` (each pushed
    instead of drawn, so the strategy sees them, edits the logits and may rewind) and then,
    instead of drawing a token, records the ``top_n`` candidates for the next one in ``result``
    and ends. Any driver applies it to whatever backend it runs on (``candidates`` below; the
    server's scheduler; through a serving engine the candidates are those the engine reports, one
    token per request).

    ``result``: ``{"tokens", "text", "candidates": [{"token", "text", "probability", "eos"}],
    "finish_reason", "rewind"}``: ``tokens`` are the chosen tokens the strategy kept (when they
    complete a banned phrase it rewinds: ``rewind`` tells where and why, and replay stops there);
    ``finish_reason`` is "stop" after an end-of-text token and "length" at the token limit, and
    then there are no candidates. A strategy that edits no logits and reads no probabilities
    (``capabilities``) needs no model call to replay (only the last position is evaluated); any
    other costs one evaluation per chosen token.
    """

    draft_limit = 1  # a drafting backend: only the candidates at each position are read

    def __init__(
        self,
        provider: BaseProvider,
        strategy: BaseStrategy,
        prompt: List[int],
        chosen: Sequence[int],
        top_n: int = 5,
        limit: Optional[int] = None,
        temperature: float = 1.0,
        top_k: Optional[int] = 50,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
    ):
        check_sampling_args(temperature, top_k, top_p, min_p)
        room = provider.context_length - len(prompt)
        self.provider = provider
        self.generation = Generation(
            provider,
            strategy,
            prompt,
            room if limit is None else min(limit, room),
            (temperature, top_k, top_p, min_p),
            seed=0,
            budget=2**62,
        )
        self.chosen, self.top_n = [int(t) for t in chosen], top_n
        self.rewind: Optional[Dict[str, Any]] = None
        self.result: Optional[Dict[str, Any]] = None
        caps = strategy.capabilities
        if not (caps.edits_logits or caps.reads_probs):  # replaying needs no logits: only the last position does
            while self._replaying():
                self._replay(None)
        self._settle()

    @property
    def done(self) -> bool:
        return self.generation.done

    def feed(self, generation: Generation, proposal: Proposal) -> List[int]:
        ids, probs, dense = proposal.distribution(generation)
        if self._replaying():
            final = self._replay(dense)
            self._settle()
            return final
        probs = np.asarray(probs, dtype=np.float64)
        order = np.argsort(-probs, kind="stable")[: self.top_n]
        total = float(probs.sum()) or 1.0
        eos = self.provider.eos_token_ids
        self._answer(
            [
                {
                    "token": int(ids[i]),
                    "probability": float(probs[i]) / total,
                    "eos": int(ids[i]) in eos,
                    "text": ""
                    if int(ids[i]) in eos
                    else text_after(self.provider.decode, generation.sequence, [int(ids[i])]),
                }
                for i in order
            ]
        )
        generation.close()
        return []

    def _replaying(self) -> bool:
        generation = self.generation
        return not generation.done and self.rewind is None and len(generation.tokens) < len(self.chosen)

    def _replay(self, dense: Optional[np.ndarray]) -> List[int]:
        """Push the next chosen token; the first rewind it causes ends the replay."""
        generation = self.generation
        final = generation.push(self.chosen[len(generation.tokens)], dense)
        if generation.stats.events:
            event = generation.stats.events[0]
            self.rewind = {
                "position": event.position,
                "tokens": list(event.tokens),
                "reason": event.reason,
                "text": text_after(
                    self.provider.decode, generation.prompt + generation.tokens[: event.position], event.tokens
                ),
            }
        return final

    def _settle(self) -> None:
        if self.generation.done:  # the end-of-text token or the token limit: no candidates
            self._answer([])

    def _answer(self, options: List[Dict[str, Any]]) -> None:
        generation = self.generation
        tokens = list(generation.tokens)
        finish = generation.stats.finish_reason if generation.done else None
        if finish == "stop" and self.rewind is None:
            tokens.append(self.chosen[len(tokens)])  # the end-of-text token the user picked: "back" removes it
        self.result = {
            "tokens": tokens,
            "text": text_after(self.provider.decode, generation.prompt, generation.tokens),
            "candidates": options,
            "finish_reason": finish,
            "rewind": self.rewind,
        }


def candidates(
    provider: BaseProvider,
    strategy: BaseStrategy,
    prompt: List[int],
    chosen: Sequence[int],
    top_n: int = 5,
    temperature: float = 1.0,
    top_k: Optional[int] = 50,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    max_new_tokens: Optional[int] = None,
) -> Dict[str, Any]:
    """Replay ``chosen`` after ``prompt`` through ``strategy`` and return the next-token
    candidates (``CandidateSearch.result``), with the one driver on ``backend_for(provider)`` (a
    local model or a serving engine); call it holding the model."""
    search = CandidateSearch(
        provider, strategy, prompt, chosen, top_n, max_new_tokens, temperature, top_k, top_p, min_p
    )
    for _ in drive(backend_for(provider), search.generation, search):
        pass
    assert search.result is not None  # set when the generation ends
    return search.result


def backtrack_payload(event, held: str = "") -> Dict[str, Any]:
    """The ``backtrack`` object of a stream's extension chunk for ``event`` (not ``Final``: final
    text goes in the ordinary chunks). ``held``: final text the server holds back (it might start a
    stop string); it is shown at the start of the provisional text."""
    from ..core.events import event_dict

    data = event_dict(event)
    if data["type"] == "provisional" and held:
        data["text"] = held + data["text"]
    return data
