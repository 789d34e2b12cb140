"""Request bodies shaped exactly as SillyTavern builds them (SillyTavern/SillyTavern@ba6f7b7, Sep 2024):
``getTextGenGenerationData`` in ``public/scripts/textgen-settings.js`` with its default ``settings``
for the "tabby", "koboldcpp" and "llamacpp" text-completion types (undefined values left out, as
``JSON.stringify`` does; ``stream`` set by ``generateTextGenWithStreaming``), which its server posts
as they are to ``/v1/completions`` ("llamacpp": to llama-server's ``/completion``;
``src/endpoints/backends/text-completions.js``); and the
KoboldAI Classic body its server builds in ``src/endpoints/backends/kobold.js`` for
``/api/v1/generate`` and ``/api/extra/generate/stream``."""

from __future__ import annotations

import json

BREAKERS = '["\\n", ":", "\\"", "*"]'  # settings.dry_sequence_breakers: a JSON array in a string


def textgen_body(
    api_type: str,
    prompt: str,
    max_tokens: int,
    stops,
    max_context: int = 4096,
    probabilities: bool = False,
    stream: bool = True,
    **settings,
) -> dict:
    """``getTextGenGenerationData(prompt, max_tokens, ...)`` for ``api_type`` "tabby", "koboldcpp" or
    "llamacpp", with ST's default settings (``settings`` overrides some: ``banned_tokens``,
    ``banned_strings``, ``rep_pen``, ``dry_multiplier``, ``logit_bias``, ``seed`` ...);
    ``probabilities``: the "Request token probabilities" option; ``stream``: its "Streaming"."""
    s = {
        "temp": 0.7,
        "top_p": 0.5,
        "top_k": 40,
        "typical_p": 1,
        "min_p": 0,
        "rep_pen": 1.2,
        "rep_pen_range": 0,
        "freq_pen": 0,
        "presence_pen": 0,
        "dry_multiplier": 0.0,
        "dry_base": 1.75,
        "dry_allowed_length": 2,
        "dry_penalty_last_n": 0,
        "seed": -1,
        "banned_tokens": "",
        "banned_strings": [],
        "xtc_threshold": 0.1,
        "xtc_probability": 0,
        "logit_bias": None,
        "n": 1,
        **settings,
    }
    params = {
        "prompt": prompt,
        "max_new_tokens": max_tokens,
        "max_tokens": max_tokens,
        "logprobs": 10 if probabilities else None,
        "temperature": s["temp"],
        "top_p": s["top_p"],
        "typical_p": s["typical_p"],
        "typical": s["typical_p"],
        "sampler_seed": s["seed"],
        "min_p": s["min_p"],
        "repetition_penalty": s["rep_pen"],
        "frequency_penalty": s["freq_pen"],
        "presence_penalty": s["presence_pen"],
        "top_k": s["top_k"],
        "skew": 0,
        "min_tokens": 0,
        "add_bos_token": True,
        "smoothing_factor": 0.0,
        "smoothing_curve": 1.0,
        "dry_allowed_length": s["dry_allowed_length"],
        "dry_multiplier": s["dry_multiplier"],
        "dry_base": s["dry_base"],
        "dry_sequence_breakers": BREAKERS,
        "dry_penalty_last_n": s["dry_penalty_last_n"],
        "max_tokens_second": 0,
        "samplers": ["top_k", "tfs_z", "typical_p", "top_p", "min_p", "temperature"]
        if api_type == "llamacpp"
        else None,
        "stopping_strings": stops,
        "stop": stops,
        "truncation_length": max_context,
        "ban_eos_token": False,
        "skip_special_tokens": True,
        "top_a": 0,
        "tfs": 1,
        "mirostat_mode": 0,
        "mirostat_tau": 5,
        "mirostat_eta": 0.1,
        "custom_token_bans": s["banned_tokens"],
        "banned_strings": s["banned_strings"],
        "api_type": api_type,
        "api_server": "http://127.0.0.1:5001",
        "legacy_api": False,
        "xtc_threshold": s["xtc_threshold"],
        "xtc_probability": s["xtc_probability"],
    }
    if api_type == "koboldcpp":
        params["sampler_order"] = [6, 0, 1, 3, 4, 2, 5]
        params["grammar"] = ""
    if api_type == "tabby":
        params["n"] = s["n"]
    params.update(
        {  # nonAphroditeParams
            "rep_pen": s["rep_pen"],
            "rep_pen_range": s["rep_pen_range"],
            "repetition_penalty_range": s["rep_pen_range"],
            "seed": s["seed"],
            "guidance_scale": 1,
            "negative_prompt": "",
            "grammar_string": "",
            "json_schema": {} if api_type in ("tabby", "llamacpp") else None,
            "repeat_penalty": s["rep_pen"],
            "tfs_z": 1,
            "repeat_last_n": s["rep_pen_range"],
            "n_predict": max_tokens,
            "num_predict": max_tokens,
            "num_ctx": max_context,
            "mirostat": 0,
            "ignore_eos": False,
            "n_probs": 10 if probabilities else None,
            "rep_pen_slope": 1,
        }
    )
    if api_type == "tabby":
        params.update({"repetition_decay": 0, "temperature_last": True, "speculative_ngram": False})
    if s["logit_bias"]:
        params["logit_bias"] = s["logit_bias"]
    if api_type == "llamacpp":  # bias and token bans as [[id, bias]], [id, false] for a ban
        bias = [[int(k), v] for k, v in (params.get("logit_bias") or {}).items()]
        bans = [[int(t), False] for t in s["banned_tokens"].split(",") if t.strip()]
        params.update({"logit_bias": bias + bans, "grammar": s.get("grammar_string", ""), "cache_prompt": True})
        del params["json_schema"]  # empty: ST deletes it (a schema would delete the grammars instead)
    params["stream"] = stream
    params = {k: v for k, v in params.items() if v is not None}  # undefined
    return json.loads(json.dumps(params))  # as JSON.stringify leaves it


def kobold_body(prompt: str, max_length: int, stops, max_context: int = 4096, **overrides) -> dict:
    """The body SillyTavern's server posts to a KoboldAI (KoboldCpp) backend: ``this_settings`` of
    ``kobold.js`` from ``getKoboldGenerationData`` with ST's ``kai_settings`` defaults
    (``public/scripts/kai-settings.js``; KoboldCpp >= 1.48: every ``kai_flags`` feature on; the seed
    -1 is left out, ``sampler_seed: undefined``)."""
    body = {
        "prompt": prompt,
        "use_story": False,
        "use_memory": False,
        "use_authors_note": False,
        "use_world_info": False,
        "max_context_length": max_context,
        "max_length": max_length,
        "rep_pen": 1,
        "rep_pen_range": 0,
        "rep_pen_slope": 0.9,
        "temperature": 1,
        "tfs": 1,
        "top_a": 1,
        "top_k": 0,
        "top_p": 1,
        "min_p": 0,
        "typical": 1,
        "sampler_order": [0, 1, 2, 3, 4, 5, 6],
        "singleline": False,
        "use_default_badwordsids": False,
        "mirostat": 0,
        "mirostat_eta": 0.1,
        "mirostat_tau": 5,
        "grammar": "",
        "stop_sequence": stops,
    }
    body.update(overrides)
    return body
