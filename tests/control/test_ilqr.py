"""iLQR and DDP (seed 000, "iLQR", "DDP"): derivative checks by finite differences, trajax's
acrobot problem, swing-ups, the linear-quadratic case, vmap and dtypes."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought import systems
from forethought.control.ilqr import (ddp, gradient, ilqr, linearize, linearize_second_order,
                                      quadratize, quadratize_final, rollout)
from forethought.control.lqr import backward_pass, lqr
from forethought.control.solution import trajax_objective
from forethought.errors import ForethoughtError
from forethought.systems.base import wrap_angle
from tests.control.problems import toy_cost, toy_dynamics, toy_final


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# ----- finite-difference checks (float64) --------------------------------------------------------
# A small system with everything the solvers must get right: state-control cross terms, dynamics
# nonlinear in u (so the DDP term f_uu is not zero), time-dependent cost, a separate final cost.



ACROBOT = systems.make("acrobot")


# The same functions of z = [x; u] and t, for finite differences.
def toy_dynamics_z(z, t):
    return toy_dynamics(z[:3], z[3:], t)


def toy_cost_z(z, t):
    return toy_cost(z[:3], z[3:], t)


def toy_final_z(x, t):
    return toy_final(x)


def acrobot_dynamics_z(z, t):
    return ACROBOT.dynamics(z[:4], z[4:], t)


@functools.cache
def batched(fun):
    """`fun(z, t)` over a batch of `z`, compiled once per function (and batch size)."""
    return jax.jit(jax.vmap(fun, in_axes=(0, None)))


def fd_jacobian(fun, z, t=0, h=1e-6):
    """Central differences of `fun(., t)` at `z [N]`: `[*fun(z, t).shape, N]`."""
    E = h * np.eye(z.size)
    values = np.asarray(batched(fun)(np.concatenate([z + E, z - E]), t))
    return np.moveaxis((values[:z.size] - values[z.size:]) / (2 * h), 0, -1)


def fd_hessian(fun, z, t=0, h=1e-4):
    """Second differences of the values of `fun(., t)` (no derivatives):
    `[*fun(z, t).shape, N, N]`."""
    N = z.size
    E = h * np.eye(N)
    a, b = E[:, None, :], E[None, :, :]
    points = np.stack([z + a + b, z + a - b, z - a + b, z - a - b]).reshape(4 * N * N, N)
    values = np.asarray(batched(fun)(points, t))
    values = values.reshape(4, N, N, *values.shape[1:])
    hessian = (values[0] - values[1] - values[2] + values[3]) / (4 * h * h)
    return np.moveaxis(hessian, (0, 1), (-2, -1))


def toy_points(T=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(T, 3)), rng.normal(size=(T, 2))


def test_linearization_matches_finite_differences(x64):
    X, U = toy_points()
    Xa = np.random.default_rng(1).normal(size=(3, 4))
    cases = ((toy_dynamics, toy_dynamics_z, X, U), (ACROBOT.dynamics, acrobot_dynamics_z, Xa,
                                                    U[:, :1]))
    for dynamics, dynamics_z, X, U in cases:
        F = jax.jit(linearize, static_argnums=0)(dynamics, X, U)
        for t in range(len(U)):
            np.testing.assert_allclose(F[t], fd_jacobian(dynamics_z, np.r_[X[t], U[t]], t),
                                       atol=1e-7)


def test_quadratization_matches_finite_differences(x64):
    X, U = toy_points()
    C, c = jax.jit(quadratize, static_argnums=0)(toy_cost, X, U)
    for t in range(len(U)):
        z = np.r_[X[t], U[t]]
        np.testing.assert_allclose(c[t], fd_jacobian(toy_cost_z, z, t), atol=1e-7)
        np.testing.assert_allclose(C[t], fd_hessian(toy_cost_z, z, t), atol=1e-5)
    V_T, v_T = jax.jit(quadratize_final, static_argnums=0)(toy_final, X[0])
    np.testing.assert_allclose(v_T, fd_jacobian(toy_final_z, X[0]), atol=1e-7)
    np.testing.assert_allclose(V_T, fd_hessian(toy_final_z, X[0]), atol=1e-5)


def test_ddp_second_order_dynamics_terms_match_finite_differences(x64):
    X, U = toy_points()
    F, F2 = jax.jit(linearize_second_order, static_argnums=0)(toy_dynamics, X, U)
    np.testing.assert_allclose(F, jax.jit(linearize, static_argnums=0)(toy_dynamics, X, U),
                               atol=1e-12)
    for t in range(len(U)):
        np.testing.assert_allclose(F2[t], fd_hessian(toy_dynamics_z, np.r_[X[t], U[t]], t),
                                   atol=1e-5)
    assert np.abs(F2[:, :, 3:, 3:]).max() > 0.01  # f_uu is exercised


def test_one_step_ddp_is_a_newton_step_and_ilqr_is_not(x64):
    """With T = 1 the objective is J(u) = cost(x0, u, 0) + final(dynamics(x0, u, 0)); DDP's step
    k must be Newton's, -H^-1 g, with g and H of J by finite differences; iLQR's misses the
    dynamics' curvature."""
    X, U = toy_points(T=1, seed=2)
    x0, u0 = X[0], U[0]

    @jax.jit
    def ddp_and_ilqr_steps(X, U):
        F, F2 = linearize_second_order(toy_dynamics, X, U)
        C, c = quadratize(toy_cost, X, U)
        V_T, v_T = quadratize_final(toy_final, toy_dynamics(X[0], U[0], 0))
        f = jnp.zeros((1, 3))
        return (backward_pass(F, f, C, c, V_T, v_T, F2=F2).k[0],
                backward_pass(F, f, C, c, V_T, v_T).k[0])

    def J(u, t):
        return toy_cost(x0, u, t) + toy_final(toy_dynamics(x0, u, t))

    newton = -np.linalg.solve(fd_hessian(J, u0), fd_jacobian(J, u0))
    k_ddp, k_ilqr = ddp_and_ilqr_steps(X, U)
    np.testing.assert_allclose(k_ddp, newton, atol=1e-6)
    assert np.abs(k_ilqr - newton).max() > 1e-3


