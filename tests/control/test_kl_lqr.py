"""LQR under a KL bound (`control/kl_lqr.py`) against closed forms and Monte Carlo: the trajectory
KL and the expected cost of a linear-Gaussian controller match sampling, the bound holds and binds,
a slack bound gives the LQR optimum, and a tight one keeps the old controller."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought.control.kl_lqr import (LinearGaussianController, QuadraticCost, expected_cost, kl_update,
                                        marginals, quadratize_cost, step_multiplier, trajectory_kl)
from forethought.control.lqr import lqr_backward
from forethought.models.linear_gaussian import LinearGaussianDynamics

T, n, m = 15, 2, 1


@pytest.fixture(scope="module")
def problem():
    with jax.enable_x64(True):
        dt = 0.1
        A = jnp.tile(jnp.array([[1.0, dt], [0.0, 1.0]]), (T, 1, 1))
        B = jnp.tile(jnp.array([[0.0], [dt]]), (T, 1, 1))
        dynamics = LinearGaussianDynamics(A=A, B=B, c=jnp.tile(jnp.array([0.0, -0.05]), (T, 1)),
                                          N=jnp.tile(1e-3 * jnp.eye(n), (T, 1, 1)))
        C = jnp.tile(jnp.diag(jnp.array([1.0, 0.1, 0.05])), (T, 1, 1))
        cost = QuadraticCost(C=C, c=jnp.tile(jnp.array([0.1, 0.0, 0.0]), (T, 1)), c0=jnp.zeros(T),
                             C_T=10 * jnp.eye(n), c_T=jnp.zeros(n), c0_T=jnp.zeros(()))
        old = LinearGaussianController.constant(T, n, jnp.array([0.2]), 1.0, jnp.float64)
        x0, S0 = jnp.array([1.0, 0.0]), 0.01 * jnp.eye(n)
        yield dynamics, cost, old, x0, S0


def _sample(dynamics, cost, new, old, x0, S0, samples=100_000):
    """Monte Carlo log-ratio of trajectory densities and total costs."""
    def trajectory(key):
        k0, k1 = jax.random.split(key)

        def step(x, inputs):
            t, k = inputs
            ku, kx = jax.random.split(k)
            u = new.sample(x, t, ku)
            z = jnp.concatenate([x, u])
            c = 0.5 * z @ cost.C[t] @ z + cost.c[t] @ z + cost.c0[t]
            return dynamics.sample(x, u, t, kx), (new.log_prob(x, u, t) - old.log_prob(x, u, t), c)

        x = x0 + jnp.linalg.cholesky(S0) @ jax.random.normal(k0, (n,))
        x_T, (ratio, c) = jax.lax.scan(step, x, (jnp.arange(T), jax.random.split(k1, T)))
        return ratio.sum(), c.sum() + 0.5 * x_T @ cost.C_T @ x_T + cost.c_T @ x_T + cost.c0_T

    return jax.jit(jax.vmap(trajectory))(jax.random.split(jax.random.key(0), samples))


def test_kl_and_expected_cost_match_monte_carlo(problem):
    with jax.enable_x64(True):
        dynamics, cost, old, x0, S0 = problem
        update = kl_update(dynamics, cost, old, x0, S0, 2.0)
        ratio, total = _sample(dynamics, cost, update.controller, old, x0, S0)
        for exact, draws in ((update.kl, ratio), (update.expected_cost, total)):
            se = float(jnp.std(draws)) / np.sqrt(draws.shape[0])
            assert abs(float(exact) - float(jnp.mean(draws))) < 5 * se, (float(exact), float(jnp.mean(draws)), se)


def test_the_bound_holds_binds_and_trades_kl_for_cost(problem):
    with jax.enable_x64(True):
        dynamics, cost, old, x0, S0 = problem
        previous = float(expected_cost(cost, marginals(old, dynamics, x0, S0)))
        for epsilon in (0.1, 1.0, 10.0):
            update = kl_update(dynamics, cost, old, x0, S0, epsilon)
            assert bool(update.ok)
            assert float(update.kl) <= epsilon * (1 + 1e-9)
            assert float(update.kl) == pytest.approx(epsilon, rel=1e-6)  # the bound binds
            assert float(update.expected_cost) < previous                # a larger step buys more
            previous = float(update.expected_cost)
            # the KL reported is the KL of the controller returned
            marg = marginals(update.controller, dynamics, x0, S0)
            assert float(trajectory_kl(update.controller, old, marg)) == pytest.approx(float(update.kl))


def test_a_slack_bound_gives_the_lqr_optimum(problem):
    with jax.enable_x64(True):
        dynamics, cost, old, x0, S0 = problem
        update = kl_update(dynamics, cost, old, x0, S0, 1e9, eta_min=1e-12)
        back = lqr_backward(dynamics.F, dynamics.f, cost.C, cost.c, cost.C_T, cost.c_T)
        np.testing.assert_allclose(update.controller.K, back.K, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(update.controller.k, back.k, rtol=1e-6, atol=1e-8)
        # the maximum-entropy covariance is Q_uu^-1 of the cost scaled by 1 / eta: tiny here
        assert float(jnp.max(update.controller.cov)) < 1e-9


def test_a_tight_bound_keeps_the_old_controller(problem):
    with jax.enable_x64(True):
        dynamics, cost, old, x0, S0 = problem
        update = kl_update(dynamics, cost, old, x0, S0, 1e-9)
        assert float(update.kl) <= 1e-9
        np.testing.assert_allclose(update.controller.k, old.k, atol=1e-3)
        np.testing.assert_allclose(update.controller.cov, old.cov, rtol=1e-3)


def test_quadratize_cost_is_exact_for_a_quadratic_cost(problem):
    with jax.enable_x64(True):
        dynamics, cost, old, x0, S0 = problem

        def stage(x, u, t):
            z = jnp.concatenate([x, u])
            return 0.5 * z @ cost.C[t] @ z + cost.c[t] @ z

        def final(x):
            return 0.5 * x @ cost.C_T @ x

        X = jax.random.normal(jax.random.key(1), (3, T + 1, n))
        U = jax.random.normal(jax.random.key(2), (3, T, m))
        quad = quadratize_cost(stage, final, X, U)
        np.testing.assert_allclose(quad.C, cost.C, atol=1e-10)
        np.testing.assert_allclose(quad.c, cost.c, atol=1e-10)
        np.testing.assert_allclose(quad.c0, 0.0, atol=1e-10)
        np.testing.assert_allclose(quad.C_T, cost.C_T, atol=1e-10)


def test_marginals_match_sampling(problem):
    with jax.enable_x64(True):
        dynamics, cost, old, x0, S0 = problem
        controller = kl_update(dynamics, cost, old, x0, S0, 1.0).controller
        marg = marginals(controller, dynamics, x0, S0)

        def trajectory(key):
            def step(x, inputs):
                t, k = inputs
                ku, kx = jax.random.split(k)
                u = controller.sample(x, t, ku)
                return dynamics.sample(x, u, t, kx), jnp.concatenate([x, u])
            k0, k1 = jax.random.split(key)
            x = x0 + jnp.linalg.cholesky(S0) @ jax.random.normal(k0, (n,))
            return jax.lax.scan(step, x, (jnp.arange(T), jax.random.split(k1, T)))[1]

        Z = jax.jit(jax.vmap(trajectory))(jax.random.split(jax.random.key(3), 50_000))
        np.testing.assert_allclose(Z.mean(0), marg.z_mean, atol=0.02)
        cov = jnp.einsum("ntd,nte->tde", Z - Z.mean(0), Z - Z.mean(0)) / Z.shape[0]
        np.testing.assert_allclose(cov, marg.z_cov, atol=0.03)


def test_step_multiplier_grows_when_predictions_hold_and_shrinks_when_not():
    assert step_multiplier(10.0, 8.0, 8.0, 1.0) > 1.0      # actual as predicted: grow (x5 cap)
    assert step_multiplier(10.0, 8.0, 11.0, 1.0) < 1.0     # got worse: shrink
    assert step_multiplier(10.0, 8.0, 8.0, 9.0, upper=10.0) == 10.0
    assert step_multiplier(10.0, 8.0, float("nan"), 1.0) == 0.5
