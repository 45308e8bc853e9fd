"""PILCO's closed forms (seed 003): every moment-matching block against a large Monte Carlo
estimate (within a few standard errors), the expected saturating cost against Monte Carlo, the
chained step against sampling, and the policy gradient against finite differences. float64."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought.models.gp import GP, GPConfig
from forethought.models.moments import (augment, expected_saturating_cost, saturate, saturating_cost,
                                        saturation_block, sin_moments, trig_block)
from forethought.rl.pilco import (Layout, LinearPolicy, RBFPolicy, SaturatingCost, expected_total_cost,
                                  optimise_policy, step_moments, tip_cost)
from forethought.systems.cartpole import CartPole
from forethought.systems.pendulum import Pendulum

SAMPLES = 400_000


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def gaussian(D, seed, scale=0.5):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(D, D)) * scale
    return rng.normal(size=D), A @ A.T + 0.05 * np.eye(D)


def monte_carlo(fn, m, S, seed=1):
    """Mean, covariance and `S^{-1} cov[x, y]` of `y = fn(x)` from samples, and the standard
    errors of the mean and covariance entries."""
    x = np.random.default_rng(seed).multivariate_normal(m, S, SAMPLES)
    y = np.asarray(jax.vmap(fn)(jnp.asarray(x)))
    mean = y.mean(0)
    yc, xc = y - mean, x - x.mean(0)
    cov = yc.T @ yc / SAMPLES
    cross = xc.T @ yc / SAMPLES
    se_mean = y.std(0) / np.sqrt(SAMPLES)
    se_cov = np.sqrt(np.var(yc[:, :, None] * yc[:, None, :], axis=0) / SAMPLES)
    se_cross = np.sqrt(np.var(xc[:, :, None] * yc[:, None, :], axis=0) / SAMPLES)
    return mean, cov, cross, se_mean, se_cov, se_cross


def assert_block_matches_monte_carlo(block, fn, m, S):
    M, Sy, V = (np.asarray(a) for a in block(jnp.asarray(m), jnp.asarray(S)))
    mean, cov, cross, se_mean, se_cov, se_cross = monte_carlo(fn, m, S)
    np.testing.assert_array_less(np.abs(M - mean), 5 * se_mean + 1e-9)
    np.testing.assert_array_less(np.abs(Sy - cov), 5 * se_cov + 1e-9)
    np.testing.assert_array_less(np.abs(S @ V - cross), 5 * se_cross + 1e-9)


def test_sin_moments_match_monte_carlo():
    m, S = gaussian(3, 0)
    A = np.array([[1.0, 0, 0], [0, 2.0, -1.0], [0.5, 0.5, 0.5], [1.0, 0, 0]])
    phase = np.array([0.0, 0.3, -1.0, np.pi / 2])
    block = lambda m, S: sin_moments(m, S, jnp.asarray(A), jnp.asarray(phase))  # noqa: E731
    assert_block_matches_monte_carlo(block, lambda x: jnp.sin(jnp.asarray(A) @ x + phase), m, S)


def test_trig_block_matches_monte_carlo():
    m, S = gaussian(4, 1, scale=0.8)
    fn = lambda x: jnp.concatenate([jnp.sin(x[jnp.array([1, 3])]), jnp.cos(x[jnp.array([1, 3])])])  # noqa: E731
    assert_block_matches_monte_carlo(trig_block((1, 3), 4), fn, m, S)


def test_saturation_block_matches_monte_carlo_and_bounds_the_action():
    m, S = gaussian(2, 2, scale=1.5)
    u_max = jnp.array([2.0, 10.0])
    assert_block_matches_monte_carlo(saturation_block(u_max), lambda u: saturate(u, u_max), m, S)
    u = jnp.linspace(-20, 20, 2001)
    assert float(jnp.max(jnp.abs(saturate(u, 3.0)))) <= 3.0 + 1e-12
    np.testing.assert_allclose(saturate(jnp.pi / 2, 3.0), 3.0)


@pytest.mark.parametrize("kind", ["rbf", "linear"])
def test_policy_moments_match_monte_carlo(kind):
    m, S = gaussian(3, 3)
    key = jax.random.key(0)
    if kind == "rbf":
        policy = RBFPolicy.create(jnp.asarray(m), jnp.asarray(S), 10, [2.0, 1.0], key)
        policy = eqx.tree_at(lambda p: p.weights, policy, 2 * jax.random.normal(key, (2, 10)))
    else:
        policy = LinearPolicy.create(3, [2.0, 1.0], key, scale=1.0)
    assert_block_matches_monte_carlo(policy.raw_moments, policy.raw, m, S)


def test_chained_blocks_keep_the_cross_covariances_exact():
    """trig features of a Gaussian, then a linear map of them: the joint's blocks match sampling."""
    m, S = gaussian(2, 4)
    W = jnp.array([[1.0, -2.0, 0.5], [0.3, 1.0, 1.0]])
    mz, Sz = augment(jnp.asarray(m), jnp.asarray(S), [0, 1], trig_block((0,), 2))
    mz, Sz = augment(mz, Sz, [1, 2, 3], lambda a, b: (W @ a, W @ b @ W.T, W.T))

    def fn(x):
        f = jnp.concatenate([x[1:], jnp.sin(x[:1]), jnp.cos(x[:1])])
        return jnp.concatenate([x, jnp.sin(x[:1]), jnp.cos(x[:1]), W @ f])

    x = np.random.default_rng(5).multivariate_normal(m, S, SAMPLES)
    y = np.asarray(jax.vmap(fn)(jnp.asarray(x)))
    np.testing.assert_allclose(mz, y.mean(0), atol=5e-3)
    np.testing.assert_allclose(Sz, np.cov(y.T), atol=1e-2)


