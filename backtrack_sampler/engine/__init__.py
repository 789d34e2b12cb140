"""Serving engines as backends: llama.cpp's llama-server, vLLM and SGLang, driven over HTTP with
token ids end to end. Every strategy works; the engine drafts tokens and the strategy's
distribution is enforced exactly by speculative acceptance (see ``loop``: ``EngineBackend``, the
engine behind the one driver's step protocol)::

    from backtrack_sampler import AntiSlopStrategy, BacktrackSampler
    from backtrack_sampler.engine import EngineProvider

    provider = EngineProvider("http://127.0.0.1:8080", "llama-server")  # tokenizer: the embedded model
    sampler = BacktrackSampler(provider, AntiSlopStrategy(provider, ["a tapestry of"]))
    print(provider.decode(list(sampler.generate("Once upon a time", max_new_tokens=100))))
"""

from .acceptance import accept
from .apis import APIS, Finish, Step
from .client import EngineClient, EngineStats
from .errors import EngineError
from .loop import Draft, EngineBackend, EngineLoop
from .provider import ENGINE_TYPES, EngineProvider, connect, load_engine_provider

__all__ = [
    "APIS",
    "ENGINE_TYPES",
    "Draft",
    "EngineBackend",
    "EngineClient",
    "EngineError",
    "EngineLoop",
    "EngineProvider",
    "EngineStats",
    "Finish",
    "Step",
    "accept",
    "connect",
    "load_engine_provider",
]
