"""PLACEHOLDER: being written."""
from .base_strategy import BaseStrategy


class AntiSlopStrategy(BaseStrategy):
    pass
