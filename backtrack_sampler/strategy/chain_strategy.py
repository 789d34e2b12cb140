"""PLACEHOLDER: being written."""
from .base_strategy import BaseStrategy


class ChainStrategy(BaseStrategy):
    pass