def test_expected_saturating_cost_matches_monte_carlo():
    m, S = gaussian(3, 6)
    C = np.array([[1.0, 0.5, 0], [0, 0, 2.0]])  # a singular weight, as on the cart-pole
    W, target = jnp.asarray(C.T @ C), jnp.array([0.2, -0.1, 0.4])
    mean, _, _, se, _, _ = monte_carlo(lambda x: saturating_cost(x, W, target)[None], m, S)
    expected = float(expected_saturating_cost(jnp.asarray(m), jnp.asarray(S), W, target))
    assert abs(expected - mean[0]) < 5 * se[0]
    # a point input gives the cost itself
    np.testing.assert_allclose(expected_saturating_cost(jnp.asarray(m), jnp.zeros((3, 3)), W, target),
                               saturating_cost(jnp.asarray(m), W, target), rtol=1e-12)


def test_tip_cost_is_the_systems_own_saturating_cost():
    system = CartPole()
    cost = tip_cost(system)
    from forethought.models.ensemble import state_features
    for x in np.random.default_rng(0).normal(size=(10, 4)) * [1, 3, 1, 1]:
        x = jnp.asarray(x)
        np.testing.assert_allclose(cost(state_features(x, (1,))), system._state_cost(x), rtol=1e-10)
    pend = tip_cost(Pendulum())
    upright = state_features(jnp.array([np.pi, 0.0]), (0,))
    np.testing.assert_allclose(pend(upright), 0.0, atol=1e-12)


# ----- a whole step through a GP ----------------------------------------------------------------

def pendulum_gp(seed=0, n=60):
    system = Pendulum()
    rng = np.random.default_rng(seed)
    x = np.stack([rng.uniform(-1, 1, n), rng.uniform(-2, 2, n)], 1)
    u = rng.uniform(-4, 4, (n, 1))
    next_x = np.asarray(jax.vmap(lambda a, b: system.dynamics(a, b, 0))(jnp.asarray(x), jnp.asarray(u)))
    return system, GP.fit_dynamics(x, u, next_x, jax.random.key(seed), GPConfig(restarts=1), angles=(0,))


