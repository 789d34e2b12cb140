"""The wire formats of the serving engines: how to ask each one for a chunk of tokens (as token ids,
with the top-K probabilities at every position) and how to read its streamed answer.

Each API turns a request into ``(path, json body)`` and an event stream into ``Step`` objects (one
per generated token) and one final ``Finish``. Field names were checked against the engines'
sources: llama.cpp as vendored in llama-cpp-python 0.3.36 (tools/server/server-schema.cpp,
server-task.cpp, server-context.cpp), vLLM 0.33.0 (vllm/entrypoints/openai/completion/protocol.py
and serving.py, vllm/v1/sample/sampler.py) and SGLang 0.5.23 (sglang/srt/managers/tokenizer_manager.py,
sglang/srt/layers/sampler.py).

What the numbers of a ``Step`` mean (``kind``):
  "post": log-probabilities of the distribution the engine sampled the token from (after
      temperature, top-k, top-p, min-p); tokens it filtered out are absent.
  "raw": log-softmax of the model's logits (no temperature, no filter): used for greedy requests.
  "tempered": log-softmax of logits / temperature, before top-k/top-p/min-p (SGLang).
  "opaque": the engine reported no probabilities for this token (llama-server skips tokens that
      end in an incomplete UTF-8 character); ``ids`` holds only the token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np

from ..strategy.sampling import Sampling
from .errors import EngineError

FLOOR = -9999.0  # at or below: absent. Engines write log(0) as -9999.0 (vLLM) or the lowest float (llama.cpp, SGLang): treat as absent


@dataclass
class Step:
    """One generated token and the candidates the engine reported at its position."""

    token: int
    ids: np.ndarray  # candidate token ids (the token itself included)
    logp: np.ndarray  # their log-probabilities (see ``kind``), float64
    kind: str
    cached: Optional[int] = None  # prompt tokens the engine served from its prefix cache (first step of a request)


@dataclass
class Finish:
    """The engine ended the request: ``reason`` "stop" (an end-of-generation token or stop string),
    "length" (the token budget), or "gap" (llama-server skipped tokens: ask again one token at a time)."""

    reason: str
    cached: Optional[int] = None


Event = Union[Step, Finish]


def _step(token: int, pairs: Iterable[Tuple[int, Optional[float]]], kind: str, cached: Optional[int] = None) -> Step:
    seen = {}
    for tid, value in pairs:
        if value is not None and value > FLOOR and math.isfinite(value):
            seen[int(tid)] = float(value)
    if token not in seen:
        kind = kind if seen else "opaque"  # the sampled token's own value is missing: keep it as a draft
        seen[token] = min(seen.values()) if seen else 0.0
    ids = np.fromiter(seen.keys(), np.int64, len(seen))
    return Step(token, ids, np.fromiter(seen.values(), np.float64, len(seen)), kind, cached)


def step_from_arrays(token: int, ids: np.ndarray, logp: np.ndarray, kind: str, cached: Optional[int] = None) -> Step:
    """A Step from arrays of candidates (vLLM's ``LogprobsLists`` row: the sampled token first, then
    the top K, which may repeat it): what ``_step`` does for pairs, without a Python loop."""
    keep = (logp > FLOOR) & np.isfinite(logp)
    ids, logp = ids[keep].astype(np.int64), logp[keep].astype(np.float64)
    ids, first = np.unique(ids, return_index=True)
    logp = logp[first]
    if not (ids == token).any():  # the sampled token's own value is missing: keep it as a draft
        value = logp.min() if len(logp) else 0.0
        kind = kind if len(logp) else "opaque"
        ids, logp = np.append(ids, token), np.append(logp, value)
    return Step(int(token), ids, logp, kind, cached)


def _error_message(payload) -> str:
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    if error:
        return str(error)
    if isinstance(payload, dict) and payload.get("object") == "error":
        return str(payload.get("message"))
    return str(payload)[:500]


class EngineAPI:
    """Base of the three wire formats."""

    name = ""
    path = ""

    def body(
        self,
        tokens: List[int],
        n: int,
        sampling: Sampling,
        k: int,
        seed: Optional[int],
        model: Optional[str],
        slot: int = -1,
    ) -> dict:
        """The request for ``n`` tokens after ``tokens``; ``slot``: llama-server's ``id_slot`` (the
        other engines place sequences themselves)."""
        raise NotImplementedError

    def events(self, payloads: Iterator[dict], sampling: Sampling) -> Iterator[Event]:
        raise NotImplementedError

    @staticmethod
    def error(payload) -> Optional[str]:
        """The error message in a streamed or returned payload, or None."""
        if isinstance(payload, dict) and ("error" in payload or payload.get("object") == "error"):
            return _error_message(payload)
        return None


class LlamaServerAPI(EngineAPI):
    """llama.cpp's ``llama-server``: ``POST /completion`` with ``prompt`` as token ids.

    Sampling: the chain is sent explicitly (``samplers``: top_k, temperature, min_p, top_p, then
    llama.cpp's final draw), the same filters in an equivalent order to backtrack_sampler's own
    (temperature, min-p, top-k, top-p; top-k and min-p commute with the others), with no
    penalties, DRY, XTC or typical-p. ``post_sampling_probs`` returns the probabilities of the
    distribution the token was drawn from (``n_probs`` of them); for greedy requests the
    pre-sampling probabilities (softmax of the logits) are asked for instead, so that a strategy
    sees the alternatives. ``cache_prompt`` keeps the prefix in the slot's KV cache; ``id_slot`` is
    the slot the engine backend keeps for the generation (-1, the server's choice, when every slot is
    taken): a request after a rewind then finds its whole prefix cached, and waits in the server's
    queue only until the stream it replaces is cancelled, instead of decoding beside it in another
    slot (bench/engine_bench.py, 50,046-phrase AntiSlop: 0.71-0.74 -> 0.89 of the engine's speed).
    ``timings_per_token`` reports the cached prefix length (``timings.cache_n``) with the first
    token. Token-id prompts get no BOS from the server (tokenize_mixed in server-common.cpp adds
    specials only to strings).
    """

    name = "llama-server"
    path = "/completion"

    def body(self, tokens, n, sampling, k, seed, model=None, slot=-1, stream=True):
        temperature, top_k, top_p, min_p = sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p
        return {
            "prompt": tokens,
            "n_predict": n,
            "stream": stream,
            "cache_prompt": True,
            "id_slot": slot,
            "n_probs": k,
            "post_sampling_probs": temperature > 0,
            "return_tokens": True,
            "timings_per_token": True,
            "samplers": ["top_k", "temperature", "min_p", "top_p"],
            "temperature": temperature,
            "top_k": top_k or 0,
            "top_p": 1.0 if top_p is None else top_p,
            "min_p": min_p or 0.0,
            "seed": -1 if seed is None else seed,
            "min_keep": 0,
            "repeat_penalty": 1.0,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "dry_multiplier": 0.0,
            "xtc_probability": 0.0,
            "typical_p": 1.0,
            "top_n_sigma": -1.0,
            "dynatemp_range": 0.0,
            "mirostat": 0,
            "ignore_eos": False,
            "n_indent": 0,
            "t_max_predict_ms": 0,
        }

    def _entry(self, entry: dict, token: int, post: bool, cached=None) -> Step:
        """A ``completion_probabilities`` entry (server-task.cpp, probs_vector_to_json) as a Step."""
        if post:  # {"id", "prob", "top_probs": [{"id", "prob"}, ...]}
            pairs = [(c["id"], math.log(c["prob"]) if c["prob"] > 0 else None) for c in entry.get("top_probs", ())]
            own = entry.get("prob")
            pairs.append((token, math.log(own) if own else None))
        else:  # {"id", "logprob", "top_logprobs": [{"id", "logprob"}, ...]}
            pairs = [(c["id"], c["logprob"]) for c in entry.get("top_logprobs", ())]
            pairs.append((token, entry.get("logprob")))
        return _step(token, pairs, "post" if post else "raw", cached)

    def events(self, payloads, sampling):
        """Streamed ``/completion`` events (server-task.cpp, to_json_non_oaicompat): one per token,
        ``{"tokens": [id], "tokens_predicted": n, "completion_probabilities": [entry], "timings": ...}``,
        then ``{"stop": true, "stop_type": "eos"|"limit"|"word", ...}``. Tokens that leave an
        incomplete UTF-8 character are not streamed (server-context.cpp, process_token); the
        next event's ``tokens_predicted`` then jumps, which ends this request with a "gap"."""
        post = sampling.temperature > 0
        seen, cached = 0, None
        for event in payloads:
            message = self.error(event)
            if message is not None:
                raise EngineError(f"llama-server error: {message}")
            if cached is None and isinstance(event.get("timings"), dict):
                cached = event["timings"].get("cache_n")
            if event.get("stop"):
                if event.get("tokens_predicted", seen) > seen:  # the last tokens were not streamed
                    yield Finish("gap", cached)
                else:
                    yield Finish("stop" if event.get("stop_type") in ("eos", "word") else "length", cached)
                return
            tokens = event.get("tokens") or []
            if not tokens:
                continue
            predicted = event.get("tokens_predicted", seen + 1)
            if predicted != seen + 1 or len(tokens) != 1:
                yield Finish("gap", cached)
                return
            seen = predicted
            entries = event.get("completion_probabilities") or [{}]
            yield self._entry(entries[0], tokens[0], post, cached if seen == 1 else None)

    def single(self, payload: dict, sampling: Sampling) -> Step:
        """The one token of a non-streamed ``n_predict: 1`` answer (used after a gap)."""
        message = self.error(payload)
        if message is not None:
            raise EngineError(f"llama-server error: {message}")
        tokens = payload.get("tokens") or []
        if len(tokens) != 1:
            raise EngineError(f"llama-server returned {len(tokens)} tokens for a one-token request")
        entries = payload.get("completion_probabilities") or []
        if entries and entries[0].get("id") == tokens[0]:
            return self._entry(entries[0], tokens[0], sampling.temperature > 0)
        return _step(tokens[0], [], "opaque")


class VLLMAPI(EngineAPI):
    """vLLM's OpenAI-compatible ``POST /v1/completions`` with ``prompt`` as token ids.

    ``return_token_ids`` gives the ids of each streamed chunk (``choices[0].token_ids``),
    ``return_tokens_as_token_ids`` names the ``top_logprobs`` keys ``"token_id:N"``, ``logprobs``
    is K (the server's ``--max-logprobs`` must be >= K). Started with ``--logprobs-mode
    processed_logprobs``, the log-probabilities are those after temperature, min-p, top-k and
    top-p (v1/sample/sampler.py; filtered tokens are -9999.0), i.e. the distribution sampled from;
    for greedy requests they are the log-softmax of the logits. Every sampling field is sent, so
    the model's generation_config does not leak in (or start it with ``--generation-config vllm``).
    """

    name = "vllm"
    path = "/v1/completions"

    def body(self, tokens, n, sampling, k, seed, model=None, slot=-1):
        temperature, top_k, top_p, min_p = sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p
        body = {
            "prompt": tokens,
            "max_tokens": n,
            "stream": True,
            "logprobs": k,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            "temperature": temperature,
            "top_k": top_k or 0,
            "top_p": 1.0 if top_p is None else top_p,
            "min_p": min_p or 0.0,
            "repetition_penalty": 1.0,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "skip_special_tokens": False,
            "stream_options": {"include_usage": True},
        }
        if model:
            body["model"] = model
        if seed is not None:
            body["seed"] = seed
        return body

    def events(self, payloads, sampling):
        """Chunks ``{"choices": [{"token_ids": [...], "logprobs": {"token_logprobs": [...],
        "top_logprobs": [{"token_id:N": lp, ...}, ...]}, "finish_reason": null|"stop"|"length"}]}``
        (completion/serving.py, completion_stream_generator), an optional usage chunk, ``[DONE]``."""
        kind = "post" if sampling.temperature > 0 else "raw"
        finish, cached = None, None
        for chunk in payloads:
            message = self.error(chunk)
            if message is not None:
                raise EngineError(f"vLLM error: {message}")
            details = (chunk.get("usage") or {}).get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                cached = details["cached_tokens"]
            for choice in chunk.get("choices") or ():
                ids = choice.get("token_ids") or []
                logprobs = choice.get("logprobs") or {}
                tops = logprobs.get("top_logprobs") or []
                own = logprobs.get("token_logprobs") or []
                if ids and len(tops) != len(ids):
                    raise EngineError(
                        "vLLM returned token ids without their logprobs: is 'logprobs' allowed "
                        "(--max-logprobs) and is it vLLM >= 0.10.2 (return_token_ids)?"
                    )
                for i, token in enumerate(ids):
                    pairs = [(_token_id(key), value) for key, value in (tops[i] or {}).items()]
                    pairs.append((token, own[i] if i < len(own) else None))
                    yield _step(token, pairs, kind)
                if choice.get("finish_reason") is not None:
                    finish = "stop" if choice["finish_reason"] == "stop" else "length"
        if finish is None:
            raise EngineError("vLLM ended the stream without a finish_reason")
        yield Finish(finish, cached)


def _token_id(key: str) -> int:
    try:
        return int(key.rpartition(":")[2])
    except ValueError:
        raise EngineError(
            f"vLLM top_logprobs key {key!r} is not 'token_id:N': send return_tokens_as_token_ids"
        ) from None


class SGLangAPI(EngineAPI):
    """SGLang's native ``POST /generate`` with ``input_ids``, ``return_logprob`` and
    ``top_logprobs_num`` (managers/io_struct.py, GenerateReqInput).

    SGLang's log-probabilities are log-softmax(logits / temperature) before top-k/top-p/min-p
    (layers/sampler.py; greedy: log-softmax(logits)), so the engine's sampling distribution is
    rebuilt here by applying those filters to them (kind "tempered").
    """

    name = "sglang"
    path = "/generate"

    def body(self, tokens, n, sampling, k, seed, model=None, slot=-1):
        temperature, top_k, top_p, min_p = sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p
        params = {
            "max_new_tokens": n,
            "temperature": temperature,
            "top_k": top_k or -1,
            "top_p": 1.0 if top_p is None else top_p,
            "min_p": min_p or 0.0,
            "repetition_penalty": 1.0,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "skip_special_tokens": False,
        }
        if seed is not None:
            params["sampling_seed"] = seed
        return {
            "input_ids": tokens,
            "sampling_params": params,
            "stream": True,
            "return_logprob": True,
            "top_logprobs_num": k,
            "logprob_start_len": -1,
            "return_text_in_logprobs": False,
        }

    def events(self, payloads, sampling):
        """Chunks ``{"output_ids": [...], "meta_info": {"output_token_logprobs": [[lp, id, null], ...],
        "output_top_logprobs": [[[lp, id, null], ...], ...], "completion_tokens": n, "cached_tokens": c,
        "finish_reason": null|{"type": "stop"|"length", ...}}}`` (tokenizer_manager.py,
        _handle_batch_output); cumulative by default, deltas with --incremental-streaming-output."""
        kind = "tempered" if sampling.temperature > 0 else "raw"
        seen, cached, finish = 0, None, None
        for chunk in payloads:
            message = self.error(chunk)
            if message is not None:
                raise EngineError(f"SGLang error: {message}")
            meta = chunk.get("meta_info") or {}
            own = meta.get("output_token_logprobs") or []
            tops = meta.get("output_top_logprobs") or []
            total = meta.get("completion_tokens", len(own))
            start = 0 if len(own) == total else total - len(own)  # absolute index of own[0]: cumulative or deltas
            if meta.get("cached_tokens") is not None and cached is None:
                cached = meta["cached_tokens"]
            for i in range(max(seen - start, 0), len(own)):
                lp, token = own[i][0], int(own[i][1])
                pairs = [(c[1], c[0]) for c in (tops[i] if i < len(tops) and tops[i] else ())]
                pairs.append((token, lp))
                yield _step(token, pairs, kind, cached if seen == 0 else None)
                seen += 1
            reason = meta.get("finish_reason")
            if reason:
                finish = (
                    "length" if (reason.get("type") if isinstance(reason, dict) else reason) == "length" else "stop"
                )
                if isinstance(reason, dict) and reason.get("type") == "abort":
                    raise EngineError(f"SGLang aborted the request: {reason.get('message', reason)}")
        if finish is None:
            raise EngineError("SGLang ended the stream without a finish_reason")
        yield Finish(finish, cached)


APIS = {api.name: api for api in (LlamaServerAPI(), VLLMAPI(), SGLangAPI())}
