"""Gaussian-process dynamics (seed 003, PILCO): the posterior against a direct matrix computation,
moment matching against Monte Carlo, hyperparameter recovery, the dynamics wrapper, failures with
clear messages, and save/load. Everything runs in float64 (`jax.enable_x64`, restored after)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought.errors import ForethoughtError
from forethought.models.gp import GP, GPConfig


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def se_kernel(A, B, lengthscale, signal_var):
    d = (A[:, None, :] - B[None, :, :]) / lengthscale
    return signal_var * np.exp(-0.5 * np.sum(d**2, -1))


def toy_data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3)) * [1.0, 2.0, 0.5] + [0.5, -1.0, 0.0]
    Y = np.stack([np.sin(X[:, 0]) + X[:, 1] * X[:, 2], 3.0 * np.cos(X[:, 1]) + 1.0], 1)
    return X, Y + 0.05 * rng.normal(size=Y.shape)


ELL = np.array([[1.0, 0.7, 1.5], [0.8, 1.2, 2.0]])
SF2 = np.array([1.3, 0.6])
SN2 = np.array([0.01, 0.02])
FAST = GPConfig(restarts=1)  # one start is enough on these small, well-posed problems


def pendulum_transitions(n, seed, noise=0.01):
    """A discretised pendulum, state (theta, omega) with theta an angle, torque u."""
    rng = np.random.default_rng(seed)
    x = np.stack([rng.uniform(-np.pi, np.pi, n), rng.uniform(-2, 2, n)], 1)
    u = rng.uniform(-1, 1, (n, 1))
    theta, omega = x[:, 0], x[:, 1]
    next_x = np.stack([theta + 0.1 * omega, omega + 0.1 * (-9.8 * np.sin(theta) + u[:, 0])], 1)
    return x, u, next_x + noise * rng.normal(size=next_x.shape)


@pytest.fixture(scope="module")
def dynamics_gp():
    with jax.enable_x64(True):
        return GP.fit_dynamics(*pendulum_transitions(80, 0), jax.random.key(0), FAST, angles=(0,))


# ----- the posterior: closed form against numpy --------------------------------------------------

@pytest.mark.parametrize("normalise", [False, True])
def test_posterior_mean_and_variance_match_a_direct_matrix_computation(normalise):
    X, Y = toy_data()
    jitter = 1e-6
    gp = GP.from_hyperparameters(X, Y, ELL, SF2, SN2, jitter=jitter, normalise=normalise)
    xs = np.random.default_rng(1).normal(size=(7, 3))
    mean, var = gp.predict(xs)
    _, noisy = gp.predict(xs, noise=True)

    mu_x, sd_x = (X.mean(0), X.std(0)) if normalise else (np.zeros(3), np.ones(3))
    mu_y, sd_y = (Y.mean(0), Y.std(0)) if normalise else (np.zeros(2), np.ones(2))
    Xn, Yn, xn = (X - mu_x) / sd_x, (Y - mu_y) / sd_y, (xs - mu_x) / sd_x
    for a in range(2):
        K = se_kernel(Xn, Xn, ELL[a], SF2[a]) + (SN2[a] + jitter * SF2[a]) * np.eye(len(X))
        k = se_kernel(xn, Xn, ELL[a], SF2[a])
        expected_mean = k @ np.linalg.solve(K, Yn[:, a]) * sd_y[a] + mu_y[a]
        latent = SF2[a] - np.sum(k * np.linalg.solve(K, k.T).T, 1)
        scale = sd_y[a] ** 2
        np.testing.assert_allclose(mean[:, a], expected_mean, rtol=0, atol=1e-6)
        np.testing.assert_allclose(var[:, a], latent * scale, rtol=0, atol=1e-6)
        np.testing.assert_allclose(noisy[:, a], (latent + SN2[a] + jitter * SF2[a]) * scale, rtol=0, atol=1e-6)
        _, logdet = np.linalg.slogdet(K)
        lml = -0.5 * Yn[:, a] @ np.linalg.solve(K, Yn[:, a]) - 0.5 * logdet - 0.5 * len(X) * np.log(2 * np.pi)
        assert float(gp.log_marginal_likelihood()[a]) == pytest.approx(lml, abs=1e-6)


# ----- moment matching ------------------------------------------------------------------------------

def test_moment_matching_matches_monte_carlo():
    """Moment matching gives the exact mean and covariance of f(x) for x ~ N(m, S): the spread of
    the posterior mean plus the expected posterior variance E_x[var f(x)], and cov[x, f(x)]."""
    X, Y = toy_data()
    gp = GP.from_hyperparameters(X, Y, ELL, SF2, SN2, jitter=1e-6, normalise=True)
    rng = np.random.default_rng(2)
    m = np.array([0.3, -0.5, 0.2])
    A = rng.normal(size=(3, 3))
    S = 0.3 * A @ A.T + 0.05 * np.eye(3)

    M, S_out, C = eqx.filter_jit(lambda g, m, S: g.moment_match(m, S))(gp, m, S)
    _, S_noisy, _ = gp.moment_match(m, S, noise=True)

    n = 200_000
    x = rng.multivariate_normal(m, S, size=n)
    mu, var = (np.asarray(a) for a in eqx.filter_jit(lambda g, x: g.predict(x))(gp, x))
    dmu, dx = mu - mu.mean(0), x - x.mean(0)
    se = lambda samples: samples.std(0) / np.sqrt(n)  # noqa: E731

    assert np.all(np.abs(M - mu.mean(0)) < 4 * se(mu))
    outer = dmu[:, :, None] * dmu[:, None, :]
    mc_cov = outer.mean(0) + np.diag(var.mean(0))
    mc_se = np.sqrt(se(outer) ** 2 + np.diag(se(var)) ** 2)
    assert np.all(np.abs(S_out - mc_cov) < 4 * mc_se), (S_out, mc_cov, mc_se)
    cross = dx[:, :, None] * dmu[:, None, :]
    assert np.all(np.abs(C - cross.mean(0)) < 4 * se(cross)), (C, cross.mean(0))
    np.testing.assert_allclose(S_noisy - S_out, np.diag(gp.noise_var), atol=1e-12)
    # the output covariance has real cross terms, and it is a covariance
    assert abs(S_out[0, 1]) > 4 * mc_se[0, 1]
    assert np.all(np.linalg.eigvalsh(S_out) > 0)


def test_moment_matching_of_a_point_input_is_the_posterior():
    X, Y = toy_data()
    gp = GP.from_hyperparameters(X, Y, ELL, SF2, SN2, jitter=1e-6, normalise=True)
    m = np.array([0.3, -0.5, 0.2])
    M, S_out, C = gp.moment_match(m, 1e-12 * np.eye(3))
    mean, var = gp.predict(m)
    np.testing.assert_allclose(M, mean, atol=1e-8)
    np.testing.assert_allclose(np.diag(S_out), var, atol=1e-8)
    np.testing.assert_allclose(S_out[0, 1], 0.0, atol=1e-8)  # independent GPs: no cross term at a point
    np.testing.assert_allclose(C, 0.0, atol=1e-8)
    with pytest.raises(ForethoughtError, match=r"S \(3, 3\)"):
        gp.moment_match(m, np.eye(2))


def test_moment_matching_gradients_match_finite_differences():
    """PILCO differentiates through moment matching: d(M, S_out, C)/d(m, S) against central differences."""
    X, Y = toy_data()
    gp = GP.from_hyperparameters(X, Y, ELL, SF2, SN2, jitter=1e-6, normalise=True)
    rng = np.random.default_rng(3)
    m = np.array([0.3, -0.5, 0.2])
    A = rng.normal(size=(3, 3))
    S = 0.3 * A @ A.T + 0.05 * np.eye(3)
    W = [rng.normal(size=shape) for shape in ((2,), (2, 2), (3, 2))]

    def f(m, S):
        return sum(jnp.sum(w * out) for w, out in zip(W, gp.moment_match(m, S)))

    grad_m, grad_S = jax.jit(jax.grad(f, argnums=(0, 1)))(m, S)
    f = jax.jit(f)
    h = 1e-6
    fd_m = [(f(m + h * e, S) - f(m - h * e, S)) / (2 * h) for e in np.eye(3)]
    E = h * np.eye(9).reshape(9, 3, 3)
    fd_S = np.reshape([(f(m, S + e) - f(m, S - e)) / (2 * h) for e in E], (3, 3))
    np.testing.assert_allclose(grad_m, fd_m, atol=1e-6)
    np.testing.assert_allclose(grad_S, fd_S, atol=1e-6)


# ----- fitting ----------------------------------------------------------------------------------------

def test_fitting_recovers_the_noise_level_and_length_scale():
    """Data drawn from a GP with length-scale 0.7 in x1, an irrelevant x2 and noise std 0.1."""
    rng = np.random.default_rng(1)
    n = 120
    X = np.stack([rng.uniform(-3, 3, n), rng.uniform(-3, 3, n)], 1)
    K = se_kernel(X[:, :1], X[:, :1], 0.7, 1.0) + 1e-9 * np.eye(n)
    Y = np.linalg.cholesky(K) @ rng.normal(size=n) + 0.1 * rng.normal(size=n)

    gp = GP.fit(X, Y, jax.random.key(0), FAST)
    ell, noise_std = np.asarray(gp.lengthscale[0]), float(np.sqrt(gp.noise_var[0]))
    assert noise_std == pytest.approx(0.1, rel=0.2)
    assert ell[0] == pytest.approx(0.7, rel=0.25)
    assert ell[1] > 10 * ell[0]  # ARD switches the irrelevant input off
    truth = GP.from_hyperparameters(X, Y, [0.7, 1e3], 1.0, 0.01, jitter=1e-6)
    own_units = gp.log_marginal_likelihood() - n * np.log(gp.target_norm.std)
    assert float(own_units[0]) >= float(truth.log_marginal_likelihood()[0]) - 1e-3


def test_dynamics_gp_predicts_calibrated_next_states(dynamics_gp):
    gp = dynamics_gp
    assert gp.spec.input_dim == 4 and gp.spec.output_dim == 2  # omega, sin, cos, u -> two deltas
    metrics = gp.evaluate(*pendulum_transitions(300, 1))
    assert metrics["mse"] < 4e-4  # noise variance 1e-4 plus a little model error
    assert 0.55 <= metrics["within_1sigma"] <= 0.85
    assert 0.88 <= metrics["within_2sigma"] <= 1.0

    dynamics = gp.as_dynamics()
    x, u = jnp.array([0.4, -0.3]), jnp.array([0.5])
    mean, _ = gp.predict(jnp.array([-0.3, np.sin(0.4), np.cos(0.4), 0.5]))
    np.testing.assert_allclose(jax.jit(dynamics)(x, u, 0), x + mean, atol=1e-12)
    np.testing.assert_allclose(gp.predict_mean(gp.inputs(x, u)), mean, atol=1e-12)
    truth = np.array([0.4 - 0.03, -0.3 + 0.1 * (-9.8 * np.sin(0.4) + 0.5)])
    np.testing.assert_allclose(dynamics(x, u, 0), truth, atol=0.03)

    states, actions = [np.array([0.4, -0.3])], 0.5 * np.ones((5, 1))
    for a in actions:
        th, om = states[-1]
        states.append(np.array([th + 0.1 * om, om + 0.1 * (-9.8 * np.sin(th) + a[0])]))
    errors = gp.open_loop_error(np.stack(states), actions)
    assert errors.shape == (5,) and np.all(errors < 0.01)


# ----- failures ---------------------------------------------------------------------------------------

def test_fitting_nan_data_fails_with_a_clear_message():
    x, u, next_x = pendulum_transitions(20, 0)
    next_x[3, 1] = np.nan
    with pytest.raises(ForethoughtError, match=r"next_obs must be finite.*1 NaN"):
        GP.fit_dynamics(x, u, next_x, jax.random.key(0))
    with pytest.raises(ForethoughtError, match="inputs X must be finite"):
        GP.fit(np.full((5, 2), np.nan), np.zeros(5), jax.random.key(0))


def test_a_failed_cholesky_names_the_output_dimension_and_the_cure():
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, (30, 1))
    X = np.concatenate([X, X])  # duplicated inputs
    Y = np.concatenate([np.sin(X), np.cos(X)], 1)
    with pytest.raises(ForethoughtError, match=r"Cholesky.*output dimension\(s\) \[1\].*jitter") as error:
        GP.from_hyperparameters(X, Y, 1.0, 1.0, [0.1, 0.0], jitter=0.0)  # only output 1 has no noise
    assert "duplicate" in str(error.value)
    GP.from_hyperparameters(X, Y, 1.0, 1.0, [0.1, 0.0], jitter=1e-6)  # the jitter cures it


# ----- persistence --------------------------------------------------------------------------------------

def test_save_and_load_round_trip_exactly(dynamics_gp, tmp_path):
    path = tmp_path / "gp.npz"
    dynamics_gp.save(path)
    loaded = GP.load(path)
    assert loaded.spec == dynamics_gp.spec and loaded.spec.angles == (0,)
    for a, b in zip(jax.tree.leaves(dynamics_gp), jax.tree.leaves(loaded)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    x = jnp.array([[0.1, 0.2], [-1.0, 1.5]])
    np.testing.assert_array_equal(loaded.as_dynamics()(x, jnp.array([0.3]), 0),
                                  dynamics_gp.as_dynamics()(x, jnp.array([0.3]), 0))
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(ForethoughtError):
        GP.load(tmp_path / "other.npz")


def test_padding_to_a_capacity_changes_nothing_but_the_shapes():
    x, u, nx = pendulum_transitions(50, 3)
    key = jax.random.key(4)
    plain = GP.fit_dynamics(x, u, nx, key, FAST, angles=(0,))
    padded = GP.fit_dynamics(x, u, nx, key, FAST, angles=(0,), capacity=64)
    assert padded.X.shape[0] == 64 and float(padded.mask.sum()) == 50
    np.testing.assert_allclose(padded.log_lengthscale, plain.log_lengthscale, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(padded.log_marginal_likelihood(), plain.log_marginal_likelihood(), rtol=1e-8)
    z = plain.inputs(jnp.asarray(x[:5]) + 0.1, jnp.asarray(u[:5]))
    for a, b in zip(padded.predict(z, noise=True), plain.predict(z, noise=True)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)
    m, S = z[0], 0.01 * jnp.eye(z.shape[1])
    for a, b in zip(padded.propagate(m, S, noise=True), plain.propagate(m, S, noise=True)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-10)  # hyperparameters agree to ~1e-6
    with pytest.raises(ForethoughtError, match="capacity"):
        GP.fit_dynamics(x, u, nx, key, FAST, angles=(0,), capacity=10)


# ----- FITC (GP.sparse) -------------------------------------------------------------------------------

def fitc_reference(Xn, Yn, Z, ell, sf2, noise, jitter):
    """FITC's predictive mean and latent variance by the textbook formulas (Snelson and
    Ghahramani 2006), plain numpy."""
    Kuu = se_kernel(Z, Z, ell, sf2) + jitter * sf2 * np.eye(len(Z))
    Kuf = se_kernel(Z, Xn, ell, sf2)
    Q = Kuf.T @ np.linalg.solve(Kuu, Kuf)
    lam = sf2 - np.diag(Q) + noise
    Sigma = Kuu + (Kuf / lam) @ Kuf.T
    beta = np.linalg.solve(Sigma, Kuf @ (Yn / lam))
    iK = np.linalg.inv(Kuu) - np.linalg.inv(Sigma)
    return beta, iK


def test_sparse_gp_is_fitc_on_farthest_points_and_moment_matches_its_own_predictions():
    X, Y = toy_data(n=120)
    gp = GP.from_hyperparameters(X, Y, ELL, SF2, SN2, jitter=1e-6, normalise=True)
    sparse = gp.sparse(30)
    assert sparse.X.shape == (30, 3) and sparse.spec.sparse and gp.sparse(500) is gp
    # the inducing inputs are data points, spread out: no two closer than the typical spacing
    Xn = np.asarray(gp.X)
    assert all(np.min(np.sum((Xn - z) ** 2, 1)) < 1e-20 for z in np.asarray(sparse.X))
    xs = np.random.default_rng(3).normal(size=(9, 3))
    mean, var = sparse.predict(xs)
    zs = (xs - X.mean(0)) / X.std(0)
    for a in range(2):
        noise = SN2[a] + 1e-6 * SF2[a]
        beta, iK = fitc_reference(Xn, np.asarray(gp.Y)[:, a], np.asarray(sparse.X), ELL[a], SF2[a], noise, 1e-6)
        k = se_kernel(zs, np.asarray(sparse.X), ELL[a], SF2[a])
        np.testing.assert_allclose(mean[:, a], (k @ beta) * Y[:, a].std() + Y[:, a].mean(), atol=1e-6)
        latent = SF2[a] - np.sum((k @ iK) * k, 1)
        np.testing.assert_allclose(var[:, a], latent * Y[:, a].std() ** 2, atol=1e-6)
    # the approximation closes on the exact GP as the inducing points grow
    exact_mean = np.asarray(gp.predict(X)[0])
    rmse = [np.sqrt(np.mean((np.asarray(gp.sparse(k).predict(X)[0]) - exact_mean) ** 2, 0)) / Y.std(0)
            for k in (30, 60, 90)]
    assert np.all(rmse[2] < rmse[1]) and np.all(rmse[1] < rmse[0]) and np.all(rmse[1] < 0.1), rmse
    # moment matching runs unchanged on it and matches Monte Carlo of its own predictions
    rng = np.random.default_rng(4)
    m, S = np.array([0.3, -0.5, 0.2]), 0.2 * np.eye(3)
    M, S_out, _ = sparse.moment_match(m, S)
    x = rng.multivariate_normal(m, S, size=100_000)
    mu, v = (np.asarray(a) for a in eqx.filter_jit(lambda g, x: g.predict(x))(sparse, x))
    se = mu.std(0) / np.sqrt(len(x))
    assert np.all(np.abs(M - mu.mean(0)) < 4 * se)
    np.testing.assert_allclose(np.diag(S_out), mu.var(0) + v.mean(0), rtol=0.02)
    with pytest.raises(ForethoughtError, match="sparse approximation"):
        sparse.log_marginal_likelihood()
    with pytest.raises(ForethoughtError, match="inducing must be >= 1, got 0"):
        gp.sparse(0)


def test_sparse_gp_of_a_padded_gp_ignores_the_padding():
    x, u, nx = pendulum_transitions(100, 1)
    quick = GPConfig(optimizer="adam", restarts=1, steps=50)
    gp = GP.fit_dynamics(x, u, nx, jax.random.key(0), quick, angles=(0,))
    padded = GP.fit_dynamics(x, u, nx, jax.random.key(0), quick, angles=(0,), capacity=128)
    a, b = gp.sparse(40), padded.sparse(40)
    np.testing.assert_allclose(np.asarray(a.X), np.asarray(b.X), atol=1e-10)
    xs = np.random.default_rng(5).normal(size=(6, 4))
    for p, q in zip(a.predict(xs), b.predict(xs)):
        np.testing.assert_allclose(p, q, atol=1e-6)
