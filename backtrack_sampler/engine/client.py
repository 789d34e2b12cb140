"""HTTP to a serving engine: one ``httpx.Client`` (thread-safe, pooled), streamed requests whose
server-sent events become ``Step``/``Finish`` objects, and clear ``EngineError``s for every
failure (unreachable, timeout, HTTP error, a stream broken off)."""

from __future__ import annotations

import json
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import httpx

from ..strategy.sampling import Sampling
from .apis import APIS, EngineAPI, Event
from .errors import EngineError


@dataclass
class EngineStats:
    """Work done through one client since it was made (all generations together)."""

    requests: int = 0
    steps: int = 0  # tokens the engine sent
    prompt_tokens: int = 0  # prompt tokens sent (sum over requests)
    cached_tokens: int = 0  # of those, served from the engine's prefix cache (when it says so)
    cache_reports: int = 0  # requests for which the engine reported its cache use
    first_tokens: int = 0  # streamed requests that gave a first token
    first_token_seconds: float = 0.0  # their time from sending to the first token, summed

    @property
    def mean_first_token_seconds(self) -> float:
        """The mean time a streamed request took to give its first token (0.0 before any): the
        price of each new request, e.g. after a rewind that changed the text."""
        return self.first_token_seconds / self.first_tokens if self.first_tokens else 0.0


class EngineClient:
    """Talks to one engine at ``url`` with the wire format ``engine_type`` (see ``APIS``).

    timeout: seconds to wait for a connection and for each piece of a response (so a stuck engine
    is reported instead of hanging).
    """

    def __init__(
        self,
        url: str,
        engine_type: str = "llama-server",
        timeout: float = 60.0,
        transport: Optional[httpx.BaseTransport] = None,
    ):
        if engine_type not in APIS:
            raise ValueError(f"unknown engine type {engine_type!r}: choose one of {', '.join(APIS)}")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the engine URL must start with http:// or https://, got {url!r}")
        self.url, self.api, self.timeout = url.rstrip("/"), APIS[engine_type], timeout
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self.http = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=limits,
            transport=transport,
        )
        self.stats = EngineStats()

    def close(self) -> None:
        self.http.close()

    def health(self, timeout: float) -> Optional[str]:
        """None when ``GET /health`` answers 200 within ``timeout`` seconds, else what went wrong."""
        try:
            status = self.http.get("/health", timeout=timeout).status_code
        except httpx.HTTPError as error:
            return f"{self.api.name} at {self.url} does not answer /health: {error!r}"
        return None if status == 200 else f"{self.api.name} at {self.url} answers /health with HTTP {status}"

    # --------------------------------------------------------------------------------------
    @contextmanager
    def stream(
        self, body: dict, sampling: Sampling, on_open: Optional[Callable[[Callable[[], None]], None]] = None
    ) -> Iterator[Iterator[Event]]:
        """POST ``body`` with streaming; yields the engine's events. Leaving the ``with`` block
        closes the connection, which makes the engine stop decoding this request. ``on_open``
        (optional) is given, once the engine answered, a function that cuts the connection from
        another thread (the read waiting in this one then ends with an EngineError)."""
        self.stats.requests += 1
        self.stats.prompt_tokens += len(body.get("prompt") or body.get("input_ids") or ())
        sent = time.perf_counter()
        with self._errors():
            response = self._send(self.http.build_request("POST", self.api.path, json=body), stream=True)
            try:
                if on_open is not None:
                    on_open(lambda: _cut(response))
                if response.status_code >= 400:
                    response.read()
                    raise EngineError(self._http_error(response))
                yield self._count(self.api.events(self._sse(response), sampling), sent)
            finally:
                response.close()

    def _send(self, request: httpx.Request, stream: bool = False) -> httpx.Response:
        """Send ``request``; once more on a fresh connection when a pooled keep-alive connection
        turns out to be closed by the engine before it answered (nothing was processed then)."""
        try:
            return self.http.send(request, stream=stream)
        except httpx.RemoteProtocolError:
            return self.http.send(request, stream=stream)

    def post(self, path: str, body: dict) -> dict:
        """A non-streamed POST; returns the JSON answer."""
        self.stats.requests += 1
        with self._errors():
            response = self._send(self.http.build_request("POST", path, json=body))
            if response.status_code >= 400:
                raise EngineError(self._http_error(response))
            return response.json()

    def get(self, path: str) -> dict:
        with self._errors():
            response = self._send(self.http.build_request("GET", path))
            if response.status_code >= 400:
                raise EngineError(self._http_error(response))
            return response.json()

    # --------------------------------------------------------------------------------------
    def _count(self, events: Iterator[Event], sent: float) -> Iterator[Event]:
        stats, first, reported = self.stats, True, False
        for event in events:
            if event.cached is not None and not reported:  # on the first step and again on the Finish: once
                stats.cached_tokens += event.cached
                stats.cache_reports += 1
                reported = True
            if hasattr(event, "token"):
                stats.steps += 1
                if first:
                    stats.first_tokens += 1
                    stats.first_token_seconds += time.perf_counter() - sent
                    first = False
            yield event

    def _sse(self, response: httpx.Response) -> Iterator[dict]:
        """The JSON payloads of a server-sent event stream (``data: {...}`` lines; pings and
        ``[DONE]`` skipped). A connection that ends early raises EngineError."""
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, ": ping" comments
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                yield json.loads(data)
            except json.JSONDecodeError:
                raise EngineError(f"{self.api.name} sent a malformed event: {data[:200]!r}") from None

    def _http_error(self, response: httpx.Response) -> str:
        try:
            message = EngineAPI.error(response.json()) or response.text
        except ValueError:
            message = response.text
        return f"{self.api.name} at {self.url} answered HTTP {response.status_code}: {message.strip()[:500]}"

    @contextmanager
    def _errors(self):
        try:
            yield
        except EngineError:
            raise
        except httpx.ConnectError as error:
            raise EngineError(f"cannot reach {self.api.name} at {self.url}: {error}") from None
        except httpx.TimeoutException:
            raise EngineError(f"{self.api.name} at {self.url} did not answer within {self.timeout:g} s") from None
        except (httpx.RemoteProtocolError, httpx.ReadError) as error:
            raise EngineError(f"{self.api.name} at {self.url} broke off the connection mid-answer ({error})") from None
        except httpx.HTTPError as error:
            raise EngineError(f"request to {self.api.name} at {self.url} failed: {error}") from None


def _cut(response: httpx.Response) -> None:
    """Shut the connection of a streamed ``response`` down (both ways): a read blocked on it in
    another thread returns at once and the engine sees the client gone. (Closing the socket would
    not wake the reader on Linux.) Without a socket (a test transport) nothing happens."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed
            pass
