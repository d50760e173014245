"""The strategy registry: a name maps to a Strategy class; outside code may register its own."""

from __future__ import annotations

from dynconvert.errors import DynconvertError
from dynconvert.strategies.base import Strategy

_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError("a strategy needs a name")
    if not issubclass(cls, Strategy):
        raise TypeError(f"{cls.__name__} must derive from dynconvert.strategies.Strategy")
    _REGISTRY[cls.name] = cls
    return cls


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class registered under ``name`` (underscores and hyphens are the same)."""
    key = name.replace("_", "-")
    if key not in _REGISTRY:
        raise DynconvertError(f"unknown strategy '{name}'; available: {', '.join(list_strategies())}")
    return _REGISTRY[key]


def list_strategies() -> list[str]:
    """Names of all registered strategies."""
    return sorted(_REGISTRY)
