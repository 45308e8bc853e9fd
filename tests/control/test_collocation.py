"""Collocation (seed 000, "Trajectory Optimization"): finite-difference checks of the derivatives
it uses and of its Newton step, trajax's acrobot problem against iLQR, float32 with vmap, and an
unstable system where single shooting fails and collocation does not."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from forethought import systems
from forethought.control.collocation import (augmented_lagrangian, collocation, defects,
                                             newton_direction, newton_model)
from forethought.control.ilqr import ilqr
from forethought.control.lqr import lqr
from forethought.control.shooting import rollout
from forethought.errors import ForethoughtError
from tests.control.problems import toy_cost, toy_dynamics, toy_final


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# The pieces compiled once (run eagerly, their many small ops each compile on first use).
newton_model = jax.jit(newton_model, static_argnums=(0, 1, 2))
newton_direction = jax.jit(newton_direction)


# ----- finite-difference checks (float64) ----------------------------------------------------
# A small problem with state-control cross terms, dynamics nonlinear in x and u, a
# time-dependent cost and a separate final cost.

N, M, T_TOY = 3, 2, 4




def toy_point(seed=0):
    """A trajectory that violates the dynamics, multipliers and a penalty."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(T_TOY + 1, N)))
    u = jnp.asarray(rng.normal(size=(T_TOY, M)))
    lam = jnp.asarray(rng.normal(size=(T_TOY, N)))
    return x, u, lam, 3.0


def toy_lagrangian_of_stages(x0, lam, rho):
    """`L` as a function of the flat stage variables `s_t = (u_t, x_{t+1})`."""
    def L(flat):
        S = flat.reshape(T_TOY, M + N)
        x = jnp.concatenate([x0[None], S[:, M:]])
        return augmented_lagrangian(toy_cost, toy_dynamics, toy_final, x, S[:, :M], lam, rho)
    return L


@functools.cache
def batched(fun):
    return jax.jit(jax.vmap(fun))


def fd_gradient(fun, z, h=1e-6):
    E = h * np.eye(z.size)
    values = np.asarray(batched(fun)(np.concatenate([z + E, z - E])))
    return np.moveaxis((values[:z.size] - values[z.size:]) / (2 * h), 0, -1)


def stages(x, u):
    return np.concatenate([np.asarray(u), np.asarray(x[1:])], axis=1).ravel()


def fd_hessian(fun, z, h=1e-4):
    """Second differences of the values of `fun` (no derivatives): `[*fun(z).shape, k, k]`."""
    k = z.size
    E = h * np.eye(k)
    a, b = E[:, None, :], E[None, :, :]
    points = np.stack([z + a + b, z + a - b, z - a + b, z - a - b]).reshape(4 * k * k, k)
    values = np.asarray(batched(fun)(points)).reshape(4, k, k, -1)
    hessian = (values[0] - values[1] - values[2] + values[3]) / (4 * h * h)
    return np.moveaxis(hessian, (0, 1), (-2, -1)).reshape(*np.shape(fun(z)), k, k)


