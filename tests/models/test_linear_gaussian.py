"""Time-varying linear-Gaussian dynamics (seed 000, "Local Models"): recovery of A_t, B_t, c_t
and N_t by linear regression, the two Bayesian priors (GMM over a buffer, a global model's
linearization) against plain regression with two rollouts, the planner and LQR interfaces, and
bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from forethought import systems
from forethought.control.lqr import lqr
from forethought.errors import ForethoughtError
from forethought.models.linear_gaussian import (DynamicsGMM, LinearGaussianDynamics,
                                                fit_dynamics_gmm, fit_linear_gaussian,
                                                gmm_prior, linearization_prior)

T = 10


def time_varying_system(n, m, horizon, seed):
    """`A_t, B_t, c_t` that change smoothly with `t`: `[T, n, n]`, `[T, n, m]`, `[T, n]`, with
    `A_t` near a matrix of spectral radius 0.8 so that the states stay of order one."""
    rng = np.random.default_rng(seed)
    A0 = rng.normal(size=(n, n))
    A0 *= 0.8 / np.max(np.abs(np.linalg.eigvals(A0)))
    t = np.arange(horizon)[:, None, None]
    A = A0 + 0.1 * np.sin(0.5 * t) * rng.normal(size=(n, n)) / np.sqrt(n)
    B = rng.normal(size=(n, m)) * (1 + 0.3 * np.cos(0.3 * t))
    c = 0.1 * rng.normal(size=(horizon, n))
    return A, B, c


def rollouts(A, B, c, N, seed, noise=0.05):
    """`N` rollouts `X [N, T+1, n]`, `U [N, T, m]` (float32) with standard normal starts and
    actions; `noise` is the transition noise's standard deviation, or its covariance `[n, n]`."""
    rng = np.random.default_rng(seed)
    horizon, n, m = B.shape
    root = np.linalg.cholesky(noise) if np.ndim(noise) == 2 else noise * np.eye(n)
    X = np.zeros((N, horizon + 1, n))
    U = rng.normal(size=(N, horizon, m))
    X[:, 0] = rng.normal(size=(N, n))
    for t in range(horizon):
        w = rng.normal(size=(N, n)) @ root.T
        X[:, t + 1] = X[:, t] @ A[t].T + U[:, t] @ B[t].T + c[t] + w
    return X.astype(np.float32), U.astype(np.float32)


def parameter_error(model, A, B):
    """Mean over steps of the Frobenius error of `[A_t B_t]`."""
    truth = np.concatenate([A, B], axis=-1)
    return float(np.mean(np.linalg.norm(np.asarray(model.F) - truth, axis=(1, 2))))


def test_regression_recovers_a_time_varying_system_from_five_rollouts():
    A, B, c = time_varying_system(2, 1, T, seed=0)
    X, U = rollouts(A, B, c, 5, seed=1, noise=0.01)
    model = fit_linear_gaussian(X, U)
    assert model.A.shape == (T, 2, 2) and model.B.shape == (T, 2, 1)
    assert model.c.shape == (T, 2) and model.N.shape == (T, 2, 2)
    F = np.concatenate([A, B], axis=-1)
    assert parameter_error(model, A, B) < 0.05  # measured 0.018
    assert np.max(np.abs(np.asarray(model.F) - F)) < 0.15  # every entry of every step; 0.052
    assert np.max(np.abs(np.asarray(model.c) - c)) < 0.06  # 0.018


def test_noise_covariance_is_recovered():
    A, B, c = time_varying_system(2, 1, T, seed=0)
    noise = np.array([[0.010, 0.004], [0.004, 0.005]])
    X, U = rollouts(A, B, c, 100, seed=2, noise=noise)
    model = fit_linear_gaussian(X, U)
    N = np.asarray(model.N)
    assert np.allclose(N, np.swapaxes(N, 1, 2))
    assert np.all(np.linalg.eigvalsh(N) > 0)
    # each step from 100 points (ML estimate, biased low by 4%), and the average over steps
    assert np.max(np.abs(N - noise)) < 0.006  # measured 0.003
    assert np.linalg.norm(N.mean(0) - noise) / np.linalg.norm(noise) < 0.15  # 0.03


