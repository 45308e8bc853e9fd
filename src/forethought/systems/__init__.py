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
    "cartpole": "forethought.systems.cartpole:CartPole",
    "cartpole-balance": "forethought.systems.cartpole_balance:CartPoleBalance",
    "acrobot": "forethought.systems.acrobot:Acrobot",
    "double-integrator": "forethought.systems.linear:DoubleIntegrator",
    "linear": "forethought.systems.linear:Linear",
    "mountain-car": "forethought.systems.mountain_car:MountainCar",
    "dyna-maze": "forethought.systems.mazes:dyna_maze",
    "blocking-maze": "forethought.systems.mazes:blocking_maze",
    "shortcut-maze": "forethought.systems.mazes:shortcut_maze",
    "maze": "forethought.systems.mazes:Maze.from_layout",
}


def names() -> list[str]:
    """Names accepted by `make`, sorted."""
    return sorted(_REGISTRY)


def get_class(name: str):
    """The class (or factory function) behind `name`."""
    if name not in _REGISTRY:
        raise ForethoughtError(f"unknown system {name!r}; expected one of: {', '.join(names())}")
    module, attr = _REGISTRY[name].split(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def make(name: str, **params: Any):
    """Build the system `name` with physical parameters `params` (its dataclass fields)."""
    factory = get_class(name)
    try:
        return factory(**params)
    except TypeError as error:
        raise ForethoughtError(f"bad parameters {sorted(params)} for system {name!r}: {error}") from None



from forethought.systems.gym import SystemEnv, make_env, system_of  # noqa: E402  (registers envs)

__all__ = ["System", "ContinuousSystem", "SystemEnv", "make", "make_env", "names", "get_class",
           "system_of"]
