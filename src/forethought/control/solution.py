"""The result type every planner and optimal-control solver returns."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import register_dataclass

from forethought.errors import ForethoughtError


@register_dataclass
@dataclasses.dataclass(frozen=True)
class Solution:
    """A planned trajectory.

    Attributes:
      x: states `[T+1, n]`, `x[0] = x0`.
      u: actions `[T, m]`.
      cost: the objective of `(x, u)` (see the solver's docstring for its convention), scalar.
      iterations: iterations the solver ran, int scalar.
      converged: whether the stopping rule was met (always False for fixed-budget samplers).
      K: feedback gains `[T, m, n]` where the method has them, else None.
      k: feedforward terms `[T, m]` where the method has them, else None.
      history: per-iteration objective `[maxiter]` (unused entries hold the last value), or None.
    """

    x: jax.Array
    u: jax.Array
    cost: jax.Array
    iterations: jax.Array
    converged: jax.Array
    K: jax.Array | None = None
    k: jax.Array | None = None
    history: jax.Array | None = None


def trajax_objective(cost, x, u, terminal_cost=None):
    """`sum_{t<T} cost(x_t, u_t, t) + final`, where `final` is `terminal_cost(x_T)` if given,
    else trajax's `cost(x_T, 0, T)`. `x: [T+1, n]`, `u: [T, m]`."""
    T = u.shape[0]
    stage = jax.vmap(cost)(x[:-1], u, jnp.arange(T)).sum()
    if terminal_cost is None:
        final = cost(x[-1], jnp.zeros_like(u[0]), T)
    else:
        final = terminal_cost(x[-1])
    return stage + final


def check_arguments(cost, dynamics, terminal_cost, x0, U0, where: str) -> None:
    """Before tracing: the functions are callable, `x0` is `[n]` and `U0` is `[T, m]`, T >= 1."""
    for name, fn in (("cost", cost), ("dynamics", dynamics)):
        if not callable(fn):
            raise ForethoughtError(f"{where}: {name} must be a function (x, u, t), got {fn!r}")
    if terminal_cost is not None and not callable(terminal_cost):
        raise ForethoughtError(f"{where}: terminal_cost must be a function x -> scalar or None, "
                               f"got {terminal_cost!r}")
    if np.ndim(x0) != 1:
        raise ForethoughtError(f"{where}: x0 must have shape (n,), got {np.shape(x0)}")
    if np.ndim(U0) != 2 or np.shape(U0)[0] < 1:
        raise ForethoughtError(f"{where}: U0 must have shape (T, m) with T >= 1, "
                               f"got {np.shape(U0)}")


def check_problem(cost, dynamics, terminal_cost, x0, U0, where: str) -> None:
    """At trace time: `dynamics(x, u, t)` returns a state like `x0`, and `cost(x, u, t)` and
    `terminal_cost(x)` return scalars; otherwise a `ForethoughtError` naming the function."""
    t = jnp.zeros((), jnp.int32)
    x_next = jax.eval_shape(dynamics, x0, U0[0], t)
    if getattr(x_next, "shape", None) != x0.shape:
        raise ForethoughtError(f"{where}: dynamics(x, u, t) must return shape {x0.shape} "
                               f"like x0, got {getattr(x_next, 'shape', type(x_next))}")
    c = jax.eval_shape(cost, x0, U0[0], t)
    if getattr(c, "shape", None) != ():
        raise ForethoughtError(f"{where}: cost(x, u, t) must return a scalar, "
                               f"got shape {getattr(c, 'shape', type(c))}")
    if terminal_cost is not None:
        c = jax.eval_shape(terminal_cost, x0)
        if getattr(c, "shape", None) != ():
            raise ForethoughtError(f"{where}: terminal_cost(x) must return a scalar, "
                                   f"got shape {getattr(c, 'shape', type(c))}")