@pytest.fixture(scope="module")
def linear_system_and_gmm():
    """A random linear system (`systems.make("linear")`) and a GMM over 400 of its transitions."""
    system = systems.make("linear", state_dim=3, action_dim=2, seed=1)
    A = np.broadcast_to(np.asarray(system.A), (T, 3, 3))
    B = np.broadcast_to(np.asarray(system.B), (T, 3, 2))
    c = np.zeros((T, 3))
    X, U = rollouts(A, B, c, 40, seed=10)
    gmm = fit_dynamics_gmm(X[:, :-1].reshape(-1, 3), U.reshape(-1, 2), X[:, 1:].reshape(-1, 3),
                           jax.random.key(0))
    return (A, B, c), gmm


def compare_with_regression(A, B, c, make_prior, seeds=5):
    """Mean parameter error and mean held-out log-likelihood (nats per transition) of plain
    regression and of the prior's fit from two rollouts, over `seeds` draws."""
    errors, likelihoods = np.zeros((seeds, 2)), np.zeros((seeds, 2))
    for seed in range(seeds):
        X, U = rollouts(A, B, c, 2, seed=100 + seed)
        X_test, U_test = rollouts(A, B, c, 20, seed=200 + seed)
        for i, prior in enumerate([None, make_prior(X, U)]):
            model = fit_linear_gaussian(X, U, prior=prior)
            errors[seed, i] = parameter_error(model, A, B)
            likelihoods[seed, i] = float(model.log_likelihood(X_test, U_test).mean()) / T
    return errors.mean(0), likelihoods.mean(0)


def test_gmm_prior_beats_regression_with_two_rollouts(linear_system_and_gmm):
    (A, B, c), gmm = linear_system_and_gmm
    assert gmm.means.shape == (10, 8)  # 400 transitions // 40 per cluster
    assert np.isclose(float(jnp.exp(gmm.log_weights).sum()), 1.0, atol=1e-5)
    (plain, with_prior), (ll_plain, ll_prior) = compare_with_regression(
        A, B, c, lambda X, U: gmm_prior(gmm, X, U))
    # measured: 1.46 vs 0.077; log-likelihood -1.4e6 vs 0.23 (the truth scores 4.7: with two
    # rollouts and strength 1, N_t comes out about a third of the noise, see the module notes)
    assert with_prior < 0.1 * plain
    assert with_prior < 0.2
    assert ll_prior > ll_plain and ll_prior > -2.0


def test_linearization_prior_beats_regression_with_two_rollouts():
    A, B, c = time_varying_system(3, 2, T, seed=3)
    # a global model that is close but not right: every A_t off by about 0.05 per entry
    A_global = jnp.asarray(A + 0.05 * np.random.default_rng(4).normal(size=A.shape), jnp.float32)
    B_global, c_global = jnp.asarray(B, jnp.float32), jnp.asarray(c, jnp.float32)

    def global_model(x, u, t):
        return A_global[t] @ x + B_global[t] @ u + c_global[t]

    (plain, with_prior), (ll_plain, ll_prior) = compare_with_regression(
        A, B, c, lambda X, U: linearization_prior(global_model, X, U))
    global_error = parameter_error(LinearGaussianDynamics(A_global, B_global, c_global, None), A, B)
    # measured: 2.67 vs 0.21 (the global model itself: 0.15); log-likelihood -1.2e7 vs -1.8
    assert with_prior < 0.1 * plain
    assert with_prior < 2 * global_error
    assert ll_prior > ll_plain


def test_enough_data_overrides_a_wrong_prior():
    A, B, c = time_varying_system(3, 2, T, seed=3)
    A_wrong = jnp.asarray(A + 0.3, jnp.float32)

    def global_model(x, u, t):
        return A_wrong[t] @ x + jnp.asarray(B, jnp.float32)[t] @ u

    X, U = rollouts(A, B, c, 200, seed=5)
    model = fit_linear_gaussian(X, U, prior=linearization_prior(global_model, X, U, strength=1.0))
    assert parameter_error(model, A, B) < 0.05  # measured 0.012; the prior's own error is 0.9