def test_adjoint_gradient_matches_finite_differences(x64):
    rng = np.random.default_rng(3)
    x0, U = rng.normal(size=3), 0.3 * rng.normal(size=(8, 2))

    @jax.jit
    def adjoint_gradient(U):
        X = rollout(toy_dynamics, x0, U)
        F = linearize(toy_dynamics, X[:-1], U)
        _, c = quadratize(toy_cost, X[:-1], U)
        _, v_T = quadratize_final(toy_final, X[-1])
        return gradient(F, c, v_T)

    def objective(flat, t):
        U = flat.reshape(8, 2)
        return trajax_objective(toy_cost, rollout(toy_dynamics, x0, U), U, toy_final)

    np.testing.assert_allclose(adjoint_gradient(U), fd_jacobian(objective, U.ravel()).reshape(8, 2),
                               atol=1e-7)


# ----- trajax's acrobot problem ------------------------------------------------------------------

@pytest.fixture(scope="module")
def acrobot():
    """iLQR and DDP on trajax's `testAcrobotSolve`, with its one-function cost convention (the
    terminal term is `cost(x_T, 0, T)`), in float64."""
    system = systems.make("acrobot")
    T = system.horizon

    def cost(x, u, t):
        return jnp.where(t == T, system.terminal_cost(x), system.cost(x, u, t))

    with jax.enable_x64(True):
        x0, U0 = jnp.zeros(4), jnp.zeros((T, 1))

        def objective(U):
            return trajax_objective(cost, rollout(system.dynamics, x0, U), U)

        grad_norm = jax.jit(lambda U: jnp.linalg.norm(jax.grad(objective)(U)))
        out = {"J0": float(objective(U0))}
        for solver in (ilqr, ddp):
            solution = solver(cost, system.dynamics, x0, U0, maxiter=100)
            out[solver.__name__] = jax.tree.map(np.asarray, solution)
            out[solver.__name__ + "_grad_norm"] = float(grad_norm(solution.u))
            out[solver.__name__ + "_system_objective"] = float(trajax_objective(
                system.cost, solution.x, solution.u, system.terminal_cost))
    return out


def test_acrobot_zero_controls_cost(acrobot):
    assert abs(acrobot["J0"] - 4959.476212) < 1e-6


@pytest.mark.parametrize("name", ["ilqr", "ddp"])
def test_acrobot_solve_to_threshold(acrobot, name):
    solution = acrobot[name]
    assert solution.cost < 51.0
    assert solution.iterations <= 100 and solution.converged
    assert acrobot[name + "_grad_norm"] < 1e-4
    # The same objective through the system's stage and terminal costs.
    assert abs(acrobot[name + "_system_objective"] - solution.cost) < 1e-9
    # Up, at rest: the terminal weight 1000 holds x_T near the goal.
    np.testing.assert_allclose(solution.x[-1], [np.pi, 0, 0, 0], atol=0.02)
    # The history only decreases and ends at the returned objective.
    history = solution.history
    assert np.all(np.diff(history) <= 0) and history[0] < acrobot["J0"]
    assert np.all(history[solution.iterations - 1:] == solution.cost)
    assert solution.K.shape == (50, 1, 4) and solution.k.shape == (50, 1)


