"""The strategy registry: a name maps to a Strategy class; outside code may register its own."""

from __future__ import annotations

from typing import ClassVar

from dynconvert.errors import DynconvertError

_REGISTRY: dict[str, type[Strategy]] = {}


class Strategy:
    """A way to make a static network dynamic.

    A strategy describes its own config (``config_class``) and implements the steps of the
    pipeline that differ between strategies: ``prepare`` (plan + passes), ``fit``
    (train + calibrate) and ``load_runtime`` (rebuild the dynamic model from saved state).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError("a strategy needs a name")
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