def test_gmm_prior_is_the_mixture_moment_of_the_responsible_clusters():
    n, m, d = 1, 1, 3
    means = jnp.array([[0.0, 0.0, 0.0], [0.0, 50.0, 50.0]])
    covs = jnp.stack([jnp.diag(jnp.array([1.0, 2.0, 3.0])), jnp.eye(d)])
    gmm = DynamicsGMM(log_weights=jnp.log(jnp.array([0.5, 0.5])), means=means, covs=covs,
                      log_likelihood=jnp.array(0.0), iterations=jnp.array(0), state_dim=n,
                      action_dim=m)
    X = np.array([[[0.1], [0.2], [49.0]], [[-0.1], [0.0], [51.0]]], np.float32)  # [2, 3, 1]
    U = np.array([[[0.3], [50.0]], [[-0.2], [50.0]]], np.float32)
    prior = gmm_prior(gmm, X, U, strength=2.0)
    # the points [x_t, u_t, x_t+1] of step 0 sit in cluster 0, those of step 1 in cluster 1
    np.testing.assert_allclose(prior.mu0, means, atol=1e-4)
    np.testing.assert_allclose(prior.Phi, 2.0 * covs, atol=1e-3)
    np.testing.assert_allclose(prior.n0, [2.0, 2.0])


def test_the_model_plugs_into_lqr_and_the_planner_contract():
    A, B, c = time_varying_system(2, 1, T, seed=0)
    X, U = rollouts(A, B, c, 6, seed=6, noise=1e-4)
    model = fit_linear_gaussian(X, U)
    F_true = np.concatenate([A, B], axis=-1).astype(np.float32)
    np.testing.assert_allclose(model.F, F_true, atol=2e-3)
    np.testing.assert_allclose(model.f, c, atol=2e-3)
    C = jnp.broadcast_to(jnp.eye(3), (T, 3, 3))
    cvec = jnp.zeros((T, 3))
    x0 = jnp.array([1.0, -1.0])
    fitted = lqr(model.F, model.f, C, cvec, x0)
    exact = lqr(jnp.asarray(F_true), jnp.asarray(c, jnp.float32), C, cvec, x0)
    assert float(fitted.cost) == pytest.approx(float(exact.cost), rel=1e-2)
    # the planners' dynamics(x, u, t), jitted and vmapped over steps with traced t
    dynamics = model.as_dynamics()
    step = jax.jit(jax.vmap(dynamics))(X[0, :-1], U[0], jnp.arange(T))
    np.testing.assert_allclose(step, X[0, 1:], atol=2e-3)
    # and the fit itself runs inside a caller's jit (an LQR-FLM iteration compiled whole)
    jitted = jax.jit(lambda X, U: fit_linear_gaussian(X, U))(X, U)
    np.testing.assert_allclose(jitted.F, model.F, atol=1e-5)


def test_sample_and_log_likelihood_match_the_gaussian():
    rng = np.random.default_rng(7)
    n, m = 2, 1
    L = np.tril(rng.normal(size=(T, n, n))) * 0.1 + 0.2 * np.eye(n)
    model = LinearGaussianDynamics(A=jnp.asarray(rng.normal(size=(T, n, n)), jnp.float32),
                                   B=jnp.asarray(rng.normal(size=(T, n, m)), jnp.float32),
                                   c=jnp.asarray(rng.normal(size=(T, n)), jnp.float32),
                                   N=jnp.asarray(L @ np.swapaxes(L, 1, 2), jnp.float32))
    x, u, t = jnp.array([0.5, -1.0]), jnp.array([2.0]), 3
    keys = jax.random.split(jax.random.key(0), 20000)
    samples = np.asarray(jax.vmap(lambda k: model.sample(x, u, t, k))(keys))
    mean = model.A[t] @ x + model.B[t] @ u + model.c[t]
    np.testing.assert_allclose(samples.mean(0), mean, atol=0.01)
    np.testing.assert_allclose(np.cov(samples.T), model.N[t], atol=0.003)

    X = rng.normal(size=(3, T + 1, n)).astype(np.float32)
    U = rng.normal(size=(3, T, m)).astype(np.float32)
    A, B, c, N = (np.asarray(a) for a in (model.A, model.B, model.c, model.N))
    by_hand = [sum(scipy.stats.multivariate_normal.logpdf(
        X[i, s + 1], A[s] @ X[i, s] + B[s] @ U[i, s] + c[s], N[s]) for s in range(T))
        for i in range(3)]
    np.testing.assert_allclose(model.log_likelihood(X, U), by_hand, rtol=1e-4)