def test_ddp_needs_no_more_iterations_than_ilqr(acrobot):
    assert acrobot["ddp"].iterations <= acrobot["ilqr"].iterations


def test_acrobot_float32():
    system = systems.make("acrobot")
    solution = ilqr(system.cost, system.dynamics, jnp.zeros(4), jnp.zeros((50, 1)),
                    terminal_cost=system.terminal_cost)
    assert solution.u.dtype == jnp.float32 and solution.cost.dtype == jnp.float32
    assert solution.cost < 51.0 and solution.converged


# ----- swing-ups from rest (float32) -------------------------------------------------------------

SWING_UPS = {
    "pendulum": dict(),
    "cartpole": dict(cost_kind="quadratic", cart_mass=1.0, pole_mass=0.1, pole="point", dt=0.05,
                     horizon=100),
}


@pytest.fixture(scope="module")
def swing_up_systems():
    return {name: systems.make(name, **params) for name, params in SWING_UPS.items()}


def solve_swing_up(solver, system, x0):
    U0 = jnp.zeros((system.horizon, system.action_dim))
    return solver(system.cost, system.dynamics, x0, U0, terminal_cost=system.terminal_cost)


@pytest.mark.parametrize("solver", [ilqr, ddp])
@pytest.mark.parametrize("name", list(SWING_UPS))
def test_swing_up_from_rest(swing_up_systems, name, solver):
    system = swing_up_systems[name]
    x0 = system.initial_state()
    solution = solve_swing_up(solver, system, x0)
    assert solution.converged
    assert solution.cost < 0.5 * system.objective(x0, jnp.zeros((system.horizon, 1)))
    angle = 0 if name == "pendulum" else 1
    x_T = np.asarray(solution.x[-1])
    assert abs(wrap_angle(x_T[angle] - np.pi)) < 0.2, x_T
    assert np.all(np.abs(x_T) < 4.0), x_T  # velocities (and the cart) settle too
    if name == "cartpole":
        assert abs(x_T[0]) < 0.1


def test_gains_are_finite_where_squashed_actions_saturate(x64):
    """Squashed torques `u = 4 tanh(v / 4)` on the pendulum, from random controls: where `v`
    saturates `Q_uu` is nearly singular and the loop's last backward pass can fail (before the
    fix 9 of these 16 runs returned NaN gains). The gains returned are finite and are a working
    feedback law about the returned trajectory: from a start 0.02 rad off the closed loop
    `v_t = v̂_t + K_t (x_t - x̂_t)` costs less than replaying `v̂` open loop."""
    pendulum = systems.make("pendulum")
    u_max = pendulum.max_torque

    def dynamics(x, v, t):
        return pendulum.dynamics(x, u_max * jnp.tanh(v / u_max), t)

    def cost(x, v, t):
        return pendulum.cost(x, u_max * jnp.tanh(v / u_max), t)

    x0 = pendulum.initial_state()
    U0 = u_max * jax.random.normal(jax.random.key(3), (16, pendulum.horizon, 1), jnp.float64)
    solutions = jax.vmap(lambda U: ilqr(cost, dynamics, x0, U, terminal_cost=pendulum.terminal_cost,
                                        maxiter=300))(U0)
    assert bool(jnp.all(jnp.isfinite(solutions.K))) and bool(jnp.all(jnp.isfinite(solutions.k)))

    def run(solution, feedback):
        def step(x, inputs):
            x_hat, v_hat, K, t = inputs
            v = v_hat + feedback * (K @ (x - x_hat))
            return dynamics(x, v, t), cost(x, v, t)

        x_T, costs = jax.lax.scan(step, x0 + jnp.asarray([0.02, 0.0]),
                                  (solution.x[:-1], solution.u, solution.K, jnp.arange(pendulum.horizon)))
        return costs.sum() + pendulum.terminal_cost(x_T)

    closed = jax.vmap(run, in_axes=(0, None))(solutions, 1.0)
    open_loop = jax.vmap(run, in_axes=(0, None))(solutions, 0.0)
    assert bool(jnp.all(closed < open_loop)), (closed, open_loop)


