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
    ...           lower=p.action_low, upper=p.action_high)
    >>> state = mpc.init(key)
    >>> u, state = mpc.act(state, x, t)          # one jitted call per environment step
    >>> X, U, costs = run_mpc(mpc, p.dynamics, p.initial_state(), 200, key)   # all in JAX

The planner sees the cost and dynamics at absolute time `t + s` for plan step `s`, so
time-varying costs (tracking a reference) work unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
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


@dataclasses.dataclass(frozen=True, eq=False)
class MPC:
    """A receding-horizon controller around a sampling planner.

    Args:
      planner: `planner(cost, dynamics, x0, U0, key, *, lower, upper, terminal_cost) ->
        Solution`, e.g. `functools.partial(cem, population=500, iterations=5)`.
      cost, dynamics: `cost(x, u, t) -> scalar` and `dynamics(x, u, t) -> x_next`, the model
        the planner plans through (the true system or a learned one).
      horizon: planning horizon H (steps).
      lower, upper: action bounds, `[m]` or scalars (then `action_dim` gives m, default 1).
      terminal_cost: `terminal_cost(x) -> scalar` at the end of each plan, or None for
        trajax's `cost(x_H, 0, H)`. Short horizons usually want None: a terminal cost sized for
        a whole episode (such as the pendulum's) makes every short plan postpone the swing.
      action_dim: m, needed only when both bounds are scalars.

    `act` compiles the controller once, with `cost`, `dynamics` and the bounds baked in. To plan
    through a model whose parameters change (a learned model between episodes) without
    recompiling, call `plan` inside your own `jax.jit` that takes the parameters as arguments
    (an `MPC` can be built inside it).
    """

    planner: Callable
    cost: Callable
    dynamics: Callable
    horizon: int
    lower: jax.Array
    upper: jax.Array
    terminal_cost: Callable | None = None
    action_dim: dataclasses.InitVar[int | None] = None

    def __post_init__(self, action_dim):
        if not isinstance(self.horizon, (int, np.integer)) or self.horizon < 1:
            raise ForethoughtError(f"MPC: horizon must be an integer >= 1, got {self.horizon!r}")
        if action_dim is None:
            sizes = {int(np.size(b)) for b in (self.lower, self.upper) if np.ndim(b) == 1}
            if len(sizes) > 1:
                raise ForethoughtError(f"MPC: lower and upper must have the same shape (m,), "
                                       f"got {np.shape(self.lower)} and {np.shape(self.upper)}")
            action_dim = sizes.pop() if sizes else 1
        lower, upper = check_bounds(self.lower, self.upper, action_dim, where="MPC")
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "upper", upper)
        object.__setattr__(self, "horizon", int(self.horizon))

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

        One compiled call per environment step (compiled on the first); `t` is traced, so
        stepping through an episode never recompiles.
        """
        return self._act(state, x, t)

    @functools.cached_property
    def _act(self):
        # A plain `jax.jit` closure: its dispatch costs ~15 us a step, where `eqx.filter_jit`
        # over the controller as a pytree cost ~200 us (it partitions the pytree every call).
        def act(state, x, t):
            solution, state = self.plan(state, x, t)
            return solution.u[0], state

        return jax.jit(act)


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
