"""Strategies, one module each, found by name through an open registry."""

from dynconvert.strategies import blockdrop, early_exit, skipnet  # noqa: F401, E402  (each registers itself)
from dynconvert.strategies.registry import Strategy, get_strategy, list_strategies, register_strategy

__all__ = ["Strategy", "get_strategy", "list_strategies", "register_strategy"]