class Toy(eqx.Module):
    """The toy problem as a module with an array parameter, as a learned model would be."""
    gain: jax.Array

    def dynamics(self, x, u, t):
        return toy_dynamics(x, self.gain * u, t)


def test_vmap_over_x0_matches_single_solves(x64):
    toy = Toy(gain=jnp.asarray(1.0))
    x0s = 0.5 * jax.random.normal(jax.random.key(0), (3, 3))
    U0 = jnp.zeros((8, 2))
    batch = jax.vmap(lambda x0: ilqr(toy_cost, toy.dynamics, x0, U0, terminal_cost=toy_final))(x0s)
    assert batch.cost.shape == (3,) and bool(jnp.all(batch.converged))
    for i, x0 in enumerate(x0s):
        single = ilqr(toy_cost, toy.dynamics, x0, U0, terminal_cost=toy_final)
        np.testing.assert_allclose(batch.u[i], single.u, atol=1e-6)
        np.testing.assert_allclose(batch.cost[i], single.cost, rtol=1e-12)


def test_arrays_inside_modules_are_traced_not_recompiled():
    from forethought.control.ilqr import _solve

    x0, U0 = jnp.ones(3), jnp.zeros((8, 2))
    costs = []
    for gain in (1.0, 1.5):
        toy = Toy(gain=jnp.asarray(gain))
        costs.append(float(ilqr(toy_cost, toy.dynamics, x0, U0, terminal_cost=toy_final).cost))
        if gain == 1.0:
            compiled = _solve._cache_size()
    assert _solve._cache_size() == compiled
    assert costs[0] != costs[1]


# ----- the linear-quadratic case -----------------------------------------------------------------

def test_linear_quadratic_problem_is_solved_in_one_step(x64):
    """On linear dynamics and a quadratic cost, one iLQR/DDP step is the LQR solution. iLQR runs
    with trajax's convention (the terminal cost inside `cost` at t == T), DDP with
    `terminal_cost`."""
    rng = np.random.default_rng(4)
    T, n, m = 6, 3, 2
    F = rng.normal(size=(T, n, n + m)) / np.sqrt(n + m)
    f = rng.normal(size=(T, n))
    M = rng.normal(size=(T, n + m, n + m))
    C = M @ np.swapaxes(M, 1, 2) / (n + m) + 0.5 * np.eye(n + m)
    c = rng.normal(size=(T, n + m))
    C_T, c_T = np.eye(n), rng.normal(size=n)
    x0 = rng.normal(size=n)
    reference = lqr(F, f, C, c, x0, C_T, c_T)
    F, f, C, c, C_T, c_T = map(jnp.asarray, (F, f, C, c, C_T, c_T))

    def dynamics(x, u, t):
        return F[t] @ jnp.concatenate([x, u]) + f[t]

    def final(x):
        return 0.5 * x @ C_T @ x + c_T @ x

    def stage(x, u, t):
        z = jnp.concatenate([x, u])
        return 0.5 * z @ C[jnp.minimum(t, T - 1)] @ z + c[jnp.minimum(t, T - 1)] @ z

    def trajax_cost(x, u, t):
        return jnp.where(t == T, final(x), stage(x, u, t))

    for solution in (ilqr(trajax_cost, dynamics, x0, jnp.zeros((T, m))),
                     ddp(stage, dynamics, x0, jnp.zeros((T, m)), terminal_cost=final)):
        assert solution.converged and solution.iterations == 1
        np.testing.assert_allclose(solution.u, reference.u, atol=1e-8)
        np.testing.assert_allclose(solution.cost, reference.cost, rtol=1e-10)
        # Deviation gains about the optimum: the LQR feedback, and no feedforward left.
        np.testing.assert_allclose(solution.K, reference.K, atol=1e-8)
        np.testing.assert_allclose(solution.k, 0.0, atol=1e-8)


# ----- input checks ------------------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
    x0, U0 = jnp.zeros(3), jnp.zeros((4, 2))
    with pytest.raises(ForethoughtError, match="dynamics"):
        ilqr(toy_cost, lambda x, u, t: x[:2], x0, U0)
    with pytest.raises(ForethoughtError, match="cost"):
        ddp(lambda x, u, t: x, toy_dynamics, x0, U0)
    with pytest.raises(ForethoughtError, match="U0"):
        ilqr(toy_cost, toy_dynamics, x0, jnp.zeros(4))
    with pytest.raises(ForethoughtError, match="terminal_cost"):
        ilqr(toy_cost, toy_dynamics, x0, U0, terminal_cost=lambda x: x)
