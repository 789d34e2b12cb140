"""backtrack_sampler: LLM sampling strategies that can rewind and revise the tokens they just generated.

from backtrack_sampler import BacktrackSampler, AntiSlopStrategy
from backtrack_sampler.provider.llamacpp_provider import LlamacppProvider
"""

from . import _moved  # noqa: F401  (4.0 module paths keep working)
from .core.sampler import BacktrackSampler, GenerationStats, RewindEvent
from .provider.base_provider import BaseProvider
from .strategy.adaptive_temperature_strategy import AdaptiveTemperatureStrategy
from .strategy.antislop_strategy import AntiSlopStrategy
from .strategy.base_strategy import BaseStrategy
from .strategy.chain_strategy import ChainStrategy
from .strategy.confidence_strategy import ConfidenceStrategy
from .strategy.creative_writing_strategy import CreativeWritingStrategy
from .strategy.debug_strategy import DebugStrategy
from .strategy.dry_strategy import DryStrategy
from .strategy.grammar_strategy import GrammarStrategy
from .strategy.human_guidance_strategy import HumanGuidanceStrategy
from .strategy.logit_bias_strategy import LogitBiasStrategy
from .strategy.penalty_strategy import PenaltyStrategy
from .strategy.repetition_strategy import RepetitionStrategy
from .strategy.replace_strategy import ReplaceStrategy
from .strategy.typical_strategy import TypicalStrategy
from .strategy.xtc_strategy import XtcStrategy

__version__ = "4.0.0"

_PROVIDERS = {
    "LlamacppProvider": ".provider.llamacpp_provider",
    "TransformersProvider": ".provider.transformers_provider",
    "FakeProvider": ".provider.fake_provider",
}


def __getattr__(name):  # providers import their backend only when asked for
    if name in _PROVIDERS:
        import importlib

        return getattr(importlib.import_module(_PROVIDERS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BacktrackSampler",
    "GenerationStats",
    "RewindEvent",
    "BaseProvider",
    "BaseStrategy",
    "AdaptiveTemperatureStrategy",
    "AntiSlopStrategy",
    "ChainStrategy",
    "ConfidenceStrategy",
    "CreativeWritingStrategy",
    "DebugStrategy",
    "DryStrategy",
    "GrammarStrategy",
    "HumanGuidanceStrategy",
    "LogitBiasStrategy",
    "PenaltyStrategy",
    "RepetitionStrategy",
    "ReplaceStrategy",
    "TypicalStrategy",
    "XtcStrategy",
    *_PROVIDERS,
]
