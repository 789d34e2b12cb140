"""PLACEHOLDER: being written."""
from .base_strategy import BaseStrategy


class CreativeWritingStrategy(BaseStrategy):
    pass
