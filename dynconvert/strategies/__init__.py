"""Strategies, one module each, found by name through an open registry.

Adding one: write its module (see ``docs/adding-a-strategy.md``) and import it below.
"""

from dynconvert.strategies import blockdrop, cascade, early_exit, resolution, skipnet  # noqa: E402, F401, I001  (each registers itself)
from dynconvert.strategies.base import Strategy
from dynconvert.strategies.registry import get_strategy, list_strategies, register_strategy

__all__ = ["Strategy", "get_strategy", "list_strategies", "register_strategy"]
