"""Model predictive control: replan at every step, apply the first action, shift, repeat.

Seed 000 ("MPC replanning") and seed 002, section 5.1. At step `t` in state `x_t`:

1. plan `u_{t:t+H}` from `x_t` with any sampling planner (`random_shooting`, `cem`, `mppi`,
   or anything with their signature), warm-started from the previous plan shifted one step;
2. apply the first action `u_t`;
3. keep `u_{t+1:t+H}`, append a fill action (the middle of the bounds, or 0 where a bound is
   infinite) as the warm start for step `t + 1`.

    >>> from functools import partial
    >>> p = systems.make("pendulum")
    >>> mpc = MPC(partial(cem, population=500, iterations=5), p.cost, p.dynamics, horizon=30,
    ...           lower=p.action_low, upper=p.action_high, terminal_cost=p.terminal_cost)
    >>> state = mpc.init(key)
    >>> u, state = mpc.act(state, x, t)          # one jitted call per environment step
    >>> X, U, costs = run_mpc(mpc, p.dynamics, p.initial_state(), 200, key)   # all in JAX

The planner sees the cost and dynamics at absolute time `t + s` for plan step `s`, so
time-varying costs (tracking a reference) work unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import register_dataclass

from forethought.control.shooting import check_bounds
from forethought.control.solution import Solution
from forethought.errors import ForethoughtError


@register_dataclass
@dataclasses.dataclass(frozen=True)
class MPCState:
    """What an `MPC` carries between steps.

    Attributes:
      U: the warm start for the next plan, `[H, m]` (the previous plan shifted one step).
      key: the PRNG key the next plan's sampling is drawn from.
    """

    U: jax.Array
    key: jax.Array


def shift_plan(U, fill) -> jax.Array:
    """`U: [H, m]` advanced one step: `[u_1, ..., u_{H-1}, fill]`, `fill: [m]`."""
    return jnp.concatenate([U[1:], jnp.broadcast_to(fill, U.shape[1:])[None].astype(U.dtype)])


class MPC(eqx.Module):
    """A receding-horizon controller around a sampling planner.

    Args:
      planner: `planner(cost, dynamics, x0, U0, key, *, lower, upper, terminal_cost) ->
        Solution`, e.g. `functools.partial(cem, population=500, iterations=5)`.
      cost, dynamics: `cost(x, u, t) -> scalar` and `dynamics(x, u, t) -> x_next`, the model
        the planner plans through (the true system or a learned one).
      horizon: planning horizon H (steps).
      lower, upper: action bounds, `[m]` or scalars (then `action_dim` gives m, default 1).
      terminal_cost: `terminal_cost(x) -> scalar` at the end of each plan, or None for
        trajax's `cost(x_H, 0, H)`.
      action_dim: m, needed only when both bounds are scalars.

    The controller is a pytree: arrays inside it (the bounds, a model's parameters inside a
    bound-method `dynamics`) are traced by `act`, so a new model of the same shapes reuses the
    compiled step.
    """

    planner: Callable
    cost: Callable
    dynamics: Callable
    horizon: int = eqx.field(static=True)
    lower: jax.Array
    upper: jax.Array
    terminal_cost: Callable | None

    def __init__(self, planner, cost, dynamics, horizon, lower, upper, *, terminal_cost=None,
                 action_dim=None):
        if not isinstance(horizon, (int, np.integer)) or horizon < 1:
            raise ForethoughtError(f"MPC: horizon must be an integer >= 1, got {horizon!r}")
        if action_dim is None:
            sizes = {int(np.size(b)) for b in (lower, upper) if np.ndim(b) == 1}
            action_dim = sizes.pop() if len(sizes) == 1 else (1 if not sizes else None)
            if action_dim is None:
                raise ForethoughtError(f"MPC: lower and upper must have the same shape (m,), "
                                       f"got {np.shape(lower)} and {np.shape(upper)}")
        self.lower, self.upper = check_bounds(lower, upper, action_dim, where="MPC")
        self.planner, self.cost, self.dynamics = planner, cost, dynamics
        self.horizon = int(horizon)
        self.terminal_cost = terminal_cost

    @property
    def fill(self) -> jax.Array:
        """The action appended when the plan shifts: mid-bounds, or 0 where a bound is infinite."""
        middle = (self.lower + self.upper) / 2
        return jnp.where(jnp.isfinite(middle), middle, 0)

    def init(self, key, U=None) -> MPCState:
        """The state before the first step: plan `U: [H, m]` (default: `fill` everywhere)."""
        if U is None:
            U = jnp.tile(self.fill, (self.horizon, 1))
        elif np.shape(U) != (self.horizon, self.lower.shape[0]):
            raise ForethoughtError(f"MPC.init: U must have shape ({self.horizon}, "
                                   f"{self.lower.shape[0]}), got {np.shape(U)}")
        return MPCState(U=jnp.asarray(U, self.lower.dtype), key=key)

    def plan(self, state: MPCState, x, t) -> tuple[Solution, MPCState]:
        """Plan from `x: [n]` at time `t`; returns the `Solution` and the next state (the plan
        shifted). Pure and traceable: `run_mpc` and agents call it inside their own `jit`."""
        key, plan_key = jax.random.split(state.key)
        cost = lambda x, u, s: self.cost(x, u, t + s)  # noqa: E731
        dynamics = lambda x, u, s: self.dynamics(x, u, t + s)  # noqa: E731
        solution = self.planner(cost, dynamics, x, state.U, plan_key, lower=self.lower,
                                upper=self.upper, terminal_cost=self.terminal_cost)
        return solution, MPCState(U=shift_plan(solution.u, self.fill), key=key)

    def act(self, state: MPCState, x, t) -> tuple[jax.Array, MPCState]:
        """The action `u: [m]` for state `x: [n]` at step `t`, and the next state.

        One compiled call per environment step; `t` is passed as an array, so stepping through
        an episode never recompiles.
        """
        return _act(self, state, jnp.asarray(x), jnp.asarray(t, jnp.int32))


@eqx.filter_jit
def _act(mpc: MPC, state: MPCState, x, t):
    solution, state = mpc.plan(state, x, t)
    return solution.u[0], state


def run_mpc(controller: MPC, dynamics, x0, steps: int, key):
    """Run `controller` in closed loop on `dynamics(x, u, t)` for `steps` steps from `x0: [n]`,
    entirely in JAX (one `lax.scan`, one compiled program; `vmap` it over keys for seeds).

    `dynamics` is the system acted on, which may differ from the controller's model.

    Returns:
      `X: [steps+1, n]` the visited states, `U: [steps, m]` the applied actions, and
      `costs: [steps]` the stage costs `controller.cost(x_t, u_t, t)` incurred.
    """
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ForethoughtError(f"run_mpc: steps must be an integer >= 1, got {steps!r}")
    if np.ndim(x0) != 1:
        raise ForethoughtError(f"run_mpc: x0 must have shape (n,), got {tuple(np.shape(x0))}")
    return _run_mpc(controller, dynamics, jnp.asarray(x0), int(steps), key)


@eqx.filter_jit
def _run_mpc(controller, dynamics, x0, steps, key):
    def step(carry, t):
        x, state = carry
        solution, state = controller.plan(state, x, t)
        u = solution.u[0]
        return (dynamics(x, u, t), state), (x, u, controller.cost(x, u, t))

    (x_last, _), (X, U, costs) = jax.lax.scan(step, (x0, controller.init(key)),
                                              jnp.arange(steps))
    return jnp.concatenate([X, x_last[None]]), U, costs
