"""PLACEHOLDER: being written."""
from .base_strategy import BaseStrategy


class AdaptiveTemperatureStrategy(BaseStrategy):
    pass
