"""A fake serving engine on 127.0.0.1 that speaks the wire formats of llama-server, vLLM and SGLang,
with a model whose distribution is known (a function of the token sequence).

The event shapes are hand-written from the engines' sources (no engine ran to capture them):
  llama-server (llama.cpp vendored in llama-cpp-python 0.3.36, tools/server/):
    server-task.cpp:1047-1071 (streamed partial: index, content, tokens, stop, id_slot,
    tokens_predicted, tokens_evaluated, timings, completion_probabilities), server-task.cpp:264-300
    (completion_probabilities entries: id, token, bytes, prob|logprob, top_probs|top_logprobs),
    server-task.cpp:339-362 (final: stop true, stop_type "eos"|"limit"|"word", tokens, timings),
    server-common.cpp:84-97 (timings: cache_n, prompt_n, ...), server-common.cpp:1644-1650
    ("data: <json>\\n\\n"; /completion sends no [DONE]: server-context.cpp:4419-4426),
    server-common.cpp:70-77 (errors: {"error": {"code", "message", "type"}}).
  vLLM 0.33.0: vllm/entrypoints/openai/completion/serving.py:437-487 (stream chunk: id, object,
    created, model, choices[{index, text, logprobs, finish_reason, stop_reason, token_ids}]),
    serving.py:714-790 (logprobs: text_offset, token_logprobs, tokens "token_id:N", top_logprobs
    {"token_id:N": lp}, -inf written as -9999.0), serving.py:547-558 (usage chunk, "data: [DONE]");
    vllm/v1/sample/sampler.py:308-335 (processed logprobs: after temperature, min-p, top-k/top-p).
  SGLang 0.5.23: sglang/srt/managers/tokenizer_manager.py:2629-2670 (stream chunk: text,
    output_ids (cumulative), meta_info), tokenizer_manager.py:2840-2975 (output_token_logprobs
    [[lp, id, null]], output_top_logprobs [[[lp, id, null], ...]], cumulative),
    tokenizer_manager.py:2553-2558 (completion_tokens, cached_tokens), layers/sampler.py:208-300
    (logprobs: log-softmax(logits / T), before top-k/top-p), entrypoints/http_server.py:950-975
    ("data: <json>\\n\\n", errors {"error": {...}}, "data: [DONE]").
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Optional

import numpy as np

from backtrack_sampler.strategy.sampling import filter_logits


# ---- event builders (one per engine), shared by the fixtures and the fake server ----------------
def llama_entry(token: int, cand: List[tuple], post: bool) -> dict:
    """completion_probabilities[0]: cand = [(id, prob)] most likely first (post) or [(id, logprob)] (pre)."""
    if post:
        value = dict(cand).get(token, 0.0)
        return {
            "id": token,
            "token": f"<{token}>",
            "bytes": [],
            "prob": value,
            "top_probs": [{"id": i, "token": f"<{i}>", "bytes": [], "prob": p} for i, p in cand],
        }
    value = dict(cand).get(token, -3.4028234663852886e38)
    return {
        "id": token,
        "token": f"<{token}>",
        "bytes": [],
        "logprob": value,
        "top_logprobs": [{"id": i, "token": f"<{i}>", "bytes": [], "logprob": lp} for i, lp in cand],
    }


def llama_partial(token: int, entry: dict, n: int, prompt: int, cached: int) -> dict:
    return {
        "index": 0,
        "content": f"<{token}>",
        "tokens": [token],
        "stop": False,
        "id_slot": 0,
        "tokens_predicted": n,
        "tokens_evaluated": prompt,
        "timings": {"cache_n": cached, "prompt_n": prompt - cached, "prompt_ms": 1.0, "predicted_n": n},
        "completion_probabilities": [entry],
    }


def llama_final(tokens: List[int], stop_type: str, prompt: int, cached: int) -> dict:
    return {
        "index": 0,
        "content": "",
        "tokens": tokens,
        "id_slot": 0,
        "stop": True,
        "model": "fake",
        "tokens_predicted": len(tokens),
        "tokens_evaluated": prompt,
        "stop_type": stop_type,
        "stopping_word": "",
        "tokens_cached": prompt + len(tokens),
        "truncated": False,
        "timings": {"cache_n": cached, "prompt_n": prompt - cached, "predicted_n": len(tokens)},
    }


def vllm_chunk(tokens: List[int], tops: List[Dict[int, float]], own: List[float], finish: Optional[str]) -> dict:
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 0,
        "model": "fake",
        "choices": [
            {
                "index": 0,
                "text": "".join(f"<{t}>" for t in tokens),
                "logprobs": {
                    "text_offset": list(range(len(tokens))),
                    "token_logprobs": [max(v, -9999.0) for v in own],
                    "tokens": [f"token_id:{t}" for t in tokens],
                    "top_logprobs": [{f"token_id:{i}": max(v, -9999.0) for i, v in top.items()} for top in tops],
                },
                "finish_reason": finish,
                "stop_reason": None,
                "token_ids": tokens,
            }
        ],
    }


def sglang_chunk(
    output_ids: List[int], own: List[tuple], tops: List[List[tuple]], prompt: int, cached: int, finish: Optional[dict]
) -> dict:
    return {
        "text": None if finish is None else "".join(f"<{t}>" for t in output_ids),
        "output_ids": list(output_ids),
        "meta_info": {
            "id": "fake",
            "finish_reason": finish,
            "prompt_tokens": prompt,
            "completion_tokens": len(output_ids),
            "cached_tokens": cached,
            "output_token_logprobs": [[lp, t, None] for lp, t in own],
            "output_top_logprobs": [[[lp, t, None] for lp, t in top] for top in tops],
        },
    }


# ---- the fake engine --------------------------------------------------------------------------
class FakeEngine:
    """Serves ``engine_type``'s API on 127.0.0.1 (a free port). The model: ``logits_fn(tokens)``
    gives the next-token logits (numpy, vocabulary-sized); sampling uses backtrack_sampler's own
    filters and a rng seeded by the request's seed. Faults: after ``die_after`` tokens the
    connection is cut without a final event; ``fail`` answers HTTP 500; ``stall`` seconds of
    silence before answering; ``stream_error`` sends an error event after the first token. Pacing:
    ``hold_after`` tokens of a stream are sent, then it waits for ``release`` (set); ``token_delay``
    seconds pass before each streamed token."""

    def __init__(
        self,
        engine_type: str,
        logits_fn: Callable[[List[int]], np.ndarray],
        vocab_size: int,
        eos: int = 1,
        n_ctx: int = 4096,
    ):
        self.engine_type, self.logits_fn, self.vocab_size, self.eos, self.n_ctx = (
            engine_type,
            logits_fn,
            vocab_size,
            eos,
            n_ctx,
        )
        self.die_after: Optional[int] = None
        self.fail = False
        self.stall = 0.0
        self.stream_error = False
        self.gap_at: Optional[int] = None  # llama-server: the token at this index of a stream is not sent
        self.opaque_single = False  # llama-server: a one-token answer comes without probabilities
        self.hold_after: Optional[int] = None  # a stream sends this many tokens, then waits for ``release``
        self.release = threading.Event()
        self.token_delay = 0.0  # seconds before each streamed token (a slower model)
        self.healthy = True  # what GET /health says
        self.requests: List[dict] = []
        self.decoded = 0
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_GET(self):
                engine._get(self)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                engine.requests.append(body)
                engine._post(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --------------------------------------------------------------------------------------
    def _json(self, handler, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _get(self, handler) -> None:
        if handler.path == "/health":  # all three engines: 200 when ready (llama-server: 503 while loading)
            self._json(handler, 200 if self.healthy else 503, {"status": "ok" if self.healthy else "loading"})
        elif handler.path == "/props":
            self._json(handler, 200, {"default_generation_settings": {"n_ctx": self.n_ctx}, "total_slots": 4})
        elif handler.path == "/v1/models":
            model = {"id": "fake", "object": "model", "max_model_len": self.n_ctx}
            if self.engine_type == "llama-server":
                model["meta"] = {"n_vocab": self.vocab_size, "n_ctx": self.n_ctx}
            self._json(handler, 200, {"object": "list", "data": [model]})
        elif handler.path == "/model_info":
            self._json(handler, 200, {"model_path": "fake", "served_model_name": "fake", "is_generation": True})
        else:
            self._json(handler, 404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})

    def _sampling(self, body: dict):
        if self.engine_type == "sglang":
            params = body["sampling_params"]
            return (
                (params["temperature"], max(params["top_k"], 0), params["top_p"], params["min_p"]),
                params["max_new_tokens"],
                params.get("sampling_seed"),
                body["input_ids"],
                body["top_logprobs_num"],
            )
        llama = self.engine_type == "llama-server"
        seed = body.get("seed")
        return (
            (body["temperature"], body["top_k"], body["top_p"], body["min_p"]),
            body["n_predict"] if llama else body["max_tokens"],
            None if seed in (None, -1) else seed,
            body["prompt"],
            body["n_probs"] if llama else body["logprobs"],
        )

    def _post(self, handler, body: dict) -> None:
        if self.stall:
            time.sleep(self.stall)
        if self.fail:
            return self._json(
                handler, 500, {"error": {"code": 500, "message": "fake engine failure", "type": "server_error"}}
            )
        sampling, n, seed, prompt, k = self._sampling(body)
        rng = np.random.default_rng(seed)
        if not body.get("stream", False):
            return self._json(handler, 200, self._single(prompt, sampling, k, rng))
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()
        tokens, out, own_sg, tops_sg = list(prompt), [], [], []
        try:
            for i in range(n):
                if self.die_after is not None and i >= self.die_after:
                    handler.wfile.flush()
                    handler.connection.shutdown(socket.SHUT_RDWR)  # the engine dies mid-stream
                    return
                if self.hold_after is not None and i >= self.hold_after:
                    self.release.wait(30)
                if self.token_delay:
                    time.sleep(self.token_delay)
                if self.stream_error and i == 1:
                    self._send(
                        handler, {"error": {"code": 500, "message": "fake error mid-stream", "type": "server_error"}}
                    )
                    return
                token, post, raw = self._draw(tokens, sampling, k, rng)
                self.decoded += 1
                tokens.append(token)
                out.append(token)
                done = token == self.eos or i == n - 1
                self._emit(
                    handler,
                    token,
                    out,
                    post,
                    raw,
                    sampling[0],
                    len(prompt),
                    done,
                    "stop" if token == self.eos else "length",
                    own_sg,
                    tops_sg,
                )
                if done:
                    break
            if self.engine_type != "llama-server":
                handler.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            return  # the client closed the stream: stop decoding

    def _send(self, handler, payload: dict) -> None:
        handler.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        handler.wfile.flush()

    def _draw(self, tokens, sampling, k, rng):
        """The drawn token, the post-sampling candidates [(id, prob)] and the pre-filter ones
        [(id, log-softmax(logits / T))] (T = 1 for greedy), k of each, most likely first."""
        logits = np.asarray(self.logits_fn(tokens), dtype=np.float32)
        temperature = sampling[0]
        ids, probs = filter_logits(logits, *sampling)
        token = int(ids[0]) if temperature == 0 else int(rng.choice(ids, p=probs))
        scaled = (logits.astype(np.float64) - logits.max()) / (temperature or 1.0)
        logz = math.log(np.exp(scaled).sum())
        order = np.argsort(-logits, kind="stable")[:k]
        pre = [(int(i), float(scaled[i] - logz)) for i in order]
        post = [(int(i), float(p)) for i, p in list(zip(ids, probs))[:k]]
        return token, post, pre

    def _emit(self, handler, token, out, post, pre, temperature, prompt, done, reason, own_sg, tops_sg):
        cached = max(prompt - 1, 0)
        if self.engine_type == "llama-server":
            entry = llama_entry(token, post if temperature > 0 else pre, temperature > 0)
            if len(out) - 1 != self.gap_at:  # (server-context.cpp:1826-1859: incomplete UTF-8 is not sent)
                self._send(handler, llama_partial(token, entry, len(out), prompt, cached))
            if done:
                self._send(handler, llama_final(out, "eos" if reason == "stop" else "limit", prompt, cached))
        elif self.engine_type == "vllm":  # processed logprobs: the kept tokens, then filtered ones at -inf
            if temperature > 0:
                top = {i: math.log(p) for i, p in post}
                for i, _ in pre:
                    if len(top) < len(pre):
                        top.setdefault(i, -math.inf)
            else:
                top = dict(pre)
            own = top.get(token, -math.inf)
            top.setdefault(token, own)  # the sampled token is always listed (K + 1 entries at most)
            self._send(handler, vllm_chunk([token], [top], [own], reason if done else None))
        else:
            own_sg.append((dict(pre).get(token, -3.4e38), token))
            tops_sg.append([(lp, i) for i, lp in pre])
            finish = None
            if done:
                finish = (
                    {"type": "stop", "matched": token} if reason == "stop" else {"type": "length", "length": len(out)}
                )
            self._send(handler, sglang_chunk(out, own_sg, tops_sg, prompt, cached, finish))

    def _single(self, prompt, sampling, k, rng) -> dict:
        token, post, pre = self._draw(list(prompt), sampling, k, rng)
        final = llama_final([token], "limit", len(prompt), 0)
        if not self.opaque_single:
            final["completion_probabilities"] = [llama_entry(token, post if sampling[0] > 0 else pre, sampling[0] > 0)]
        return final
