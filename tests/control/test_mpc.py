"""Receding-horizon control: warm-start shifting, one compiled call per step, pendulum swing-up."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought import systems
from forethought.control.mpc import MPC, run_mpc, shift_plan
from forethought.control.shooting import cem, mppi, random_shooting
from forethought.control.solution import Solution
from forethought.errors import ForethoughtError

PENDULUM = systems.make("pendulum")


def test_shift_plan():
    U = jnp.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(shift_plan(U, jnp.array([7.0, 8.0])),
                                  [[2.0, 3.0], [4.0, 5.0], [7.0, 8.0]])


def _plus_one(cost, dynamics, x0, U0, key, *, lower, upper, terminal_cost=None):
    """A fake planner whose plan is its warm start plus one, to watch the shifting."""
    U = U0 + 1
    return Solution(x=jnp.zeros((U.shape[0] + 1, x0.shape[0])), u=U, cost=jnp.zeros(()),
                    iterations=jnp.ones((), jnp.int32), converged=jnp.zeros((), bool))


def test_act_shifts_the_plan_and_fills_with_the_middle_of_the_bounds():
    mpc = MPC(_plus_one, PENDULUM.cost, PENDULUM.dynamics, 3, lower=-1.0, upper=3.0)
    state = mpc.init(jax.random.key(0))
    np.testing.assert_array_equal(state.U, [[1.0], [1.0], [1.0]])  # (lower + upper) / 2
    u, state = mpc.act(state, jnp.zeros(2), 0)
    assert float(u[0]) == 2.0
    np.testing.assert_array_equal(state.U, [[2.0], [2.0], [1.0]])
    u, state = mpc.act(state, jnp.zeros(2), 1)
    assert float(u[0]) == 3.0
    np.testing.assert_array_equal(state.U, [[3.0], [2.0], [1.0]])
    # Infinite bounds fill with zero.
    unbounded = MPC(_plus_one, PENDULUM.cost, PENDULUM.dynamics, 2, lower=-jnp.inf, upper=jnp.inf)
    np.testing.assert_array_equal(unbounded.init(jax.random.key(0)).U, [[0.0], [0.0]])


def test_act_compiles_once_and_matches_run_mpc():
    traces = []

    def counting_cost(x, u, t):
        traces.append(1)
        return PENDULUM.cost(x, u, t)

    planner = partial(cem, population=16, iterations=2)
    mpc = MPC(planner, counting_cost, PENDULUM.dynamics, 5, PENDULUM.action_low,
              PENDULUM.action_high)
    key, x = jax.random.key(0), PENDULUM.initial_state()
    state = mpc.init(key)
    xs, us = [x], []
    for t in range(4):
        u, state = mpc.act(state, x, t)
        if t == 0:
            n = len(traces)
        x = PENDULUM.dynamics(x, u, t)
        xs.append(x)
        us.append(u)
    assert len(traces) == n  # steps 1..3 reused the program compiled at step 0
    X, U, costs = run_mpc(mpc, PENDULUM.dynamics, PENDULUM.initial_state(), 4, key)
    assert X.shape == (5, 2) and U.shape == (4, 1) and costs.shape == (4,)
    np.testing.assert_allclose(X, jnp.stack(xs), atol=1e-4)
    np.testing.assert_allclose(U, jnp.stack(us), atol=1e-4)
    np.testing.assert_allclose(costs[0], PENDULUM.cost(X[0], U[0], 0), rtol=1e-6)


# Short-horizon MPC uses trajax's final term (`cost(x_H, 0, H)`) rather than the pendulum's
# terminal cost: that one (Qf = diag(100, 10)) is sized for a whole-episode plan, and over a
# 1.5 s horizon it makes "keep pushing one way, reverse later" optimal at every step, so the
# closed loop never pumps.
SWING_UP = {
    "cem": partial(cem, population=100, iterations=3),
    "mppi": partial(mppi, population=100, iterations=2, lambda_=0.5),
    "random_shooting": partial(random_shooting, population=300, init_std=1.0),
}


@pytest.mark.parametrize("name", sorted(SWING_UP))
def test_mpc_swings_the_pendulum_up_and_holds_it(name):
    p = PENDULUM
    mpc = MPC(SWING_UP[name], p.cost, p.dynamics, 30, p.action_low, p.action_high)
    keys = jax.random.split(jax.random.key(0), 3)
    X, U, _ = jax.vmap(lambda k: run_mpc(mpc, p.dynamics, p.initial_state(k), 250, k))(keys)
    last = np.asarray(X[:, -20:])
    angle_error = np.abs((last[..., 0] % (2 * np.pi)) - np.pi)
    assert angle_error.max() < 0.15, angle_error.max(axis=1)
    assert np.abs(last[..., 1]).max() < 0.5, np.abs(last[..., 1]).max(axis=1)
    assert np.all(np.abs(np.asarray(U)) <= p.max_torque + 1e-6)


def test_bad_bounds_and_horizon_name_the_argument():
    p = PENDULUM
    with pytest.raises(ForethoughtError, match="lower must be <= upper"):
        MPC(cem, p.cost, p.dynamics, 10, lower=p.action_high, upper=p.action_low)
    with pytest.raises(ForethoughtError, match="lower must be a scalar or have shape"):
        MPC(cem, p.cost, p.dynamics, 10, lower=jnp.zeros((2, 1)), upper=1.0)
    with pytest.raises(ForethoughtError, match="lower and upper must have the same shape"):
        MPC(cem, p.cost, p.dynamics, 10, lower=jnp.zeros(2), upper=jnp.ones(3))
    with pytest.raises(ForethoughtError, match="horizon"):
        MPC(cem, p.cost, p.dynamics, 0, lower=-1.0, upper=1.0)
    mpc = MPC(cem, p.cost, p.dynamics, 10, lower=-1.0, upper=1.0)
    with pytest.raises(ForethoughtError, match=r"U must have shape \(10, 1\)"):
        mpc.init(jax.random.key(0), jnp.zeros((9, 1)))
    with pytest.raises(ForethoughtError, match="steps"):
        run_mpc(mpc, p.dynamics, p.initial_state(), 0, jax.random.key(0))
