"""Validation of option dataclasses: the one place where recipe values are read and checked.

Every config dataclass (the recipe's sections and each strategy's ``options``) declares its
fields with :func:`option` (a default and a help text) and checks them in ``validate()`` with
:func:`check_range` and :func:`check_choice`; :func:`from_dict` builds one from a mapping,
rejecting unknown keys and wrong types with the key's full name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from dynconvert.errors import DynconvertError


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs) -> Any:  # noqa: A002
    """A dataclass field with a help text (shown by ``dynconvert --list-options``).

    A list or dict default is copied for each instance. Example::

        epochs: int = option(20, "passes over the fit split")
    """
    metadata = {"help": help}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def describe_options(cls, prefix: str = "") -> list[dict[str, Any]]:
    """One entry per field of dataclass ``cls`` (nested sections flattened): name, type, default, help."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(describe_options(hint, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        rows.append(
            {
                "name": f"{prefix}{f.name}",
                "type": _type_name(hint),
                "default": default,
                "help": f.metadata.get("help", ""),
            }
        )
    return rows


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(hint))
        return f"{origin.__name__}[{args}]"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def from_dict(cls, data: dict[str, Any] | None, where: str = "", source: str | None = None, moved=None):
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys and wrong types.

    ``where`` is the section's dotted name (for messages), ``source`` the file it came from,
    ``moved`` a mapping of retired dotted keys to where they live now.
    """
    data = data or {}
    if not isinstance(data, dict):
        raise DynconvertError(f"{_where(where, source)} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = join(where, key)
        if key not in valid:
            if moved and name in moved:
                raise DynconvertError(f"recipe key '{name}'{_in(source)} has moved: set '{moved[name]}' instead")
            raise DynconvertError(
                f"unknown recipe key '{name}'{_in(source)}; valid keys here: {', '.join(sorted(valid))}"
            )
        kwargs[key] = _coerce(hints[key], value, name, source, moved)
    return cls(**kwargs)


def _coerce(hint, value, key: str, source: str | None, moved):
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key, source, moved)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, source, moved)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(args[0], v, key, source, moved) for v in value] if args else value
    if origin is dict or hint is Any:
        if origin is dict and not isinstance(value, dict):
            raise DynconvertError(f"recipe key '{key}'{_in(source)} must be a mapping")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint is str and isinstance(value, str):
        return value
    raise DynconvertError(f"recipe key '{key}'{_in(source)} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def check_range(key: str, value, low, high) -> None:
    """Raise a ``DynconvertError`` naming ``key`` unless ``low <= value <= high`` (None: no bound)."""
    if value is None:
        return
    if value != value:  # NaN passes every comparison
        raise DynconvertError(f"recipe key '{key}' must be a number, got NaN")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise DynconvertError(f"recipe key '{key}' must be {bounds}, got {value}")


def check_choice(key: str, value, choices) -> None:
    """Raise a ``DynconvertError`` naming ``key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise DynconvertError(f"recipe key '{key}' must be one of {', '.join(choices)}, got {value!r}")


def join(where: str, key: str) -> str:
    """``where.key``, or ``key`` at the top level."""
    return f"{where}.{key}" if where else key


def _where(where: str, source: str | None) -> str:
    return f"recipe section '{where or '(top)'}'{_in(source)}"


def _in(source: str | None) -> str:
    return f" in {source}" if source else ""
