"""Step 2 of a request, **plan** (see ``app``): a validated request becomes the prompt's tokens, its
strategy, its sampling arguments and its token and time limits, a ``runner.Plan``; still before any
waiting. Blocking (it tokenizes, builds the strategy and compiles grammars): the app runs it in a
worker thread. Every problem is an ``APIError`` (400) naming the field.

``build_strategy`` decides which strategies a request's fields become, in this order: the
frontends' samplers (``samplers.sampler_strategies``), AntiSlop for the banned phrases and
patterns, the ``strategy`` specs, and last the grammar of its structured output; chained."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from ..core.sampler import PromptError, check_prompt
from ..errors import UsageError
from ..provider.base_provider import BaseProvider
from ..provider.chat import chat_prompt_tokens
from ..strategy.base_strategy import BaseStrategy
from ..strategy.registry import chain, in_chain_order
from ..strategy.scope import default_scope, scoped
from .ban_check import ban_warnings
from .errors import APIError
from .limits import Limits
from .request import GenerationRequest
from .runner import Plan
from .schemas import ChatCompletionRequest, CompletionRequest
from .strategy_specs import BUILTIN_STRATEGIES
from .structured import GRAMMAR_KEYS, is_grammar


def plan_request(
    provider: BaseProvider, request: Union[CompletionRequest, ChatCompletionRequest], limits: Limits, index: int = 0
) -> Plan:
    """Tokens, strategy and limits for ``request``; raises ``APIError`` (400). Blocking (it
    tokenizes and builds the strategy): the server runs it in a worker thread. ``index``: which of
    the request's ``n`` generations (its seed is the request's + index)."""
    if isinstance(request, ChatCompletionRequest):
        chat, prompt = True, chat_tokens(provider, request.message_dicts())
    else:
        chat, prompt = False, prompt_tokens(provider, request.prompt)
    sampling = dict(request.sampling(), max_new_tokens=token_limit(provider, len(prompt), request, limits))
    if index and sampling["seed"] is not None:
        sampling["seed"] += index
    strategy = build_strategy(provider, request, limits, prompt)
    return Plan(
        chat,
        prompt,
        strategy,
        sampling,
        request.stop or [],
        limits.max_seconds,
        bool(request.stream),
        request.include_usage,
        request.include_backtrack,
        request.logprob_count,
        tuple(request.ignored_fields),
        tuple(ban_warnings(provider, request, prompt)),
    )


def prompt_tokens(provider: BaseProvider, prompt: Union[str, List[int]]) -> List[int]:
    """The prompt's tokens (a string is encoded with the special tokens); a 400 when an id is out of
    the vocabulary or the prompt leaves no room in the context (``core.sampler.check_prompt``)."""
    tokens = provider.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
    return _checked(provider, tokens, "prompt")


def chat_tokens(provider: BaseProvider, messages: List[Dict[str, str]]) -> List[int]:
    """The messages rendered with the model's chat template, as tokens; a 400 when the template
    rejects them or they leave no room in the context."""
    try:
        tokens = chat_prompt_tokens(provider, messages)
    except Exception as error:  # a template that rejects the conversation (raise_exception, ...)
        raise APIError(f"the chat template rejected the messages: {error}", "messages", "invalid_value") from None
    return _checked(provider, tokens, "messages")


def _checked(provider: BaseProvider, tokens: List[int], param: str) -> List[int]:
    try:
        return check_prompt(provider, tokens)
    except PromptError as error:
        raise APIError(str(error), param, error.code) from None


def token_limit(provider: BaseProvider, prompt_length: int, request: GenerationRequest, limits: Limits) -> int:
    """max_tokens, checked against the room the context leaves (OpenAI's context_length_exceeded)."""
    room = provider.context_length - prompt_length
    asked = request.token_limit()
    if asked is not None and asked > room:
        param = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) is not None else "max_tokens"
        raise APIError(
            f"This model's maximum context length is {provider.context_length} tokens. However, you requested "
            f"{prompt_length + asked} tokens ({prompt_length} in the prompt, {asked} for the completion). "
            "Please reduce the prompt or the completion length.",
            param,
            "context_length_exceeded",
        )
    limit = min(room, request.default_max_tokens or room) if asked is None else asked
    return limit if limits.max_tokens is None else min(limit, limits.max_tokens)


