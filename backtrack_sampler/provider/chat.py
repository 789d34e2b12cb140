"""Chat templates: turn a list of messages into the prompt's token ids in the model's format."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from .base_provider import BaseProvider

# Used when the model ships no chat template (the embedded Gemma 3 GGUF has none): Gemma's format.
GEMMA_TURN = "<start_of_turn>{role}\n{content}<end_of_turn>\n"
GEMMA_GENERATION_PROMPT = "<start_of_turn>model\n"


def chat_template(provider: BaseProvider) -> Optional[str]:
    """The model's own chat template (GGUF metadata or transformers tokenizer), if it has one."""
    llm = getattr(provider, "llm", None)
    if llm is not None:
        return (getattr(llm, "metadata", None) or {}).get("tokenizer.chat_template") or None
    tokenizer = getattr(provider, "tokenizer", None)
    return getattr(tokenizer, "chat_template", None) or None


def _gemma_prompt(messages: Sequence[Dict[str, str]]) -> str:
    """Gemma's turn format. Gemma has no system role: system text opens the next user turn."""
    parts, pending_system = [], []
    for message in messages:
        role, content = message["role"], message["content"]
        if role in ("system", "developer"):
            pending_system.append(content)
            continue
        if role == "user" and pending_system:
            content = "\n\n".join(pending_system + [content])
            pending_system = []
        parts.append(GEMMA_TURN.format(role="model" if role == "assistant" else "user", content=content))
    if pending_system:  # system text with no user turn after it
        parts.append(GEMMA_TURN.format(role="user", content="\n\n".join(pending_system)))
    return "".join(parts) + GEMMA_GENERATION_PROMPT


def chat_prompt_tokens(provider: BaseProvider, messages: Sequence[Dict[str, str]]) -> List[int]:
    """Token ids of ``messages`` (dicts with "role" and "content" strings) in the model's chat
    format, ending with the start of the assistant's turn.

    Uses the model's chat template when it has one, else the Gemma format
    ``<start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n`` (preceded by BOS)."""
    template = chat_template(provider)
    if template is None:
        return provider.encode(_gemma_prompt(messages), add_special_tokens=True)
    tokenizer = getattr(provider, "tokenizer", None)
    if tokenizer is not None:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        bos = tokenizer.bos_token
    else:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        llm = provider.llm  # type: ignore[attr-defined]  # only a LlamacppProvider has no tokenizer object

        def raise_exception(message):
            raise ValueError(message)

        special = lambda token: llm.detokenize([token], special=True).decode("utf-8", "replace")  # noqa: E731
        bos, eos = special(llm.token_bos()), special(llm.token_eos())
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        text = env.from_string(template).render(
            messages=list(messages),
            add_generation_prompt=True,
            bos_token=bos,
            eos_token=eos,
            raise_exception=raise_exception,
        )
    tokens = provider.encode(text, add_special_tokens=False)
    if bos and not text.startswith(bos):  # the template leaves BOS to the tokenizer
        tokens = provider.encode(text, add_special_tokens=True)
    return tokens
