"""PLACEHOLDER: being written."""
from .base_strategy import BaseStrategy


class ReplaceStrategy(BaseStrategy):
    pass
