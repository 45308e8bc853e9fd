"""The `System` contract: a dynamical system as pure JAX functions over arrays.

A system is an immutable Equinox module (a frozen dataclass and a pytree): its physical
parameters are fields, so `dataclasses.replace(system, mass=2.0)` gives another system and a
batch of randomized systems can be `vmap`ped over. Structural settings (horizon, integrator
substeps) are static fields.

Every system offers, with `x: [n]`, `u: [m]` and `t` an integer step:

- `dynamics(x, u, t) -> x_next` (one step of length `dt`; actions are *not* clipped here, so
  planners see smooth dynamics; environments and sampling planners respect `action_low/high`),
- `cost(x, u, t) -> scalar` and `terminal_cost(x) -> scalar` (reward is `-cost`),
- `is_terminal(x) -> bool` (only tasks that end, such as mountain car, say True),
- `initial_state(key=None)` (the mean start when `key` is None, else a sample),
- `render(x, size) -> uint8 [size, size, 3]`,
- `rollout(x0, U) -> X [T+1, n]` and `objective(x0, U)`, the total cost
  `sum_t cost(x_t, u_t, t) + terminal_cost(x_T)`.

Wrong shapes or non-float dtypes raise a `ForethoughtError` when the function is traced, so the
checks cost nothing inside `jit`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from forethought.errors import ForethoughtError, check_array


class System(eqx.Module):
    """Base class of the built-in continuous-state systems (see the module docstring)."""

    name: ClassVar[str]
    state_dim: ClassVar[int]
    action_dim: ClassVar[int]
    state_names: ClassVar[tuple[str, ...]]
    action_names: ClassVar[tuple[str, ...]]
    angles: ClassVar[tuple[int, ...]] = ()
    """Indices of the state dimensions that are angles (models feed them as sin/cos)."""
    terminates: ClassVar[bool] = False
    """Whether `is_terminal` can be true (planners then stop counting cost past the end)."""

    # Subclasses declare `dt: float` and `horizon: int = eqx.field(static=True)`.
    dt: eqx.AbstractVar[float]
    horizon: eqx.AbstractVar[int]

    # ----- what a subclass implements -------------------------------------------------------
    def _next_state(self, x, u, t):
        raise NotImplementedError

    def _cost(self, x, u, t):
        raise NotImplementedError

    def _terminal_cost(self, x):
        return jnp.zeros((), x.dtype)

    def _action_limit(self):
        """The bound `b` of symmetric actions, `u` in `[-b, b]` (or override `action_low/high`)."""
        raise NotImplementedError

    @property
    def action_low(self) -> jax.Array:
        return -self.action_high

    @property
    def action_high(self) -> jax.Array:
        return jnp.full((self.action_dim,), self._action_limit())

    def initial_state(self, key=None) -> jax.Array:
        raise NotImplementedError

    def render(self, x, size: int = 256) -> np.ndarray:
        raise NotImplementedError

    # ----- the public contract (validated) ---------------------------------------------------
    def dynamics(self, x, u, t=0):
        """One step: `x: [n]`, `u: [m]`, `t` the step index -> `x_next: [n]`."""
        self._check_xu(x, u, "dynamics")
        return self._next_state(x, u, t)

    def cost(self, x, u, t=0):
        """Stage cost of taking `u: [m]` in `x: [n]` at step `t` -> scalar."""
        self._check_xu(x, u, "cost")
        return self._cost(x, u, t)

    def terminal_cost(self, x):
        """Cost of ending in `x: [n]` -> scalar."""
        check_array(x, "x", (self.state_dim,), where=f"{self.name}.terminal_cost")
        return self._terminal_cost(x)

    def is_terminal(self, x):
        """Whether `x` ends the episode (a task that can be finished early). Default: never."""
        return jnp.zeros((), bool)

    def rollout(self, x0, U) -> jax.Array:
        """States `X: [T+1, n]` from `x0: [n]` under open-loop actions `U: [T, m]`."""
        self._check_plan(x0, U, "rollout")

        def step(x, tu):
            t, u = tu
            x_next = self._next_state(x, u, t)
            return x_next, x_next

        _, X = jax.lax.scan(step, x0, (jnp.arange(U.shape[0]), U))
        return jnp.concatenate([x0[None], X])

    def objective(self, x0, U) -> jax.Array:
        """Total cost `sum_t cost(x_t, u_t, t) + terminal_cost(x_T)` of `U: [T, m]` from `x0`."""
        X = self.rollout(x0, U)
        stage = jax.vmap(self._cost)(X[:-1], U, jnp.arange(U.shape[0]))
        return stage.sum() + self._terminal_cost(X[-1])

    def params(self) -> dict[str, float]:
        """The non-static fields but `dt` (physical parameters, cost weights, matrices) by name;
        `randomize` keeps the scalar ones."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not f.metadata.get("static", False) and f.name not in ("dt",)}

    # ----- helpers ----------------------------------------------------------------------------
    def _check_xu(self, x, u, method: str) -> None:
        check_array(x, "x", (self.state_dim,), where=f"{self.name}.{method}")
        check_array(u, "u", (self.action_dim,), where=f"{self.name}.{method}")

    def _check_plan(self, x0, U, method: str) -> None:
        where = f"{self.name}.{method}"
        check_array(x0, "x0", (self.state_dim,), where=where)
        if np.ndim(U) != 2 or np.shape(U)[1] != self.action_dim:
            raise ForethoughtError(
                f"{where}: U must have shape (T, {self.action_dim}), got {tuple(np.shape(U))}")

    def _check_positive(self, *names: str) -> None:
        """Called from `__check_init__`: concrete parameters must be > 0 (traced ones pass)."""
        for name in names:
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not value > 0:
                raise ForethoughtError(f"{self.name}: {name} must be > 0, got {value}")

    def _gaussian_start(self, mean, std, key):
        mean = jnp.asarray(mean, jnp.result_type(float))
        if key is None:
            return mean
        return mean + jnp.asarray(std, mean.dtype) * jax.random.normal(key, mean.shape, mean.dtype)


class ContinuousSystem(System):
    """A system given by `derivatives(x, u) -> dx/dt`, integrated with zero-order-hold actions.

    Subclasses declare `integrator: str = eqx.field(default="rk4", static=True)` ("rk4" or
    "euler") and `substeps: int = eqx.field(default=1, static=True)`.
    """

    integrator: eqx.AbstractVar[str]
    substeps: eqx.AbstractVar[int]

    def derivatives(self, x, u):
        raise NotImplementedError

    def _next_state(self, x, u, t):
        h = self.dt / self.substeps
        f = self.derivatives
        for _ in range(self.substeps):
            if self.integrator == "euler":
                x = x + h * f(x, u)
            else:
                k1 = f(x, u)
                k2 = f(x + 0.5 * h * k1, u)
                k3 = f(x + 0.5 * h * k2, u)
                k4 = f(x + h * k3, u)
                x = x + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
        return x


def wrap_angle(a):
    """Map angles to [-pi, pi)."""
    return (a + jnp.pi) % (2 * jnp.pi) - jnp.pi


def quadratic(e, weights):
    """`0.5 * sum(weights * e**2)`: a diagonal quadratic form."""
    return 0.5 * jnp.sum(jnp.asarray(weights, e.dtype) * e * e)
