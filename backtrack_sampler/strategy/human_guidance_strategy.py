"""PLACEHOLDER: being written."""
from .base_strategy import BaseStrategy


class HumanGuidanceStrategy(BaseStrategy):
    pass
