"""Gymnasium adapters, both ways.

- `SystemEnv` turns any `System` into a Gymnasium env: Box observations (the raw state, float32),
  Box actions clipped to the system's bounds, reward `-cost(x, u, t)`, `terminated` when
  `system.is_terminal(x_next)`, `truncated` after `system.horizon` steps (the system's horizon is
  the episode length, so `make_env("pendulum", horizon=200)` gives longer episodes).
- Every built-in system is registered as `forethought/<Name>-v0` (`forethought/Pendulum-v0`,
  `forethought/DynaMaze-v0`, ...) when `forethought` is imported; `gymnasium.make` then works,
  and so does `gymnasium.make("forethought:forethought/Pendulum-v0")` without importing first.
- `make_env(spec)` is what agents and the CLI call: a built-in name (`"pendulum"`) or any
  Gymnasium id behind a `gym:` prefix (`"gym:InvertedPendulum-v5"`).
"""

from __future__ import annotations

import difflib
from typing import Any

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np

from forethought import systems
from forethought.errors import ForethoughtError
from forethought.systems.base import System


@jax.jit
def _step(system: System, x, u, t):
    x_next = system.dynamics(x, u, t)
    return x_next, system.cost(x, u, t), system.is_terminal(x_next)


class SystemEnv(gymnasium.Env):
    """A Gymnasium env over a built-in `System` (see the module docstring).

    `reset(options={"state": x0})` starts from a given state instead of a draw from the system's
    initial-state distribution. `self.system` may be replaced between episodes (domain
    randomization does that); the jitted step does not recompile for new parameter values.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, system: System | str = "pendulum", render_mode: str | None = None,
                 render_size: int = 256, **params: Any):
        if isinstance(system, str):
            system = systems.make(system, **params)
        elif params:
            raise ForethoughtError(f"SystemEnv: params {sorted(params)} given with a System object;"
                                   " pass the system's name instead, or build the system with them")
        if not isinstance(system, System):
            raise ForethoughtError(f"SystemEnv: system must be a System or a name, got {type(system).__name__}")
        if render_mode not in (None, "rgb_array"):
            raise ForethoughtError(f"SystemEnv: render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.system = system
        self.render_mode = render_mode
        self.render_size = render_size
        # Real time where that is watchable; discrete-time maps (dt = 1) play at 10 frames/s.
        fps = min(max(int(round(1.0 / float(system.dt))), 10), 50)
        self.metadata = {**self.metadata, "render_fps": fps}
        n = system.state_dim
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (n,), np.float32)
        self.action_space = gymnasium.spaces.Box(
            np.asarray(system.action_low, np.float32), np.asarray(system.action_high, np.float32),
            dtype=np.float32)
        self._x: np.ndarray | None = None
        self._t = 0

    @property
    def state(self) -> np.ndarray:
        """The current state (a copy)."""
        if self._x is None:
            raise ForethoughtError(f"{self.system.name}: call reset() before reading the state")
        return self._x.copy()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        if "state" in options:
            x = np.asarray(options["state"], np.float32)
            if x.shape != (self.system.state_dim,) or not np.all(np.isfinite(x)):
                raise ForethoughtError(
                    f"{self.system.name}.reset: options['state'] must be a finite array of shape "
                    f"({self.system.state_dim},), got {np.asarray(options['state']).tolist()}")
        else:
            key = jax.random.key(int(self.np_random.integers(2**31 - 1)))
            x = np.asarray(self.system.initial_state(key), np.float32)
        self._x, self._t = x, 0
        return x.copy(), {}

    def step(self, action):
        if self._x is None:
            raise ForethoughtError(f"{self.system.name}: call reset() before step()")
        u = np.asarray(action, np.float32).reshape(-1)
        if u.shape != self.action_space.shape:
            raise ForethoughtError(f"{self.system.name}.step: action must have shape "
                                   f"{self.action_space.shape}, got {np.shape(action)}")
        if not np.all(np.isfinite(u)):
            raise ForethoughtError(f"{self.system.name}.step: action must be finite, got {u.tolist()}")
        u = np.clip(u, self.action_space.low, self.action_space.high)
        x_next, cost, terminal = _step(self.system, jnp.asarray(self._x), jnp.asarray(u), self._t)
        x_next = np.asarray(x_next, np.float32)
        if not np.all(np.isfinite(x_next)):
            raise ForethoughtError(f"{self.system.name}: the state became non-finite at step {self._t} "
                                   f"(from {self._x.tolist()} with action {u.tolist()})")
        self._x, self._t = x_next, self._t + 1
        truncated = self._t >= self.system.horizon
        return x_next.copy(), -float(cost), bool(terminal), bool(truncated), {}

    def render(self):
        if self._x is None:
            raise ForethoughtError(f"{self.system.name}: call reset() before render()")
        return self.system.render(self._x, self.render_size)


def env_id(name: str) -> str:
    """`"mountain-car"` -> `"forethought/MountainCar-v0"`."""
    special = {"cartpole": "CartPole", "cartpole-balance": "CartPoleBalance"}
    camel = special.get(name) or "".join(part.capitalize() for part in name.split("-"))
    return f"forethought/{camel}-v0"


def _make_builtin(name: str, render_mode: str | None = None, render_size: int = 256,
                  max_episode_steps: int | None = None, **params: Any) -> gymnasium.Env:
    system = systems.make(name, **params)
    if isinstance(system, System):
        if max_episode_steps is not None:
            import dataclasses
            system = dataclasses.replace(system, horizon=int(max_episode_steps))
        return SystemEnv(system, render_mode=render_mode, render_size=render_size)
    from forethought.systems.mazes import MazeEnv
    return MazeEnv(system, max_episode_steps=max_episode_steps, render_mode=render_mode)


def _entry_point(name: str):
    def make(**kwargs):
        if name == "maze" and "layout" not in kwargs:  # gymnasium.make needs a default: the Dyna maze
            from forethought.systems.mazes import dyna_maze
            kwargs["layout"] = dyna_maze().to_layout()
        return _make_builtin(name, **kwargs)
    make.__name__ = f"make_{name.replace('-', '_')}"
    return make


def register_envs() -> None:
    """Register every built-in system with Gymnasium (idempotent)."""
    for name in systems.names():
        if env_id(name) not in gymnasium.registry:
            gymnasium.register(env_id(name), entry_point=_entry_point(name))


def make_env(spec: str, *, render_mode: str | None = None, layout: str | None = None,
             **params: Any) -> gymnasium.Env:
    """An env from a built-in name (`"pendulum"`, `"maze"` with `layout=TEXT`) or `"gym:ID"`.

    `params` go to the built-in system (physical parameters) or to `gymnasium.make`.
    """
    if not isinstance(spec, str) or not spec:
        raise ForethoughtError(f"env must be a non-empty string, got {spec!r}")
    if spec.startswith("gym:"):
        gym_id = spec[4:]
        if ":" in gym_id:
            # gymnasium.make("module:Env") imports `module`: a config file must not run code
            raise ForethoughtError(f"env {spec!r}: expected gym:ID with a registered Gymnasium id; ids of the "
                                   "form module:ID are refused because they import code (import the module "
                                   "in Python and pass the env to the agent instead)")
        try:
            return gymnasium.make(gym_id, render_mode=render_mode, **params)
        except gymnasium.error.DependencyNotInstalled as error:
            hint = " (install the extra: pip install 'forethought[mujoco]')" if "mujoco" in str(error).lower() else ""
            raise ForethoughtError(f"env {spec!r} needs a missing package{hint}: {error}") from None
        except gymnasium.error.Error as error:
            raise ForethoughtError(f"env {spec!r}: {error}") from None
    if spec not in systems.names():
        close = difflib.get_close_matches(spec, systems.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ForethoughtError(f"unknown env {spec!r}{hint}; expected a built-in system "
                               f"({', '.join(systems.names())}) or gym:<Gymnasium id>")
    if spec == "maze":
        if layout is None:
            raise ForethoughtError("env 'maze' needs a layout (the CLI's --env-layout FILE)")
        params["layout"] = layout
    elif layout is not None:
        raise ForethoughtError(f"a layout was given but env {spec!r} is not 'maze'")
    return _make_builtin(spec, render_mode=render_mode, **params)


def system_of(env: gymnasium.Env) -> System | None:
    """The pure-JAX `System` behind a built-in env, or None for other envs."""
    inner = env.unwrapped
    return inner.system if isinstance(inner, SystemEnv) else None


def describe_spaces(env: gymnasium.Env) -> str:
    return f"observations {env.observation_space}, actions {env.action_space}"


register_envs()
