"""The result type every planner and optimal-control solver returns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.tree_util import register_dataclass
import dataclasses


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