def test_save_and_load_round_trip(tmp_path):
    A, B, c = time_varying_system(2, 1, T, seed=0)
    model = fit_linear_gaussian(*rollouts(A, B, c, 5, seed=1))
    model.save(tmp_path / "dynamics.npz")
    loaded = LinearGaussianDynamics.load(tmp_path / "dynamics.npz")
    for name in ("A", "B", "c", "N"):
        assert np.array_equal(getattr(loaded, name), getattr(model, name))
        assert getattr(loaded, name).dtype == getattr(model, name).dtype


def test_nan_input_raises_a_clear_error():
    A, B, c = time_varying_system(2, 1, T, seed=0)
    X, U = rollouts(A, B, c, 5, seed=1)
    X[2, 4, 1] = np.nan
    with pytest.raises(ForethoughtError, match=r"X holds 1 NaN or inf entries \(first at index "
                                               r"\(2, 4, 1\)"):
        fit_linear_gaussian(X, U)
    U[0, 0, 0] = np.inf
    with pytest.raises(ForethoughtError, match="u holds 1 NaN or inf"):
        fit_dynamics_gmm(X[0, :-1], U[0], X[1, 1:], jax.random.key(0))


def test_mismatched_shapes_name_the_argument():
    A, B, c = time_varying_system(2, 1, T, seed=0)
    X, U = rollouts(A, B, c, 5, seed=1)
    with pytest.raises(ForethoughtError, match=r"U must have shape \(N, T, m\) = \(5, 10, m\)"):
        fit_linear_gaussian(X, U[:, :-1])
    with pytest.raises(ForethoughtError, match=r"X must have shape \(N, T\+1, n\)"):
        fit_linear_gaussian(X[0], U[0])
    with pytest.raises(ForethoughtError, match="floating-point"):
        fit_linear_gaussian(X, U.astype(np.int32))
    with pytest.raises(ForethoughtError, match="at least 2 rollouts"):
        fit_linear_gaussian(X[:1], U[:1])
    with pytest.raises(ForethoughtError, match=r"x_next must have shape \(10, 2\)"):
        fit_dynamics_gmm(X[0, :-1], U[0], X[0, 1:, :1], jax.random.key(0))
    with pytest.raises(ForethoughtError, match=r"noise_cov must have shape \(2, 2\)"):
        linearization_prior(lambda x, u, t: x, X, U, noise_cov=np.eye(3))
    with pytest.raises(ForethoughtError, match="strength must be a positive number"):
        linearization_prior(lambda x, u, t: x, X, U, strength=0.0)
    model = LinearGaussianDynamics(A=jnp.zeros((T, 2, 2)), B=jnp.zeros((T, 2, 1)),
                                   c=jnp.zeros((T, 2)), N=jnp.zeros((T, 2, 2)))
    with pytest.raises(ForethoughtError, match="the model has T=10, n=2, m=1"):
        model.log_likelihood(X[:, :-1], U[:, :-1])
    bad_prior = linearization_prior(lambda x, u, t: x, X[:, :6], U[:, :5])
    with pytest.raises(ForethoughtError, match=r"prior.mu0 must have shape \(10, 5\)"):
        fit_linear_gaussian(X, U, prior=bad_prior)