def build_strategy(
    provider: BaseProvider, request: GenerationRequest, limits: Optional[Limits] = None, prompt: Sequence[int] = ()
) -> BaseStrategy:
    """The request's strategy: first the samplers it turns on (``request.samplers``: logit bias
    and token bans, penalties, DRY, typical-p, XTC; ``prompt`` counts toward the penalties), then
    AntiSlop for ``banned_strings``/``banned_regex`` (and KoboldCpp's ``banned_tokens`` phrases),
    then the ``strategy`` specs (validated by ``parse_request``), then the grammar of its
    structured output (``response_format``, ``json_schema``, ``grammar``/``grammar_string``,
    ``regex_pattern``), last so that its mask has the last word; chained. Every grammar is
    compiled within ``limits.max_grammar_seconds`` first (a 400 beyond it). On a reasoning model
    each acts where ``ban_scope``, ``grammar_scope`` and a spec's ``scope`` say (``strategy.scope``)."""
    limits = limits or Limits()
    samplers = [
        _built(lambda: BUILTIN_STRATEGIES.get(name).build(provider, params), param)
        for name, params, param in request.samplers(prompt, provider.eos_token_ids)
    ]
    bans = None
    phrases = request.banned_phrases
    if phrases or request.banned_regex:
        antislop: Dict[str, Any] = {"slops": phrases or []}
        if request.banned_regex:
            antislop["regexes"] = request.banned_regex
        param = "banned_strings" if phrases else "banned_regex"
        bans = _built(lambda: BUILTIN_STRATEGIES.get("antislop").build(provider, antislop), param)
        bans = scoped(provider, bans, request.ban_scope or "both", prompt)
    named = []
    for i, spec in enumerate(request.strategy or []):
        if is_grammar(spec.call.type):
            _checked_grammar(spec.call.kwargs, limits, f"strategy[{i}]")
        built = _built(lambda: spec.call.build(provider), f"strategy[{i}]")
        named.append(scoped(provider, built, spec.scope or default_scope(spec.name, provider), prompt))
    grammar_strategy = None
    structured = request.structured_output
    if structured is not None:
        field, grammar = structured
        _checked_grammar(grammar, limits, field)
        grammar_strategy = _built(lambda: BUILTIN_STRATEGIES.get("grammar").build(provider, grammar), field)
        grammar_strategy = scoped(
            provider, grammar_strategy, request.grammar_scope or default_scope("grammar", provider), prompt
        )
    try:
        return chain(in_chain_order(samplers, bans, named, grammar_strategy))
    except UsageError as error:
        raise APIError(str(error), "strategy", "invalid_value") from None


def _checked_grammar(params: Dict[str, Any], limits: Limits, param: str) -> None:
    """A request's grammar within ``max_grammar_chars`` and compiled within ``max_grammar_seconds``
    (``grammar_strategy.check_grammar``: a child process, killed beyond it); else a 400 naming it."""
    from ..strategy.grammar_strategy import GrammarError, check_grammar

    grammar = {key: params.get(key) for key in GRAMMAR_KEYS}
    try:
        check_grammar(
            **grammar,
            whitespace_flexible=bool(params.get("whitespace_flexible")),
            max_chars=limits.max_grammar_chars,
            timeout=limits.max_grammar_seconds,
        )
    except GrammarError as error:
        message = str(error) if str(error).startswith(f"{param}: ") else f"{param}: {error}"
        raise APIError(message, param, "invalid_value") from None
    except ImportError as error:
        raise APIError(
            f"{param}: structured output is not available on this server ({error})", param, "unsupported_value"
        ) from None


def _built(build: Callable[[], BaseStrategy], param: str) -> BaseStrategy:
    """``build()``, with a constructor's refusal as a 400 naming ``param``."""
    try:
        return build()
    except UsageError as error:
        raise APIError(str(error), param, "invalid_value") from None