@pytest.fixture(scope="module")
def gp_setup():
    with jax.enable_x64(True):
        system, gp = pendulum_gp()
        layout = Layout(2, (0,))
        m0, S0 = jnp.array([0.2, 0.3]), jnp.diag(jnp.array([0.05, 0.1]) ** 2)
        mf, Sf, idx = layout.feature_moments(m0, S0)
        idx = jnp.asarray(idx)
        policy = RBFPolicy.create(mf[idx], Sf[jnp.ix_(idx, idx)] + 1e-6 * jnp.eye(3), 8, 4.0, jax.random.key(1))
        policy = eqx.tree_at(lambda p: p.weights, policy, jax.random.normal(jax.random.key(2), (1, 8)))
        return system, gp, layout, tip_cost(system), policy, m0, S0


def test_one_predicted_step_matches_sampling_through_the_gp(gp_setup):
    """Sample states, act, sample the GP's predictive (mean, variance and noise): the predicted
    next-state moments agree. The chain treats the GP's input as Gaussian, which it is only
    approximately (sin, cos and the saturation of a Gaussian are not), so the tolerance is that
    of the approximation, checked here on a narrow start where it is good."""
    system, gp, layout, cost, policy, m0, S0 = gp_setup
    m1, S1, c0 = step_moments(gp, policy, cost, layout, m0, S0)
    rng = np.random.default_rng(3)
    x = rng.multivariate_normal(np.asarray(m0), np.asarray(S0), 100_000)
    u = np.asarray(jax.vmap(lambda s: policy(jnp.concatenate([s[1:], jnp.sin(s[:1]), jnp.cos(s[:1])])))(jnp.asarray(x)))
    mean, var = gp.predict(gp.inputs(jnp.asarray(x), jnp.asarray(u)), noise=True)
    nxt = x + np.asarray(mean) + np.sqrt(np.asarray(var)) * rng.normal(size=x.shape)
    np.testing.assert_allclose(m1, nxt.mean(0), atol=2e-3)
    np.testing.assert_allclose(S1, np.cov(nxt.T), rtol=0.05, atol=1e-5)
    sampled_cost = np.mean(np.asarray(jax.vmap(lambda s: cost(jnp.concatenate([s[1:], jnp.sin(s[:1]), jnp.cos(s[:1])])))(jnp.asarray(x))))
    np.testing.assert_allclose(c0, sampled_cost, atol=3e-3)


def test_policy_gradient_matches_finite_differences(gp_setup):
    system, gp, layout, cost, policy, m0, S0 = gp_setup
    params, static = eqx.partition(policy, eqx.is_inexact_array)
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def J(v):
        return expected_total_cost(gp, eqx.combine(unravel(v), static), cost, layout, m0, S0, 10)

    grad = np.asarray(jax.grad(J)(flat))
    rng = np.random.default_rng(0)
    for _ in range(3):
        d = rng.normal(size=flat.shape)
        d /= np.linalg.norm(d)
        h = 1e-5
        fd = (float(J(flat + h * d)) - float(J(flat - h * d))) / (2 * h)
        np.testing.assert_allclose(grad @ d, fd, rtol=1e-5, atol=1e-8)


def test_optimising_the_policy_reaches_a_reachable_target(gp_setup):
    """Spin the pendulum up towards theta' = 1.5 rad/s: L-BFGS finds a policy whose predicted cost
    falls well below the random policy's, and that gets closer on the true system."""
    system, gp, layout, _, policy, m0, S0 = gp_setup
    spin = SaturatingCost(jnp.diag(jnp.array([4.0, 0.0, 0.0])), jnp.array([1.5, 0.0, 0.0]))
    tuned, best, initial, iterations = optimise_policy(gp, policy, spin, layout, m0, S0, 10, 40)
    assert float(best) < 0.8 * float(initial) and int(iterations) >= 1

    def final_speed(p):
        x = m0
        for t in range(10):
            x = system.dynamics(x, p(jnp.concatenate([x[1:], jnp.sin(x[:1]), jnp.cos(x[:1])])), t)
        return float(x[1])

    assert abs(final_speed(tuned) - 1.5) < abs(final_speed(policy) - 1.5) - 0.3
