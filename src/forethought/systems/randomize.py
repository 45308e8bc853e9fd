"""Domain randomization (seed 001, "Domain randomization and sim-to-real").

Train on many versions of a system whose physical parameters are drawn from ranges, so a policy
works on the real one whose parameters are uncertain.

- `sample(system, ranges, key)` draws one randomized `System`, as pure JAX: `vmap` it over keys
  for a batch of systems (a pytree with a leading axis on the randomized fields).
- `DomainRandomization(env, ranges)` is a Gymnasium wrapper that draws new parameters at every
  reset, for built-in systems directly and for any other env through a `set_params(env, params)`
  hook (e.g. writing MuJoCo model fields). The draw is in `info["params"]`.

Both draw uniformly (`scale="linear"`) or log-uniformly (`scale="log"`: `log p` uniform in `[log
low, log high]`, the usual choice for scale parameters such as masses and lengths, where half and
twice the nominal value are equally far from it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, Mapping

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np

from forethought.errors import ForethoughtError
from forethought.systems.base import System
from forethought.systems.gym import SystemEnv

Ranges = Mapping[str, tuple[float, float]]
Scale = Literal["linear", "log"]


def check_ranges(ranges: Ranges, allowed: Mapping[str, Any] | None = None,
                 scale: Scale = "linear") -> dict[str, tuple[float, float]]:
    """Validate `{name: (low, high)}`: finite, low <= high (both > 0 for `scale="log"`), names
    among `allowed` if given."""
    if scale not in ("linear", "log"):
        raise ForethoughtError(f"scale must be 'linear' or 'log', got {scale!r}")
    if not isinstance(ranges, Mapping) or not ranges:
        raise ForethoughtError(f"ranges must be a non-empty mapping name -> (low, high), got {ranges!r}")
    checked = {}
    for name, bounds in ranges.items():
        if allowed is not None and name not in allowed:
            raise ForethoughtError(f"ranges: unknown parameter {name!r}; expected one of: "
                                   f"{', '.join(sorted(allowed))}")
        try:
            low, high = (float(b) for b in bounds)
        except (TypeError, ValueError):
            raise ForethoughtError(f"ranges[{name!r}] must be a pair (low, high), got {bounds!r}") from None
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise ForethoughtError(f"ranges[{name!r}] must be finite with low <= high, got ({low}, {high})")
        if scale == "log" and not low > 0:
            raise ForethoughtError(f"ranges[{name!r}] must be positive for scale='log', got ({low}, {high})")
        checked[name] = (low, high)
    return checked


def _float_params(system: System) -> dict[str, float]:
    return {k: v for k, v in system.params().items() if isinstance(v, (int, float))}


def sample(system: System, ranges: Ranges, key, scale: Scale = "linear") -> System:
    """`system` with each named parameter drawn uniformly (or, `scale="log"`, log-uniformly) from
    its range (pure JAX)."""
    ranges = check_ranges(ranges, _float_params(system), scale)
    keys = jax.random.split(key, len(ranges))
    if scale == "log":
        draws = {name: jnp.exp(jax.random.uniform(k, (), minval=math.log(low), maxval=math.log(high)))
                 for k, (name, (low, high)) in zip(keys, sorted(ranges.items()))}
    else:
        draws = {name: jax.random.uniform(k, (), minval=low, maxval=high)
                 for k, (name, (low, high)) in zip(keys, sorted(ranges.items()))}
    return dataclasses.replace(system, **draws)


class DomainRandomization(gymnasium.Wrapper):
    """Draw physical parameters from `ranges` at every reset.

    Args:
      env: a built-in env (`SystemEnv`) or any Gymnasium env together with `set_params`.
      ranges: `{name: (low, high)}`; for a built-in system, names are its parameter fields.
      set_params: `set_params(unwrapped_env, params: dict)` for envs that are not built-in.
      scale: `"linear"` draws uniformly, `"log"` log-uniformly.
    """

    def __init__(self, env: gymnasium.Env, ranges: Ranges,
                 set_params: Callable[[gymnasium.Env, dict[str, float]], None] | None = None,
                 scale: Scale = "linear"):
        super().__init__(env)
        inner = env.unwrapped
        if set_params is None:
            if not isinstance(inner, SystemEnv):
                raise ForethoughtError(
                    f"DomainRandomization: {type(inner).__name__} is not a built-in system env; "
                    "pass set_params(env, params) to say how to set its parameters")
            self._base = inner.system
            self.ranges = check_ranges(ranges, _float_params(self._base), scale)
        else:
            self._base = None
            self.ranges = check_ranges(ranges, scale=scale)
        self.scale = scale
        self._set_params = set_params
        self.params: dict[str, float] = {}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        elif not hasattr(self, "_rng"):
            self._rng = np.random.default_rng()
        if self.scale == "log":
            self.params = {name: float(np.exp(self._rng.uniform(np.log(low), np.log(high))))
                           for name, (low, high) in self.ranges.items()}
        else:
            self.params = {name: float(self._rng.uniform(low, high)) for name, (low, high) in self.ranges.items()}
        if self._set_params is None:
            self.env.unwrapped.system = dataclasses.replace(self._base, **self.params)
        else:
            self._set_params(self.env.unwrapped, dict(self.params))
        obs, info = self.env.reset(seed=seed, options=options)
        return obs, {**info, "params": dict(self.params)}


__all__ = ["sample", "check_ranges", "DomainRandomization"]
