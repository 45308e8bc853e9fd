"""LQR (seed 000, "LQR"): the Riccati gain, a brute-force QP, stochastic dynamics, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from forethought.control.lqr import (dot, lqr, lqr_backward, lqr_expected_cost, lqr_objective,
                                     lqr_rollout, solve_positive_definite)
from forethought.errors import ForethoughtError


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def random_lti(rng, n, m):
    """A random (almost surely controllable) system and positive definite costs."""
    A = rng.normal(size=(n, n)) / np.sqrt(n)
    B = rng.normal(size=(n, m))
    Q = np.diag(rng.uniform(0.5, 2.0, size=n))
    R = np.diag(rng.uniform(0.5, 2.0, size=m))
    return A, B, Q, R


def time_invariant(A, B, Q, R, T):
    n, m = B.shape
    F = np.broadcast_to(np.hstack([A, B]), (T, n, n + m))
    C = np.broadcast_to(scipy.linalg.block_diag(Q, R), (T, n + m, n + m))
    return F, np.zeros((T, n)), C, np.zeros((T, n + m))


def random_problem(rng, T, n, m):
    """Time-varying F, f, C (positive definite, with x-u cross terms), c, and terminal terms."""
    F = rng.normal(size=(T, n, n + m)) / np.sqrt(n + m)
    f = rng.normal(size=(T, n))
    M = rng.normal(size=(T, n + m, n + m))
    C = M @ np.swapaxes(M, 1, 2) / (n + m) + 0.5 * np.eye(n + m)
    c = rng.normal(size=(T, n + m))
    M = rng.normal(size=(n, n))
    return F, f, C, c, M @ M.T / n + np.eye(n), rng.normal(size=n)


def kkt_solution(F, f, C, c, x0, C_T=None, c_T=None):
    """Brute force: minimize over w = (x_0..x_T, u_0..u_{T-1}) subject to the dynamics, by one
    linear solve of the KKT system."""
    T, n, nm = F.shape
    m = nm - n
    N = (T + 1) * n + T * m
    xs = lambda t: slice(t * n, (t + 1) * n)  # noqa: E731
    us = lambda t: slice((T + 1) * n + t * m, (T + 1) * n + (t + 1) * m)  # noqa: E731
    H, h = np.zeros((N, N)), np.zeros(N)
    for t in range(T):
        idx = np.r_[np.arange(N)[xs(t)], np.arange(N)[us(t)]]
        H[np.ix_(idx, idx)] += C[t]
        h[idx] += c[t]
    if C_T is not None:
        H[xs(T), xs(T)] += C_T
        h[xs(T)] += c_T
    A, b = np.zeros(((T + 1) * n, N)), np.zeros((T + 1) * n)
    A[:n, xs(0)], b[:n] = np.eye(n), x0
    for t in range(T):  # x_{t+1} - F_x x_t - F_u u_t = f_t
        rows = slice((t + 1) * n, (t + 2) * n)
        A[rows, xs(t + 1)] = np.eye(n)
        A[rows, xs(t)] = -F[t, :, :n]
        A[rows, us(t)] = -F[t, :, n:]
        b[rows] = f[t]
    kkt = np.block([[H, A.T], [A, np.zeros((A.shape[0], A.shape[0]))]])
    w = np.linalg.solve(kkt, np.r_[-h, b])[:N]
    x = w[:(T + 1) * n].reshape(T + 1, n)
    u = w[(T + 1) * n:].reshape(T, m)
    return x, u, 0.5 * w @ H @ w + h @ w


def test_first_gain_matches_discrete_riccati_equation(x64):
    rng = np.random.default_rng(0)
    n, m, T = 4, 2, 200
    problems = [random_lti(rng, n, m) for _ in range(3)]
    batch = [np.stack(arrays) for arrays in zip(*(time_invariant(*p, T) for p in problems))]
    x0 = np.ones(n)
    solutions = jax.vmap(lqr, in_axes=(0, 0, 0, 0, None))(*batch, x0)
    for i, (A, B, Q, R) in enumerate(problems):
        P = scipy.linalg.solve_discrete_are(A, B, Q, R)
        K_dare = -np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
        np.testing.assert_allclose(solutions.K[i, 0], K_dare, atol=1e-6)
        # The stationary value function: V_0 = P, and the optimal cost is 1/2 x0' P x0.
        np.testing.assert_allclose(solutions.cost[i], 0.5 * x0 @ P @ x0, rtol=1e-6)
    assert solutions.K.dtype == jnp.float64
    assert bool(jnp.all(solutions.converged))


def test_terminal_cost_at_the_riccati_solution_gives_stationary_gains(x64):
    rng = np.random.default_rng(1)
    A, B, Q, R = random_lti(rng, 3, 1)
    P = scipy.linalg.solve_discrete_are(A, B, Q, R)
    K_dare = -np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
    back = lqr_backward(*time_invariant(A, B, Q, R, 5), C_T=P, c_T=np.zeros(3))
    np.testing.assert_allclose(back.K, np.broadcast_to(K_dare, back.K.shape), atol=1e-10)
    np.testing.assert_allclose(back.V, np.broadcast_to(P, back.V.shape), atol=1e-9)


@pytest.mark.parametrize("terminal", [True, False])
def test_affine_problem_matches_brute_force_qp(x64, terminal):
    rng = np.random.default_rng(2)
    T, n, m = 6, 3, 2
    F, f, C, c, C_T, c_T = random_problem(rng, T, n, m)
    if not terminal:
        C_T = c_T = None
    x0 = rng.normal(size=n)
    x, u, cost = kkt_solution(F, f, C, c, x0, C_T, c_T)
    solution = lqr(F, f, C, c, x0, C_T, c_T)
    np.testing.assert_allclose(solution.x, x, atol=1e-9)
    np.testing.assert_allclose(solution.u, u, atol=1e-9)
    np.testing.assert_allclose(solution.cost, cost, rtol=1e-10)
    # The controller reproduces the plan, and V(x0) + s0 is the optimal cost.
    np.testing.assert_allclose(jnp.einsum("tij,tj->ti", solution.K, solution.x[:-1]) + solution.k,
                               u, atol=1e-9)
    back = lqr_backward(F, f, C, c, C_T, c_T)
    np.testing.assert_allclose(lqr_expected_cost(back, x0), cost, rtol=1e-10)
    if not terminal:
        # As in the note: with V_{T} = 0 the last action minimizes the last stage cost alone.
        K_last = -np.linalg.solve(C[-1, n:, n:], C[-1, n:, :n])
        np.testing.assert_allclose(solution.K[-1], K_last, atol=1e-10)


def test_stochastic_rollouts_match_expected_cost(x64):
    rng = np.random.default_rng(3)
    T, n, m = 10, 2, 1
    F, f, C, c, C_T, c_T = random_problem(rng, T, n, m)
    x0 = rng.normal(size=n)
    noise_cov = np.array([[0.2, 0.05], [0.05, 0.1]])
    solution = lqr(F, f, C, c, x0, C_T, c_T)

    @jax.jit
    def sampled_cost(key):
        x, u = lqr_rollout(solution.K, solution.k, F, f, x0, key, noise_cov)
        return lqr_objective(C, c, x, u, C_T, c_T)

    costs = np.asarray(jax.vmap(sampled_cost)(jax.random.split(jax.random.key(0), 20000)))
    expected = lqr_expected_cost(lqr_backward(F, f, C, c, C_T, c_T), x0, noise_cov)
    stderr = costs.std() / np.sqrt(costs.size)
    assert abs(costs.mean() - expected) < 4 * stderr, (costs.mean(), float(expected), stderr)
    assert expected > solution.cost + 0.1  # the noise term is not negligible here
    # Without noise the rollout is the plan.
    x, u = lqr_rollout(solution.K, solution.k, F, f, x0)
    np.testing.assert_allclose(x, solution.x, atol=1e-12)
    np.testing.assert_allclose(u, solution.u, atol=1e-12)


def test_float32_matches_float64_and_vmaps_over_x0():
    rng = np.random.default_rng(4)
    F, f, C, c, C_T, c_T = random_problem(rng, 8, 3, 2)
    x0s = rng.normal(size=(4, 3))
    cast = lambda *arrays: [jnp.asarray(a, jnp.float32) for a in arrays]  # noqa: E731
    batch = jax.vmap(lqr, in_axes=(None, None, None, None, 0, None, None))(
        *cast(F, f, C, c, x0s, C_T, c_T))
    assert batch.u.dtype == jnp.float32 and batch.K.dtype == jnp.float32
    with jax.enable_x64(True):
        for i, x0 in enumerate(x0s):
            x, u, cost = kkt_solution(F, f, C, c, x0, C_T, c_T)
            np.testing.assert_allclose(batch.u[i], u, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(batch.cost[i], cost, rtol=1e-4)


def test_solve_positive_definite_both_paths(x64):
    rng = np.random.default_rng(5)
    solve = jax.jit(solve_positive_definite)
    for m in (1, 2, 3, 9):  # 9 takes the LAPACK path
        M = rng.normal(size=(m, m))
        A, B = M @ M.T + np.eye(m), rng.normal(size=(m, 4))
        X, ok = solve(A, B)
        np.testing.assert_allclose(X, np.linalg.solve(A, B), rtol=1e-10)
        assert bool(ok)
        assert not bool(solve(-A, B)[1])
    a, b = rng.normal(size=(3, 5)), rng.normal(size=(5, 2))
    np.testing.assert_allclose(dot(a, b), a @ b, rtol=1e-12)
    np.testing.assert_allclose(dot(a, b[:, 0]), a @ b[:, 0], rtol=1e-12)
    np.testing.assert_allclose(dot(b[:, 0], b), b[:, 0] @ b, rtol=1e-12)
    big = rng.normal(size=(20, 20))
    np.testing.assert_allclose(dot(big, big), big @ big, rtol=1e-12)


def test_indefinite_problem_reports_not_converged(x64):
    F, f, C, c = time_invariant(np.eye(2), np.ones((2, 1)), np.eye(2), -np.eye(1), 3)
    assert not bool(lqr(F, f, C, c, np.ones(2)).converged)


def test_bad_shapes_name_the_argument():
    F, f, C, c = time_invariant(np.eye(2), np.ones((2, 1)), np.eye(2), np.eye(1), 3)
    with pytest.raises(ForethoughtError, match="C must have shape"):
        lqr(F, f, C[:, :2, :2], c, np.ones(2))
    with pytest.raises(ForethoughtError, match="x0 must have shape"):
        lqr(F, f, C, c, np.ones(3))
    with pytest.raises(ForethoughtError, match="C_T must have shape"):
        lqr(F, f, C, c, np.ones(2), np.eye(3))
