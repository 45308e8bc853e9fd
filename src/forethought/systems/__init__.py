"""Built-in systems: continuous control tasks as pure JAX functions, and discrete mazes.

    >>> from forethought import systems
    >>> systems.names()
    >>> pendulum = systems.make("pendulum", mass=2.0)

Each continuous system is a `System` (see `base.py`); mazes are `Maze` arrays (see `mazes.py`).
Importing this package also registers every system as a Gymnasium env (`forethought/Pendulum-v0`).
"""

from __future__ import annotations

import importlib
from typing import Any

from forethought.errors import ForethoughtError
from forethought.systems.base import ContinuousSystem, System

# name -> "module:Class"; imported on first use so `forethought list` stays fast.
_REGISTRY: dict[str, str] = {
    "pendulum": "forethought.systems.pendulum:Pendulum",
}


def names() -> list[str]:
    """Names accepted by `make`, sorted."""
    return sorted(_REGISTRY)


def get_class(name: str) -> type:
    if name not in _REGISTRY:
        raise ForethoughtError(f"unknown system {name!r}; expected one of: {', '.join(names())}")
    module, attr = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


def make(name: str, **params: Any):
    """Build the system `name` with physical parameters `params` (its dataclass fields)."""
    cls = get_class(name)
    try:
        return cls(**params)
    except TypeError as error:
        import dataclasses
        fields = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ForethoughtError(
            f"bad parameters {sorted(params)} for system {name!r}: {error}; fields are: {fields}"
        ) from None


__all__ = ["System", "ContinuousSystem", "make", "names", "get_class"]
