import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought import systems
from forethought.errors import ForethoughtError
from forethought.systems.linear import Linear


def test_double_integrator_step_is_the_exact_discretization():
    system = systems.make("double-integrator", dt=0.2)
    x, u = jnp.array([1.0, -0.5]), jnp.array([0.7])
    expected = [1.0 + 0.2 * -0.5 + 0.02 * 0.7, -0.5 + 0.2 * 0.7]
    np.testing.assert_allclose(system.dynamics(x, u), expected, rtol=1e-6)
    np.testing.assert_array_equal(system.initial_state(), [1.0, 0.0])
    assert (system.state_dim, system.action_dim, system.horizon) == (2, 1, 50)


def test_double_integrator_matrices_follow_a_traced_dt():
    A, B = jax.jit(lambda dt: (lambda s: (s.A, s.B))(systems.make("double-integrator", dt=dt)))(0.5)
    np.testing.assert_allclose(A, [[1.0, 0.5], [0.0, 1.0]])
    np.testing.assert_allclose(B, [[0.125], [0.5]])


def test_linear_step_and_costs_are_the_formulas():
    system = systems.make("linear", state_dim=3, action_dim=2, seed=1)
    x, u = np.array([0.5, -1.0, 2.0], np.float32), np.array([1.0, -3.0], np.float32)
    A, B = np.asarray(system.A), np.asarray(system.B)
    np.testing.assert_allclose(system.dynamics(x, u), A @ x + B @ u, rtol=1e-6)
    assert float(system.cost(x, u)) == pytest.approx(0.5 * (x @ x) + 0.5 * (u @ u), rel=1e-6)
    assert float(system.terminal_cost(x)) == pytest.approx(0.5 * (x @ x), rel=1e-6)
    assert system.state_names == ("x0", "x1", "x2") and system.action_names == ("u0", "u1")
    assert system.action_low.shape == (2,)


@pytest.mark.parametrize("name", ["double-integrator", "linear"])
def test_rollout_matches_matrix_powers(name):
    system = systems.make(name)
    A, B = np.asarray(system.A, np.float64), np.asarray(system.B, np.float64)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(system.state_dim)
    U = rng.standard_normal((12, system.action_dim))
    X = system.rollout(jnp.asarray(x0, jnp.float32), jnp.asarray(U, jnp.float32))
    power = np.linalg.matrix_power
    for t in range(len(U) + 1):
        expected = power(A, t) @ x0 + sum(power(A, t - 1 - k) @ B @ U[k] for k in range(t))
        np.testing.assert_allclose(X[t], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stable, radius", [(True, 0.9), (False, 1.1)])
@pytest.mark.parametrize("n, m, seed", [(4, 2, 0), (3, 1, 1), (6, 2, 2)])
def test_random_draws_have_the_radius_asked_and_are_controllable(stable, radius, n, m, seed):
    system = systems.make("linear", state_dim=n, action_dim=m, seed=seed, stable=stable)
    A, B = np.asarray(system.A, np.float64), np.asarray(system.B, np.float64)
    assert A.shape == (n, n) and B.shape == (n, m)
    assert np.max(np.abs(np.linalg.eigvals(A))) == pytest.approx(radius, rel=1e-5)
    controllability = np.hstack([np.linalg.matrix_power(A, k) @ B for k in range(n)])
    assert np.linalg.matrix_rank(controllability) == n


def test_seed_names_the_draw():
    same = [np.asarray(systems.make("linear", seed=3).A) for _ in range(2)]
    np.testing.assert_array_equal(*same)
    assert not np.allclose(same[0], systems.make("linear", seed=4).A)


def test_given_matrices_are_used_and_checked():
    A, B = np.diag([0.5, 2.0]), np.array([[0.0], [1.0]])
    system = Linear(state_dim=2, action_dim=1, A=A, B=B, R=3.0 * np.eye(1))
    np.testing.assert_array_equal(system.A, A)
    np.testing.assert_array_equal(system.R, [[3.0]])
    np.testing.assert_array_equal(system.Qf, np.eye(2))
    assert system.A.dtype == jnp.float32
    with pytest.raises(ForethoughtError, match=r"linear: B must have shape \(2, 1\), got \(2, 2\)"):
        Linear(state_dim=2, action_dim=1, A=A, B=np.eye(2))
    with pytest.raises(ForethoughtError, match="state_dim must be an integer >= 1"):
        Linear(state_dim=0)


def test_a_batch_of_systems_vmaps():
    one, two = Linear(seed=0), Linear(seed=1)
    # `seed` is static (part of the tree structure): batch the drawn matrices, not the seeds.
    other = dataclasses.replace(one, A=two.A, B=two.B)
    batch = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), one, other)
    x, u = jnp.ones(4), jnp.ones(2)
    out = jax.vmap(lambda s: s.dynamics(x, u))(batch)
    np.testing.assert_allclose(out, [one.dynamics(x, u), two.dynamics(x, u)], rtol=1e-6)
    assert dataclasses.replace(one, max_action=2.0).max_action == 2.0
