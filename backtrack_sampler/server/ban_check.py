"""A conservative check of a request's token-id bans: ids made with another model's tokenizer.

SillyTavern turns each unquoted line of its "Banned Tokens/Strings" box into token ids with a
tokenizer of its own choice (Llama 1/2 by default), and sends only the ids (``logit_bias`` with
``false``, ``custom_token_bans``, ``banned_tokens``). With another model's tokenizer those ids are
other tokens here: banning "adventures" bans what reads " aviation" and " jour". The server cannot
know the words, but it can see that the ids' text is nowhere in the request: a ban is aimed at
what the model writes in this chat, and the chat (the prompt) holds it. ``ban_warnings`` says so
only when the evidence is clear (several ids that read as words, a prompt long enough to judge,
and not one of those words anywhere in it, any case): ids made with this model's tokenizer from
words of the chat never trigger it. This module knows nothing about HTTP."""

from __future__ import annotations

from typing import List, Sequence

from ..provider.base_provider import BaseProvider
from .request import GenerationRequest

MIN_WORDS = 2  # ids that read as words (3+ letters) needed to judge
MIN_PROMPT_CHARS = 200  # a prompt shorter than this says too little about what the chat is about
SHOWN = 6  # ids quoted in the warning


def banned_ids(request: GenerationRequest) -> List[int]:
    """The token ids the request bans outright (``logit_bias`` false or <= -100, ``banned_tokens``
    ids, ``custom_token_bans``), once each, in the order given."""
    ids = [int(k) for k, v in (request.logit_bias or {}).items() if v is False or (v is not True and v <= -100)]
    ids += [t for t in request.banned_tokens or [] if isinstance(t, int)]
    ids += list(request.custom_token_bans or [])
    return list(dict.fromkeys(ids))


def ban_warnings(provider: BaseProvider, request: GenerationRequest, prompt: Sequence[int]) -> List[str]:
    """``[warning]`` when the request's banned token ids look made with another tokenizer: at least
    ``MIN_WORDS`` of them read as words here (3+ letters) and none of those occurs in the prompt
    (case-insensitive, as part of any word); else ``[]``."""
    ids = [t for t in banned_ids(request) if t < provider.vocab_size]
    if len(ids) < MIN_WORDS:
        return []
    pieces = {t: provider.decode([t]) for t in ids}
    words = {t: p.strip().lower() for t, p in pieces.items() if len(p.strip()) >= 3 and p.strip().isalpha()}
    if len(words) < MIN_WORDS:
        return []
    text = provider.decode(list(prompt)).lower()
    if len(text) < MIN_PROMPT_CHARS or any(word in text for word in words.values()):
        return []
    shown = ", ".join(f"{t} {pieces[t]!r}" for t in list(words)[:SHOWN])
    return [
        f"none of the banned token ids reads as text found in the prompt ({shown}{', ...' if len(words) > SHOWN else ''}"
        "): were they made with another tokenizer than this model's? SillyTavern tokenizes the unquoted lines "
        "of its Banned Tokens/Strings box with its own tokenizer choice; put each phrase in double quotes there "
        '("like this") to ban it as text, whatever the tokenizer'
    ]
