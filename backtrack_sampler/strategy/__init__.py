"""Sampling strategies: one short file each, subclassing BaseStrategy."""