def test_gradient_matches_finite_differences(x64):
    x, u, lam, rho = toy_point()
    model = newton_model(toy_cost, toy_dynamics, toy_final, x, u, lam, lam, rho)
    L = toy_lagrangian_of_stages(x[0], lam, rho)
    np.testing.assert_allclose(np.asarray(model.g).ravel(), fd_gradient(L, stages(x, u)),
                               rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(model.value, L(jnp.asarray(stages(x, u))), rtol=1e-12)
    np.testing.assert_allclose(model.d, defects(toy_dynamics, x, u), atol=1e-15)


def test_model_derivatives_match_finite_differences(x64):
    x, u, lam, rho = toy_point(1)
    y = jnp.asarray(np.random.default_rng(3).normal(size=(T_TOY, N)))
    model = newton_model(toy_cost, toy_dynamics, toy_final, x, u, lam, y, rho)
    for t in range(T_TOY):
        z = np.concatenate([x[t], u[t]])
        np.testing.assert_allclose(
            model.F[t], fd_gradient(lambda z, t=t: toy_dynamics(z[:N], z[N:], t), z),
            rtol=1e-7, atol=1e-8)
        np.testing.assert_allclose(
            model.c[t], fd_gradient(lambda z, t=t: toy_cost(z[:N], z[N:], t), z),
            rtol=1e-7, atol=1e-8)
        curvature = (lambda z, t=t: toy_cost(z[:N], z[N:], t)
                     - y[t] @ toy_dynamics(z[:N], z[N:], t))
        np.testing.assert_allclose(model.C[t], fd_hessian(curvature, z), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.v_T, fd_gradient(toy_final, np.asarray(x[-1])), rtol=1e-7)
    np.testing.assert_allclose(model.V_T, fd_hessian(toy_final, np.asarray(x[-1])), atol=1e-5)


@pytest.mark.parametrize("mu", [2.0, 5.0])
def test_newton_direction_solves_the_newton_system(x64, mu):
    # With y = lam + rho d the model's Hessian is the exact Hessian of L: the Riccati step must
    # be -(H + mu I)^-1 grad L for the Hessian of L by finite differences of its gradient.
    x, u, lam, rho = toy_point(2)
    y = lam + rho * defects(toy_dynamics, x, u)
    model = newton_model(toy_cost, toy_dynamics, toy_final, x, u, lam, y, rho)
    L = toy_lagrangian_of_stages(x[0], lam, rho)
    H = fd_gradient(jax.grad(L), stages(x, u))
    H = 0.5 * (H + H.T) + mu * np.eye(H.shape[0])
    assert np.all(np.linalg.eigvalsh(H) > 0)  # (with mu = 0 this H is indefinite)
    delta, y_new, ok = newton_direction(model, lam, rho, mu)
    assert bool(ok)
    np.testing.assert_allclose(np.asarray(delta).ravel(),
                               np.linalg.solve(H, -np.asarray(model.g).ravel()), rtol=1e-6,
                               atol=1e-7)
    # The slack's multipliers are those of the linearized constraints, lam + rho (d + A delta).
    du, dx = delta[:, :M], jnp.concatenate([jnp.zeros((1, N)), delta[:, M:]])
    linearized = (model.d + dx[1:] - jnp.einsum("tij,tj->ti", model.F,
                                                 jnp.concatenate([dx[:-1], du], axis=1)))
    np.testing.assert_allclose(y_new, lam + rho * linearized, rtol=1e-6, atol=1e-6)
    # An indefinite Hessian is reported, not stepped along.
    assert not bool(newton_direction(model, lam, rho, -1e3)[2])


# ----- trajax's acrobot problem --------------------------------------------------------------

@pytest.fixture(scope="module")
def acrobot():
    """Collocation and iLQR (the reference) on trajax's `testAcrobotSolve`, in float64."""
    system = systems.make("acrobot")
    with jax.enable_x64(True):
        x0, U0 = jnp.zeros(4), jnp.zeros((system.horizon, 1))
        out = {"system": system, "J0": float(system.objective(x0, U0))}
        reference = ilqr(system.cost, system.dynamics, x0, U0, terminal_cost=system.terminal_cost)
        out["reference"] = float(reference.cost)
        solution = collocation(system.cost, system.dynamics, x0, U0,
                               terminal_cost=system.terminal_cost)
        out["solution"] = jax.tree.map(np.asarray, solution)
        out["violation"] = float(jnp.abs(defects(system.dynamics, solution.x, solution.u)).max())
        out["rollout"] = np.asarray(rollout(system.dynamics, x0, solution.u))
        out["rollout_objective"] = float(system.objective(x0, solution.u))
    return out


def test_acrobot_within_one_percent_of_ilqr(acrobot):
    solution = acrobot["solution"]
    assert abs(acrobot["J0"] - 4959.476212) < 1e-6
    assert solution.converged and solution.iterations <= 100
    # trajax's bar for iLQR is 51.0; iLQR reaches 44.51 here.
    assert solution.cost <= 1.01 * acrobot["reference"] and solution.cost < 51.0
    np.testing.assert_allclose(solution.x[-1], [np.pi, 0, 0, 0], atol=0.02)
    assert np.all(solution.history[solution.iterations - 1:] == solution.cost)


def test_acrobot_trajectory_satisfies_the_dynamics(acrobot):
    solution = acrobot["solution"]
    assert acrobot["violation"] <= 1e-8
    # Rolling the actions out from x0 reproduces the states (the upright end is unstable, so
    # the 1e-8 defects grow along the way, to about 1e-5) and the objective.
    np.testing.assert_allclose(acrobot["rollout"], solution.x, atol=1e-4)
    np.testing.assert_allclose(acrobot["rollout_objective"], solution.cost, rtol=1e-7)


def test_acrobot_float32_vmapped_over_x0(acrobot):
    system = acrobot["system"]
    x0s = jnp.array([[0.0, 0.0, 0.0, 0.0], [0.01, -0.01, 0.0, 0.0]], jnp.float32)
    U0 = jnp.zeros((system.horizon, 1), jnp.float32)
    batch = jax.vmap(lambda x0: collocation(system.cost, system.dynamics, x0, U0,
                                            terminal_cost=system.terminal_cost))(x0s)
    assert batch.u.dtype == jnp.float32 and batch.cost.shape == (2,)
    assert bool(jnp.all(batch.converged))
    violation = jax.vmap(lambda x, u: jnp.abs(defects(system.dynamics, x, u)).max())(batch.x,
                                                                                       batch.u)
    assert float(violation.max()) <= 1e-5
    np.testing.assert_allclose(batch.x[:, 0], x0s)
    assert float(batch.cost[0]) <= 1.01 * acrobot["reference"]
    assert float(batch.cost[1]) <= 1.05 * acrobot["reference"]


# ----- where single shooting fails ----------------------------------------------------------
# Balancing a stick: theta'' = a theta + u (an inverted pendulum linearized about upright),
# Euler steps, 10 s. The unstable mode grows by 1.25 per step, so u_0 reaches x_T through a
# factor of 1.25^200 ~ 1e19: the shooting objective's Hessian spans some 40 orders of magnitude,
# beyond float64, while every collocation constraint couples only neighbouring steps. The costs
# follow trajax's convention (one function, its value at t = T is the final cost).

DT, A_UNSTABLE, T_LONG = 0.05, 25.0, 200
A_STICK = np.array([[1.0, DT], [A_UNSTABLE * DT, 1.0]])
B_STICK = np.array([[0.0], [DT]])


def stick_dynamics(x, u, t):
    return jnp.asarray(A_STICK, x.dtype) @ x + jnp.asarray(B_STICK, x.dtype) @ u


def stick_cost(x, u, t):
    return jnp.where(t == T_LONG, 500.0 * x @ x, 0.5 * (x @ x + 0.1 * u @ u))


def test_collocation_succeeds_where_single_shooting_fails(x64):
    x0, U0 = jnp.array([1.0, 0.0]), jnp.zeros((T_LONG, 1))

    # The exact optimum, by the Riccati recursion.
    F = jnp.broadcast_to(jnp.asarray(np.hstack([A_STICK, B_STICK])), (T_LONG, 2, 3))
    C = jnp.broadcast_to(jnp.diag(jnp.array([1.0, 1.0, 0.1])), (T_LONG, 3, 3))
    optimum = lqr(F, jnp.zeros((T_LONG, 2)), C, jnp.zeros((T_LONG, 3)), x0,
                  C_T=1000.0 * jnp.eye(2))

    # Single shooting: L-BFGS on the objective of the rollout of U, from U0 = 0.
    def shooting_objective(U):
        x = rollout(stick_dynamics, x0, U)
        costs = jax.vmap(stick_cost)(x, jnp.concatenate([U, jnp.zeros((1, 1))]),
                                     jnp.arange(T_LONG + 1))
        return costs.sum()

    optimizer = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(shooting_objective)

    @jax.jit
    def shoot(U):
        def step(carry, _):
            U, state = carry
            value, grad = value_and_grad(U, state=state)
            updates, state = optimizer.update(grad, state, U, value=value, grad=grad,
                                              value_fn=shooting_objective)
            return (optax.apply_updates(U, updates), state), None

        (U, _), _ = jax.lax.scan(step, (U, optimizer.init(U)), None, length=100)
        return shooting_objective(U)

    shot = float(shoot(U0))
    assert not shot < 100 * float(optimum.cost)  # stuck far above (or NaN)

    # Collocation from the same U0 and a straight line of states to the goal.
    X0 = jnp.linspace(x0, jnp.zeros(2), T_LONG + 1)
    solution = collocation(stick_cost, stick_dynamics, x0, U0, X0=X0)
    assert solution.converged and solution.iterations <= 20
    np.testing.assert_allclose(solution.cost, optimum.cost, rtol=1e-7)
    np.testing.assert_allclose(solution.u, optimum.u, atol=1e-5)
    np.testing.assert_allclose(solution.x, optimum.x, atol=1e-6)
    assert float(jnp.abs(defects(stick_dynamics, solution.x, solution.u)).max()) <= 1e-8


# ----- input checks --------------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
    x0, U0 = jnp.zeros(N), jnp.zeros((T_TOY, M))
    with pytest.raises(ForethoughtError, match="X0"):
        collocation(toy_cost, toy_dynamics, x0, U0, X0=jnp.zeros((T_TOY, N)))
    with pytest.raises(ForethoughtError, match="U0"):
        collocation(toy_cost, toy_dynamics, x0, jnp.zeros(T_TOY))
    with pytest.raises(ForethoughtError, match="dynamics"):
        collocation(toy_cost, lambda x, u, t: x[:2], x0, U0)
    with pytest.raises(ForethoughtError, match="terminal_cost"):
        collocation(toy_cost, toy_dynamics, x0, U0, terminal_cost=lambda x: x)
    with pytest.raises(ForethoughtError, match="penalty"):
        collocation(toy_cost, toy_dynamics, x0, U0, penalty_factor=1.0)
