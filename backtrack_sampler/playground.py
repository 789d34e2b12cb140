"""The server's playground: the page at ``/`` (plain files in ``static/``, no build step) and the
execution behind ``POST /v1/backtrack/candidates`` (human guidance in the browser).

The candidates call is stateless: the page sends the prompt, the strategy and the tokens chosen so
far; the server replays those tokens through a fresh ``Generation`` (so the strategy sees them,
edits the logits and may rewind, exactly as during generation) and returns the top candidates for
the next token, with their probabilities after the strategy's edits and the sampling filters.
"Back" on the page is just dropping the last token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from pydantic import Field, model_validator
from typing_extensions import Annotated

from .backtrack_sampler import BacktrackSampler
from .provider.base_provider import BaseProvider
from .schemas import ChatMessage, _error, _Request
from .strategy.base_strategy import BaseStrategy

STATIC = Path(__file__).with_name("static")
MAX_TOP_N = 20
MAX_CHOSEN = 1024  # tokens a candidates request may replay


class CandidatesRequest(_Request):
    """``POST /v1/backtrack/candidates``: ``prompt`` (a string or token ids) or ``messages``, the
    ``tokens`` chosen so far, ``top_n`` candidates wanted, and the sampling and strategy fields of
    the completion routes (``max_tokens`` is the token limit the choices count against)."""

    prompt: Optional[Union[str, List[int]]] = None
    messages: Optional[List[ChatMessage]] = Field(None, min_length=1)
    tokens: List[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=MAX_CHOSEN)
    top_n: int = Field(5, ge=1, le=MAX_TOP_N)

    @model_validator(mode="after")
    def _one_prompt(self) -> "CandidatesRequest":
        if (self.prompt is None) == (self.messages is None):
            raise _error("invalid_value", "give either prompt or messages")
        if self.prompt is not None and len(self.prompt) == 0:
            raise _error("invalid_value", "prompt is empty")
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


def _text_after(provider: BaseProvider, before: Sequence[int], tokens: Sequence[int]) -> str:
    """Text of ``tokens`` as it reads after ``before`` (keeps a leading space a lone decode may drop)."""
    context = list(before[-1:])
    return provider.decode(context + list(tokens))[len(provider.decode(context)):]


def candidates(provider: BaseProvider, strategy: BaseStrategy, prompt: List[int], chosen: Sequence[int],
               top_n: int = 5, temperature: float = 1.0, top_k: Optional[int] = 50, top_p: Optional[float] = None,
               min_p: Optional[float] = None, max_new_tokens: Optional[int] = None) -> Dict[str, Any]:
    """Replay ``chosen`` after ``prompt`` through ``strategy`` and return the next-token candidates.

    Returns ``{"tokens", "text", "candidates": [{"token", "text", "probability", "eos"}],
    "finish_reason", "rewind"}``: ``tokens`` are the chosen tokens the strategy kept (it may rewind
    when they complete a banned phrase: ``rewind`` then tells where and why, and replay stops
    there); ``finish_reason`` is "stop" after an end-of-text token and "length" at the token
    limit, and then there are no candidates. Call it holding the model (the provider's cache is
    used). Costs one model evaluation per chosen token when the strategy has hooks (none when it
    has none: only the last position is evaluated, usually from the cache).
    """
    sampler = BacktrackSampler(provider, strategy)
    generation = sampler.start(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, min_p=min_p, seed=0)
    plain = type(strategy) is BaseStrategy  # no hooks: the replay needs no logits
    rewind = None
    try:
        for token in chosen:
            if generation.done:
                break
            dense = None
            if not plain:
                _, _, dense = generation.distribution(provider.generate(generation.sequence))
            generation.push(int(token), dense)
            if generation.stats.events:
                event = generation.stats.events[0]
                rewind = {"position": event.position, "tokens": list(event.tokens), "reason": event.reason,
                          "text": _text_after(provider, generation.tokens[: event.position], event.tokens)}
                break
        tokens = list(generation.tokens)
        finish = generation.stats.finish_reason if generation.done else None
        if finish == "stop" and rewind is None:
            tokens.append(int(chosen[len(tokens)]))  # the end-of-text token the user picked: "back" removes it
        options: List[Dict[str, Any]] = []
        if not generation.done:
            ids, probs, _ = generation.distribution(provider.generate(generation.sequence))
            probs = np.asarray(probs, dtype=np.float64)
            order = np.argsort(-probs, kind="stable")[:top_n]
            total = float(probs.sum()) or 1.0
            eos = provider.eos_token_ids
            options = [{
                "token": int(ids[i]), "probability": float(probs[i]) / total, "eos": int(ids[i]) in eos,
                "text": "" if int(ids[i]) in eos else _text_after(provider, generation.sequence, [int(ids[i])]),
            } for i in order]
        return {"tokens": tokens, "text": _text_after(provider, prompt, generation.tokens), "candidates": options,
                "finish_reason": finish, "rewind": rewind}
    finally:
        generation.close()


def backtrack_payload(event, held: str = "") -> Dict[str, Any]:
    """The ``backtrack`` object of a stream's extension chunk for ``event`` (not ``Final``: final
    text goes in the ordinary chunks). ``held``: final text the server holds back (it might start a
    stop string); it is shown at the start of the provisional text."""
    from .events import event_dict

    data = event_dict(event)
    if data["type"] == "provisional" and held:
        data["text"] = held + data["text"]
    return data
