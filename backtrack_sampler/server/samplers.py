"""The samplers the frontends send (SillyTavern, KoboldCpp, TabbyAPI, llama.cpp: ``rep_pen``, DRY,
XTC, ``typical_p``, ``logit_bias``, token bans ...) and the built-in strategies they become
(``sampler_strategies``, in llama.cpp's order; ``plan.build_strategy`` chains them before the
request's own), plus ``IGNORED_FIELDS``: the ones that have no effect here. This module knows
nothing about HTTP or the model."""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple, Union

SamplerStrategy = Tuple[str, Dict[str, Any], str]  # (built-in strategy name, its parameters, the field)

# samplers and options the frontends send that have no effect here, with the values that mean "off":
# accepted (as TabbyAPI accepts what its backend lacks) and, when set otherwise, named in the answer
IGNORED_FIELDS = {
    "top_a": 0,
    "tfs": 1,
    "tfs_z": 1,
    "mirostat_mode": 0,
    "mirostat": 0,
    "smoothing_factor": 0,
    "skew": 0,
    "dynamic_temperature": False,
    "dynatemp_range": 0,
    "min_tokens": 0,
    "min_length": 0,
    "rep_pen_slope": 1,
    "repetition_decay": 0,
    "guidance_scale": 1,
    "negative_prompt": "",
    "max_tokens_second": 0,
    "epsilon_cutoff": 0,
    "eta_cutoff": 0,
    "num_beams": 1,
    "penalty_alpha": 0,
    "encoder_repetition_penalty": 1,
    "no_repeat_ngram_size": 0,
}


class SamplerFields(Protocol):
    """The request fields the samplers are read from (``request.GenerationRequest`` has them all)."""

    seed: Optional[int]
    frequency_penalty: Optional[float]
    presence_penalty: Optional[float]
    repetition_penalty: Optional[float]
    penalty_range: Optional[int]
    dry_multiplier: Optional[float]
    dry_base: Optional[float]
    dry_allowed_length: Optional[int]
    dry_penalty_last_n: Optional[int]
    dry_sequence_breakers: Optional[List[str]]
    xtc_threshold: Optional[float]
    xtc_probability: Optional[float]
    typical_p: Optional[float]
    logit_bias: Optional[Dict[str, Union[float, bool]]]
    banned_tokens: Optional[Union[List[int], List[str]]]
    custom_token_bans: Optional[List[int]]
    ban_eos_token: Optional[bool]
    default_penalty_range: ClassVar[int]  # penalty_range when not given (-1: the whole context)
    default_dry_range: ClassVar[int]  # dry_penalty_last_n when not given


def sampler_strategies(
    request: SamplerFields, prompt: Sequence[int] = (), eos: Iterable[int] = ()
) -> List[SamplerStrategy]:
    """``(strategy name, parameters, field)`` for the samplers the request turns on, in
    llama.cpp's order (logit bias, penalties, DRY, typical-p, XTC): each is a built-in strategy
    that edits the logits; ``prompt`` counts toward the penalties (as llama.cpp, KoboldCpp and
    TabbyAPI count it); ``eos``: the ids ``ban_eos_token`` bans."""
    out: List[SamplerStrategy] = []
    bias = {k: float("-inf") if v is False else v for k, v in (request.logit_bias or {}).items()}
    banned = [t for t in request.banned_tokens or [] if isinstance(t, int)] + list(request.custom_token_bans or [])
    banned += list(eos) if request.ban_eos_token else []
    if bias or banned:
        out.append(("logit_bias", {"bias": bias, "banned_tokens": banned}, "logit_bias" if bias else "banned_tokens"))
    rep, freq, presence = request.repetition_penalty, request.frequency_penalty or 0.0, request.presence_penalty or 0.0
    if (rep is not None and rep != 1) or freq or presence:
        last_n = request.default_penalty_range if request.penalty_range is None else request.penalty_range
        out.append(
            (
                "penalties",
                {
                    "repeat_penalty": 1.0 if rep is None else rep,
                    "frequency_penalty": freq,
                    "presence_penalty": presence,
                    "last_n": last_n,
                    "context": list(prompt),
                },
                "repetition_penalty",
            )
        )
    if request.dry_multiplier:
        params: Dict[str, Any] = {
            "multiplier": request.dry_multiplier,
            "context": list(prompt),
            "last_n": request.default_dry_range if request.dry_penalty_last_n is None else request.dry_penalty_last_n,
        }
        for key, value in (
            ("base", request.dry_base),
            ("allowed_length", request.dry_allowed_length),
            ("sequence_breakers", request.dry_sequence_breakers),
        ):
            if value is not None:
                params[key] = value
        out.append(("dry", params, "dry_multiplier"))
    if request.typical_p is not None and request.typical_p < 1:
        out.append(("typical", {"p": request.typical_p}, "typical_p"))
    if request.xtc_probability:
        out.append(
            (
                "xtc",
                {
                    "probability": request.xtc_probability,
                    "seed": request.seed,
                    "threshold": 0.1 if request.xtc_threshold is None else request.xtc_threshold,
                },
                "xtc_probability",
            )
        )
    return out
