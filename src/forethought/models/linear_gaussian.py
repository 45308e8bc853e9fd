"""Time-varying linear-Gaussian dynamics fit from a few rollouts: seed 000, "Local Models".

The model, for steps `t = 0 .. T-1` (the note's symbols; `N_t` is the noise covariance, not the
number of rollouts, which is `N` without an index):

    p(x_{t+1} | x_t, u_t) = N(A_t x_t + B_t u_t + c_t, N_t)

fit from `N` rollouts `X [N, T+1, n]`, `U [N, T, m]` of one (noisy) controller: the "fit
dynamics" step of LQR-FLM and guided policy search. Write `z_t = [x_t; u_t]` (size `n+m`),
`y_t = x_{t+1}`, and `p_t = [z_t; y_t]` (size `d = 2n+m`). Every fit here estimates a joint
Gaussian `N(mu_t, Sigma_t)` of `p_t` at each step and conditions it on `z_t` (this is how GPS's
`DynamicsLR` and `DynamicsLRPrior` do it, so the plain and the Bayesian fit share one formula):

    [A_t B_t] = Sigma_yz (Sigma_zz + ridge I)^-1
    c_t       = mu_y - [A_t B_t] mu_z
    N_t       = Sigma_yy - [A_t B_t] (Sigma_zz + ridge I) [A_t B_t]'

(the solve goes through the eigendecomposition of `Sigma_zz`, which is singular with few
rollouts and whose rounding errors would break a float32 Cholesky; the eigenvalues of `N_t` are
floored at `ridge`, so that `N_t` stays positive definite when the rollouts are fit exactly).

**Linear regression** (the note's first choice): `mu_t` and `Sigma_t` are the sample mean and
the maximum-likelihood covariance (dividing by `N`) of the `N` points `p_t`, so `[A_t B_t], c_t`
are least squares with an intercept. The `ridge` (default 1e-6, in the squared units of x and u;
GPS's `regularization`) keeps the solve stable. It matters when the rollouts do not span `z_t`
(`N < n+m+1`, or actions that do not vary): least squares then has no unique answer, and the
ridge picks the one with nothing along the directions the data never moved in (minimum norm),
which is not the truth. `N_t` is the maximum-likelihood residual covariance: it underestimates
the noise by a factor `(N-n-m-1)/N` and is about zero when `N <= n+m+1` (the line fits exactly).

**Bayesian linear regression** (the note's second choice, "use favorite global model as
prior"): a normal-inverse-Wishart prior `NIW(mu0, Phi, kappa, n0)` on the joint Gaussian of
`p_t`, per step (GPS calls `kappa` `m`; renamed here so as not to clash with the action size),
and the posterior covariance as GPS's `gauss_fit_joint_prior` computes it,

    Sigma_t = (Phi + N S_t + N kappa / (N + kappa) (p̄_t - mu0)(p̄_t - mu0)') / (N + n0),

with `S_t` the ML covariance above and `p̄_t` the sample mean, which is also kept as `mu_t` (the
mean is well determined by a few points even when the covariance is not; using it places the
fitted line through the data). `Phi / n0` is the prior's guess of the covariance and
`n0 = kappa` its weight, counted in rollouts: `strength` below. With `N` much larger than the
strength the data win; with two rollouts the prior fills in every direction they did not
explore. The conditional of `Sigma_t` is the posterior mean of `[A_t B_t]` and `N_t` under the
conjugate matrix-normal-inverse-Wishart regression prior, so `N_t` shares the ML estimate's bias:
where the rollouts are fit exactly, their residuals count as zero and `N_t` comes out near
`n0 / (N + n0)` times the prior's noise (a third of it for two rollouts and strength 1).

Where the prior comes from (`NIWPrior`, one per step):

- `gmm_prior`: a Gaussian mixture fit by EM to all transitions `[x, u, x']` of a buffer
  (`fit_dynamics_gmm`; GPS's `DynamicsPriorGMM`). For step `t`, the cluster responsibilities of
  the `N` current points, averaged, give weights `w_k`, and the prior is the moment-matched
  mixture `mu0 = sum_k w_k mu_k`, `Sigma0 = sum_k w_k (Sigma_k + (mu_k - mu0)(mu_k - mu0)')`,
  `Phi = strength Sigma0`, `kappa = n0 = strength`.
- `linearization_prior`: a global model `dynamics(x, u, t)` (a neural network's mean, a physics
  model) linearized with `jax.jacfwd` at the rollouts' mean `(x̄_t, ū_t)`, `F_t = d f / d z`
  (Fu, Levine and Abbeel 2016). With `S_zz` the spread of `z` about its per-step mean, pooled over
  all steps (full rank once `N T > n+m`, which one step's `N` points seldom are), and `Sigma_f`
  the global model's one-step error on the rollouts (or a given `noise_cov`):
  `mu0 = [x̄_t; ū_t; f(x̄_t, ū_t, t)]`,
  `Sigma0 = [[S_zz, S_zz F_t'], [F_t S_zz, F_t S_zz F_t' + Sigma_f]]`, whose conditional is exactly
  `F_t` with noise `Sigma_f`; `Phi = strength Sigma0`, `kappa = n0 = strength`.

- `local_prior`: either prior's conditional, placed on the data's own spread. A GMM cluster spans
  far more of `[x, u, x']` than the rollouts of a controller whose noise has shrunk, and
  `Phi = strength Sigma0` then outweighs `N S_t` in every direction, not only the unexplored
  ones: the fit returns the cluster's secant slope (on the cart-pole swing-up, iteration 20 of
  LQR-FLM, a median relative error of 0.53 in `[A_t B_t]` against the true Jacobians, where 20
  rollouts fit with the local prior are off by 0.08). `local_prior` keeps the prior's
  conditional `N(F0_t z + f0_t, N0_t)` and gives it the z-spread of the data (plus `spread` times
  its average over steps), exactly the form of `linearization_prior` above.

**Weights**: `fit_linear_gaussian(..., weights=w)` weighs rollout `i` by `w_i` in the sample mean
and covariance, and the data count `N = sum_i w_i` rollouts against the prior's pseudo-counts.

Everything runs as jitted programs `vmap`ped over time steps; no Python loop over `t`.
The fitted `LinearGaussianDynamics` plugs into the planners (`as_dynamics()`, `cost(x, u, t)` /
`dynamics(x, u, t)` convention) and into `control/lqr.py` (`F [T, n, n+m]`, `f [T, n]`).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from forethought.control.ilqr import linearize
from forethought.errors import ForethoughtError


# ----- the fitted model ----------------------------------------------------------------------

class LinearGaussianDynamics(eqx.Module):
    """`p(x_{t+1} | x_t, u_t) = N(A_t x_t + B_t u_t + c_t, N_t)`, `t = 0 .. T-1`.

    An immutable Equinox module (a frozen dataclass and a pytree), so a planner that takes
    `model.as_dynamics()` traces its arrays instead of baking them in: a refit with the same
    shapes does not recompile the planner.

    Attributes:
      A: `[T, n, n]`, B: `[T, n, m]`, c: `[T, n]`: the mean `A_t x + B_t u + c_t`.
      N: `[T, n, n]` noise covariances, symmetric positive definite (eigenvalues at least the
        fit's `ridge`).
    """

    A: jax.Array
    B: jax.Array
    c: jax.Array
    N: jax.Array

    @property
    def horizon(self) -> int:
        """T, the number of transitions (steps) the model covers."""
        return self.A.shape[0]

    @property
    def state_dim(self) -> int:
        return self.A.shape[1]

    @property
    def action_dim(self) -> int:
        return self.B.shape[2]

    @property
    def F(self) -> jax.Array:
        """`[A_t B_t]`, `[T, n, n+m]`: the `F` of `control/lqr.py` (`x_{t+1} = F_t z_t + f_t`)."""
        return jnp.concatenate([self.A, self.B], axis=-1)

    @property
    def f(self) -> jax.Array:
        """`c_t`, `[T, n]`: the `f` of `control/lqr.py`."""
        return self.c

    def mean(self, x, u, t):
        """`A_t x + B_t u + c_t` for `x [n]`, `u [m]`, integer step `t` (clamped to 0..T-1)."""
        t = jnp.clip(t, 0, self.horizon - 1)
        return self.A[t] @ x + self.B[t] @ u + self.c[t]

    def as_dynamics(self) -> Callable:
        """The mean as a planner's `dynamics(x [n], u [m], t) -> x_next [n]` (a bound method,
        itself a pytree: planners trace the model's arrays)."""
        return self.mean

    def sample(self, x, u, t, key):
        """A noisy transition `x_next ~ N(A_t x + B_t u + c_t, N_t)`; `x [n]`, `u [m]`, step `t`
        (clamped to 0..T-1), a `jax.random` key -> `[n]`."""
        t = jnp.clip(t, 0, self.horizon - 1)
        L = jnp.linalg.cholesky(self.N[t])
        eps = jax.random.normal(key, (self.state_dim,), self.N.dtype)
        return self.mean(x, u, t) + L @ eps

    def log_likelihood(self, X, U):
        """`log p(x_1 .. x_T | x_0, u_0 .. u_{T-1})` of each rollout, `[N]` (nats), for rollouts
        `X [N, T+1, n]`, `U [N, T, m]` with the model's `T`, `n`, `m`."""
        N, T, n, m = _check_rollouts(X, U, "LinearGaussianDynamics.log_likelihood")
        if (T, n, m) != (self.horizon, self.state_dim, self.action_dim):
            raise ForethoughtError(
                f"LinearGaussianDynamics.log_likelihood: the model has T={self.horizon}, "
                f"n={self.state_dim}, m={self.action_dim}; X {tuple(np.shape(X))} and U "
                f"{tuple(np.shape(U))} give T={T}, n={n}, m={m}")
        return _log_likelihood(self, jnp.asarray(X, self.A.dtype), jnp.asarray(U, self.A.dtype))

    def save(self, path: Path) -> None:
        """`A, B, c, N` to an `.npz` with their sizes as JSON metadata (no pickle), atomically."""
        from forethought.checkpoint import save

        save(Path(path), self, {"kind": "linear_gaussian", "horizon": self.horizon,
                                "state_dim": self.state_dim, "action_dim": self.action_dim,
                                "dtype": str(np.dtype(self.A.dtype))})

    @classmethod
    def load(cls, path: Path) -> "LinearGaussianDynamics":
        """The model `save` wrote, exactly."""
        from forethought.checkpoint import load, load_meta

        meta = load_meta(Path(path))
        if meta.get("kind") != "linear_gaussian":
            raise ForethoughtError(f"{path} is not a linear-Gaussian dynamics checkpoint (kind "
                                   f"{meta.get('kind')!r})")
        T, n, m, dtype = meta["horizon"], meta["state_dim"], meta["action_dim"], meta["dtype"]
        like = cls(A=np.zeros((T, n, n), dtype), B=np.zeros((T, n, m), dtype),
                   c=np.zeros((T, n), dtype), N=np.zeros((T, n, n), dtype))
        model, _ = load(Path(path), like)
        return jax.tree_util.tree_map(jnp.asarray, model)


@jax.jit
def _log_likelihood(model: LinearGaussianDynamics, X, U):
    pred = (jnp.einsum("tij,ntj->nti", model.A, X[:, :-1]) + jnp.einsum("tij,ntj->nti", model.B, U)
            + model.c)
    r = X[:, 1:] - pred                                             # [N, T, n]
    L = jnp.linalg.cholesky(model.N)                                # [T, n, n]
    w = jax.vmap(lambda L_t, r_t: jsl.solve_triangular(L_t, r_t.T, lower=True).T,
                 in_axes=(0, 1), out_axes=1)(L, r)                  # L_t^-1 r
    log_det = 2.0 * jnp.sum(jnp.log(jnp.diagonal(L, axis1=1, axis2=2)))  # sum over t
    n = X.shape[-1]
    T = U.shape[1]
    return -0.5 * jnp.sum(w**2, axis=(1, 2)) - 0.5 * log_det - 0.5 * T * n * math.log(2 * math.pi)


# ----- the prior -----------------------------------------------------------------------------

class NIWPrior(eqx.Module):
    """A normal-inverse-Wishart prior on the joint Gaussian of `p_t = [x_t; u_t; x_{t+1}]`, per
    step, in GPS's parameterization (module docstring): `mu0 [T, d]`, `Phi [T, d, d]` (the
    prior's covariance guess times `n0`), pseudo-counts `kappa [T]` (for the mean; GPS's `m`) and
    `n0 [T]` (for the covariance); `d = 2n+m`."""

    mu0: jax.Array
    Phi: jax.Array
    kappa: jax.Array
    n0: jax.Array


class DynamicsGMM(eqx.Module):
    """A Gaussian mixture over transitions `[x, u, x']` (`d = 2n+m`), fit by `fit_dynamics_gmm`.

    Attributes:
      log_weights: `[K]` log mixing weights; means: `[K, d]`; covs: `[K, d, d]`.
      log_likelihood: mean log density of the fitted points at the end of EM (nats per point).
      iterations: EM iterations run.
      state_dim, action_dim: n and m (static).
    """

    log_weights: jax.Array
    means: jax.Array
    covs: jax.Array
    log_likelihood: jax.Array
    iterations: jax.Array
    state_dim: int = eqx.field(static=True)
    action_dim: int = eqx.field(static=True)

    def log_responsibilities(self, points):
        """`log p(cluster k | p_i)`, `[P, K]`, for points `[P, d]`."""
        return _log_responsibilities(self.log_weights, self.means, jnp.linalg.cholesky(self.covs),
                                     points)[0]


def _gaussian_log_density(points, mean, chol):
    """`log N(p_i; mean, L L')` for `points [P, d]`, `chol` the lower Cholesky factor `L`."""
    w = jsl.solve_triangular(chol, (points - mean).T, lower=True)
    d = points.shape[-1]
    return (-0.5 * jnp.sum(w**2, axis=0) - jnp.sum(jnp.log(jnp.diagonal(chol)))
            - 0.5 * d * math.log(2 * math.pi))


def _log_responsibilities(log_weights, means, chols, points):
    """`(log r [P, K], log p(p_i) [P])`: E-step of EM."""
    log_joint = log_weights + jax.vmap(_gaussian_log_density, (None, 0, 0), 1)(points, means,
                                                                                chols)
    log_marginal = jax.scipy.special.logsumexp(log_joint, axis=1)
    return log_joint - log_marginal[:, None], log_marginal


def fit_dynamics_gmm(x, u, x_next, key, *, clusters: int | None = None, iterations: int = 100,
                     tol: float = 1e-4, min_points_per_cluster: int = 40,
                     max_clusters: int = 50) -> DynamicsGMM:
    """Fit a Gaussian mixture to transitions `[x, u, x']` by EM, for `gmm_prior`.

    GPS's `DynamicsPriorGMM` choice of size: `K = clusters`, or by default
    `min(max_clusters, max(1, P // min_points_per_cluster))`. EM starts from `K` distinct data
    points as means, the data covariance for every cluster and equal weights. Its M-step adds one
    pseudo-point at the data mean and covariance to every cluster (so an empty or tiny cluster
    falls back to the global Gaussian instead of collapsing onto a point; negligible for a cluster
    of 40 points) and a jitter of 1e-6 times each dimension's variance.

    Args:
      x: `[P, n]` states, u: `[P, m]` actions, x_next: `[P, n]` next states (a replay buffer's
        `obs`, `action`, `next_obs`: all transitions, from every step and episode).
      key: `jax.random` key for the initial means.
      iterations: most EM iterations; EM stops earlier once the mean log-likelihood per point
        grows by less than `tol` (nats).

    Returns:
      `DynamicsGMM`.
    """
    where = "fit_dynamics_gmm"
    if np.ndim(x) != 2:
        raise ForethoughtError(f"{where}: x must have shape (P, n), got {tuple(np.shape(x))}")
    P, n = np.shape(x)
    if np.ndim(u) != 2 or np.shape(u)[0] != P:
        raise ForethoughtError(f"{where}: u must have shape (P, m) = ({P}, m) to match x, "
                               f"got {tuple(np.shape(u))}")
    m = np.shape(u)[1]
    if tuple(np.shape(x_next)) != (P, n):
        raise ForethoughtError(f"{where}: x_next must have shape {(P, n)} to match x, "
                               f"got {tuple(np.shape(x_next))}")
    for name, value in (("x", x), ("u", u), ("x_next", x_next)):
        _check_float_finite(value, name, where)
    K = clusters if clusters is not None else min(max_clusters,
                                                  max(1, P // min_points_per_cluster))
    if not 1 <= K <= P:
        raise ForethoughtError(f"{where}: clusters must be in 1..{P} (the number of "
                               f"transitions), got {K}")
    if iterations < 1:
        raise ForethoughtError(f"{where}: iterations must be >= 1, got {iterations}")
    dtype = jnp.result_type(x, u, x_next)
    points = jnp.concatenate([jnp.asarray(x, dtype), jnp.asarray(u, dtype),
                              jnp.asarray(x_next, dtype)], axis=1)
    log_w, means, covs, ll, it = _em(points, key, jnp.asarray(tol, dtype), clusters=K,
                                     iterations=int(iterations))
    if _concrete(ll) and not bool(jnp.isfinite(ll)):
        raise ForethoughtError(f"{where}: EM diverged (log-likelihood {float(ll)}); check the "
                               "data's scale")
    return DynamicsGMM(log_weights=log_w, means=means, covs=covs, log_likelihood=ll,
                       iterations=it, state_dim=n, action_dim=m)


@partial(jax.jit, static_argnames=("clusters", "iterations"))
def _em(points, key, tol, *, clusters, iterations):
    P, d = points.shape
    K = clusters
    mean = points.mean(0)
    cov = (points - mean).T @ (points - mean) / P
    jitter = jnp.diag(1e-6 * jnp.diagonal(cov) + jnp.finfo(points.dtype).tiny ** 0.5)
    means = points[jax.random.choice(key, P, (K,), replace=False)]
    covs = jnp.broadcast_to(cov + jitter, (K, d, d))
    log_w = jnp.full((K,), -math.log(K), points.dtype)

    def m_step(log_r):
        r = jnp.exp(log_r)                                          # [P, K]
        Nk = r.sum(0)
        means = (r.T @ points + mean) / (Nk + 1.0)[:, None]
        diff = points[None] - means[:, None]                        # [K, P, d]
        scatter = jnp.einsum("pk,kpi,kpj->kij", r, diff, diff)
        covs = (scatter + cov) / (Nk + 1.0)[:, None, None] + jitter
        log_w = jnp.log(Nk + 1.0) - jnp.log(P + K)
        return log_w, means, 0.5 * (covs + jnp.swapaxes(covs, 1, 2))

    def e_step(params):
        log_w, means, covs = params
        log_r, log_p = _log_responsibilities(log_w, means, jnp.linalg.cholesky(covs), points)
        return log_r, log_p.mean()

    def running(state):
        i, _, _, ll, previous = state
        return (i < iterations) & ~(jnp.abs(ll - previous) < tol)

    def iteration(state):
        i, _, log_r, ll, _ = state
        params = m_step(log_r)
        log_r, ll_new = e_step(params)  # also the responsibilities of the next M-step
        return i + 1, params, log_r, ll_new, ll

    params = (log_w, means, covs)
    log_r, ll = e_step(params)
    inf = jnp.asarray(jnp.inf, points.dtype)
    start = (jnp.zeros((), jnp.int32), params, log_r, ll, inf)
    i, (log_w, means, covs), _, ll, _ = jax.lax.while_loop(running, iteration, start)
    return log_w, means, covs, ll, i


def gmm_prior(gmm: DynamicsGMM, X, U, *, strength: float = 1.0) -> NIWPrior:
    """The NIW prior of each step from a GMM over transitions (module docstring, GPS's
    `DynamicsPriorGMM.eval`).

    Args:
      gmm: from `fit_dynamics_gmm` on past transitions of the same system.
      X: `[N, T+1, n]`, U: `[N, T, m]`: the rollouts about to be fit (they choose the clusters).
      strength: the prior's weight in rollouts (`kappa = n0 = strength`, `Phi = strength Sigma0`).

    Returns:
      `NIWPrior` with `mu0 [T, d]`, `Phi [T, d, d]`, `m [T]`, `n0 [T]`.
    """
    where = "gmm_prior"
    N, T, n, m = _check_rollouts(X, U, where)
    if (n, m) != (gmm.state_dim, gmm.action_dim):
        raise ForethoughtError(f"{where}: the GMM was fit to n={gmm.state_dim}, "
                               f"m={gmm.action_dim}; X and U give n={n}, m={m}")
    _check_strength(strength, where)
    dtype = gmm.means.dtype
    return _gmm_prior(gmm, jnp.asarray(X, dtype), jnp.asarray(U, dtype),
                      jnp.asarray(strength, dtype))


@jax.jit
def _gmm_prior(gmm, X, U, strength):
    P = _joint_points(X, U)                                         # [T, N, d]
    T, N, d = P.shape
    chols = jnp.linalg.cholesky(gmm.covs)
    log_r, _ = _log_responsibilities(gmm.log_weights, gmm.means, chols, P.reshape(T * N, d))
    w = jnp.exp(log_r.reshape(T, N, -1)).mean(1)                    # [T, K]
    mu0 = w @ gmm.means                                             # [T, d]
    diff = gmm.means[None] - mu0[:, None]                           # [T, K, d]
    Sigma0 = (jnp.einsum("tk,kij->tij", w, gmm.covs)
              + jnp.einsum("tk,tki,tkj->tij", w, diff, diff))
    counts = jnp.full((T,), strength)
    return NIWPrior(mu0=mu0, Phi=strength * Sigma0, kappa=counts, n0=counts)


def linearization_prior(dynamics: Callable, X, U, *, strength: float = 1.0,
                        noise_cov=None) -> NIWPrior:
    """The NIW prior of each step from a global model linearized at the rollouts' mean
    (module docstring).

    Args:
      dynamics: the global model's mean, `dynamics(x [n], u [m], t) -> [n]`, differentiable with
        `jax.jacfwd` (an Equinox module's bound method traces its arrays).
      X: `[N, T+1, n]`, U: `[N, T, m]`: the rollouts about to be fit.
      strength: the prior's weight in rollouts (`kappa = n0 = strength`, `Phi = strength Sigma0`);
        raise it for a global model you trust.
      noise_cov: `[n, n]` the prior's transition noise `Sigma_f`; None: the global model's own
        one-step error on `X, U`, pooled over rollouts and steps (noise plus the model's bias).

    Returns:
      `NIWPrior` with `mu0 [T, d]`, `Phi [T, d, d]`, `m [T]`, `n0 [T]`.
    """
    where = "linearization_prior"
    if not callable(dynamics):
        raise ForethoughtError(f"{where}: dynamics must be a function (x, u, t) -> x_next, "
                               f"got {dynamics!r}")
    N, T, n, m = _check_rollouts(X, U, where)
    _check_strength(strength, where)
    dtype = jnp.result_type(X, U)
    if noise_cov is not None:
        if tuple(np.shape(noise_cov)) != (n, n):
            raise ForethoughtError(f"{where}: noise_cov must have shape {(n, n)} (n from X), "
                                   f"got {tuple(np.shape(noise_cov))}")
        _check_float_finite(noise_cov, "noise_cov", where)
        noise_cov = jnp.asarray(noise_cov, dtype)
    prior = _linearization_prior(dynamics, jnp.asarray(X, dtype), jnp.asarray(U, dtype),
                                 jnp.asarray(strength, dtype), noise_cov)
    if _concrete(prior.Phi) and not bool(jnp.all(jnp.isfinite(prior.Phi))
                                         & jnp.all(jnp.isfinite(prior.mu0))):
        raise ForethoughtError(f"{where}: the global model gave non-finite values or "
                               "derivatives at the rollouts' mean")
    return prior


@eqx.filter_jit
def _linearization_prior(dynamics, X, U, strength, noise_cov):
    N, T1, n = X.shape
    T = T1 - 1
    steps = jnp.arange(T)
    x_bar, u_bar = X[:, :-1].mean(0), U.mean(0)                     # [T, n], [T, m]
    F = linearize(dynamics, x_bar, u_bar).astype(X.dtype)           # [T, n, n+m]
    f_bar = jax.vmap(dynamics)(x_bar, u_bar, steps).astype(X.dtype)
    Z = jnp.concatenate([X[:, :-1], U], axis=-1)                    # [N, T, n+m]
    dZ = Z - Z.mean(0)
    S_zz = jnp.einsum("nti,ntj->ij", dZ, dZ) / (N * T)
    if noise_cov is None:
        predicted = jax.vmap(jax.vmap(dynamics), (0, 0, None))(X[:, :-1], U, steps)
        r = X[:, 1:] - predicted.astype(X.dtype)
        noise_cov = jnp.einsum("nti,ntj->ij", r, r) / (N * T)
    S_zy = jnp.einsum("ij,tkj->tik", S_zz, F)                       # S_zz F_t'
    S_yy = jnp.einsum("tij,tjk->tik", F, S_zy) + noise_cov
    Sigma0 = jnp.concatenate([
        jnp.concatenate([jnp.broadcast_to(S_zz, (T,) + S_zz.shape), S_zy], axis=2),
        jnp.concatenate([jnp.swapaxes(S_zy, 1, 2), S_yy], axis=2)], axis=1)
    Sigma0 = 0.5 * (Sigma0 + jnp.swapaxes(Sigma0, 1, 2))
    mu0 = jnp.concatenate([x_bar, u_bar, f_bar], axis=1)
    counts = jnp.full((T,), strength)
    return NIWPrior(mu0=mu0, Phi=strength * Sigma0, kappa=counts, n0=counts)


def local_prior(prior: NIWPrior, X, U, *, weights=None, spread: float = 0.1,
                ridge: float = 1e-6) -> NIWPrior:
    """The prior's dynamics on the rollouts' own spread (module docstring, "local prior").

    A GMM prior's covariance is a whole cluster's spread of `[x, u, x']`; next to rollouts that
    vary far less than that (a converging controller's), `Phi` outweighs the data in every
    direction whatever `strength` says, and the fit returns the cluster's secant slope instead of
    the local one. This keeps what the prior says about the dynamics, its conditional
    `x' ~ N(F0_t z + f0_t, N0_t)`, and places it on the data's spread, as `linearization_prior`
    does with a global model's Jacobian:
    `mu0 = [z̄_t; F0_t z̄_t + f0_t]`,
    `Sigma0 = [[S_t, S_t F0_t'], [F0_t S_t, F0_t S_t F0_t' + N0_t]]` with
    `S_t = S_zz,t + spread * mean_t S_zz,t` (the weighted spread of `z` at step `t`, plus a
    fraction of its average over steps so that directions the few rollouts at `t` did not explore
    still get the prior's slope), and `Phi = n0 Sigma0`; `kappa`, `n0` are kept. The prior then
    weighs what its pseudo-counts say: `strength` rollouts that follow its slope.

    Args:
      prior: an `NIWPrior` for these rollouts (`gmm_prior`).
      X: `[N, T+1, n]`, U: `[N, T, m]`: the rollouts about to be fit; weights: `[N]` as in
        `fit_linear_gaussian` (None: all 1).
      spread: the fraction of the step-averaged spread added to each step's (>= 0).
      ridge: regularization of the prior's conditional, as in `fit_linear_gaussian`.

    Returns:
      `NIWPrior` of the same shapes.
    """
    where = "local_prior"
    N, T, n, m = _check_rollouts(X, U, where)
    if not (np.ndim(spread) == 0 and math.isfinite(float(spread)) and float(spread) >= 0):
        raise ForethoughtError(f"{where}: spread must be a finite number >= 0, got {spread!r}")
    if not ridge >= 0:
        raise ForethoughtError(f"{where}: ridge must be >= 0, got {ridge}")
    dtype = jnp.result_type(X, U)
    prior = _check_prior(prior, T, n, m, where, dtype)
    weights = _check_weights(weights, N, where, dtype)
    return _local_prior(prior, jnp.asarray(X, dtype), jnp.asarray(U, dtype), weights,
                        jnp.asarray(spread, dtype), jnp.asarray(ridge, dtype))


@jax.jit
def _local_prior(prior, X, U, weights, spread, ridge):
    n = X.shape[-1]
    k = n + U.shape[-1]
    mean, S = _weighted_moments(_joint_points(X, U), weights)
    S_zz = S[:, :k, :k] + spread * S[:, :k, :k].mean(0)
    own = jax.vmap(_condition, (0, 0, None, None))(prior.mu0, prior.Phi / prior.n0[:, None, None],
                                                   n, ridge)
    F0 = own.F                                                      # [T, n, k]
    z_bar = mean[:, :k]
    y_bar = jnp.einsum("tij,tj->ti", F0, z_bar) + own.c
    S_zy = jnp.einsum("tij,tkj->tik", S_zz, F0)                     # S_t F0_t'
    S_yy = jnp.einsum("tij,tjk->tik", F0, S_zy) + own.N
    Sigma0 = jnp.concatenate([jnp.concatenate([S_zz, S_zy], axis=2),
                              jnp.concatenate([jnp.swapaxes(S_zy, 1, 2), S_yy], axis=2)], axis=1)
    Sigma0 = 0.5 * (Sigma0 + jnp.swapaxes(Sigma0, 1, 2))
    return NIWPrior(mu0=jnp.concatenate([z_bar, y_bar], axis=1),
                    Phi=prior.n0[:, None, None] * Sigma0, kappa=prior.kappa, n0=prior.n0)


# ----- the fit -------------------------------------------------------------------------------

def fit_linear_gaussian(X, U, *, prior: NIWPrior | None = None, ridge: float = 1e-6,
                        weights=None) -> LinearGaussianDynamics:
    """Fit `p(x_{t+1} | x_t, u_t) = N(A_t x_t + B_t u_t + c_t, N_t)` to rollouts, every step
    at once (module docstring).

    Args:
      X: `[N, T+1, n]` states of `N` rollouts, U: `[N, T, m]` their actions (floating point,
        finite).
      prior: None for linear regression (needs `N >= 2`); an `NIWPrior` (from `gmm_prior` or
        `linearization_prior` on these rollouts) for Bayesian linear regression.
      ridge: added to `Sigma_zz` before the solve, in the squared units of x and u (1e-6 as in
        GPS); also the floor on the eigenvalues of `N_t`, so that `N_t` stays positive definite
        when the rollouts are fit exactly.
      weights: `[N]` positive weights of the rollouts (None: all 1). The sample mean and
        covariance are weighted, and the data count against the prior's pseudo-counts as
        `sum(weights)` rollouts.

    Returns:
      `LinearGaussianDynamics` with `A [T, n, n]`, `B [T, n, m]`, `c [T, n]`, `N [T, n, n]`.
    """
    where = "fit_linear_gaussian"
    N, T, n, m = _check_rollouts(X, U, where)
    if prior is None and N < 2:
        raise ForethoughtError(f"{where}: linear regression needs at least 2 rollouts, got "
                               f"X with N={N}; give more, or a prior")
    if not ridge >= 0:
        raise ForethoughtError(f"{where}: ridge must be >= 0, got {ridge}")
    dtype = jnp.result_type(X, U)
    weights = _check_weights(weights, N, where, dtype)
    if prior is not None:
        prior = _check_prior(prior, T, n, m, where, dtype)
    model = _fit(jnp.asarray(X, dtype), jnp.asarray(U, dtype), prior, jnp.asarray(ridge, dtype),
                 weights)
    if _concrete(model.A) and not bool(jnp.all(jnp.isfinite(model.F))
                                       & jnp.all(jnp.isfinite(model.N))):
        raise ForethoughtError(f"{where}: the fit is not finite (a prior with NaN, or data too "
                               "large for the dtype); nothing was returned")
    return model


@jax.jit
def _fit(X, U, prior, ridge, weights):
    P = _joint_points(X, U)                                         # [T, N, d]
    n = X.shape[-1]
    N = weights.sum()                                               # the data's count in rollouts
    mean, S = _weighted_moments(P, weights)                         # p̄_t, ML covariance S_t
    if prior is None:
        Sigma = S
    else:
        e = mean - prior.mu0
        shrink = (N * prior.kappa / (N + prior.kappa))[:, None, None]
        Sigma = ((prior.Phi + N * S + shrink * jnp.einsum("ti,tj->tij", e, e))
                 / (N + prior.n0)[:, None, None])
    return jax.vmap(_condition, (0, 0, None, None))(mean, Sigma, n, ridge)


def _condition(mu, Sigma, n, ridge):
    """Condition the joint `N(mu, Sigma)` of `[z; y]` on `z` -> `(A, B, c, N)` for one step."""
    k = Sigma.shape[0] - n                                          # n + m
    Sigma = 0.5 * (Sigma + Sigma.T)
    Szy, Syy = Sigma[:k, k:], Sigma[k:, k:]
    # Solve through the eigendecomposition of Sigma_zz: with fewer rollouts than n+m+1 it is
    # singular, and in float32 a Cholesky of Sigma_zz + 1e-6 I can fail on rounding alone.
    vals, vecs = jnp.linalg.eigh(Sigma[:k, :k])
    vals = jnp.maximum(vals, 0.0) + ridge
    Szz = (vecs * vals) @ vecs.T
    F = ((Szy.T @ vecs) / vals) @ vecs.T                            # [A B] = Syz Szz^-1
    c = mu[k:] - F @ mu[:k]
    cov = Syy - F @ Szz @ F.T
    # Symmetrize and floor the eigenvalues: an exact fit (N <= n+m+1) leaves N_t about zero, and
    # float32 cancellation can push it slightly negative.
    vals, vecs = jnp.linalg.eigh(0.5 * (cov + cov.T))
    cov = (vecs * jnp.maximum(vals, ridge)) @ vecs.T
    return LinearGaussianDynamics(A=F[:, :n], B=F[:, n:], c=c, N=0.5 * (cov + cov.T))


def _weighted_moments(P, weights):
    """Weighted mean `[T, d]` and maximum-likelihood covariance `[T, d, d]` of points `[T, N, d]`
    with rollout weights `[N]`."""
    w = weights / weights.sum()
    mean = jnp.einsum("n,tni->ti", w, P)
    D = P - mean[:, None]
    return mean, jnp.einsum("n,tni,tnj->tij", w, D, D)


def _joint_points(X, U):
    """`p_t = [x_t; u_t; x_{t+1}]` of every rollout, `[T, N, 2n+m]` (step-major for `vmap`)."""
    return jnp.swapaxes(jnp.concatenate([X[:, :-1], U, X[:, 1:]], axis=-1), 0, 1)


# ----- checks --------------------------------------------------------------------------------

def _check_rollouts(X, U, where):
    """Raise a `ForethoughtError` naming the argument unless `X [N, T+1, n]`, `U [N, T, m]` agree
    and hold finite floats; return `N, T, n, m`."""
    if np.ndim(X) != 3 or np.shape(X)[1] < 2:
        raise ForethoughtError(f"{where}: X must have shape (N, T+1, n) with T >= 1 (N rollouts "
                               f"of T steps), got {tuple(np.shape(X))}")
    N, T1, n = np.shape(X)
    if np.ndim(U) != 3 or tuple(np.shape(U)[:2]) != (N, T1 - 1):
        raise ForethoughtError(f"{where}: U must have shape (N, T, m) = ({N}, {T1 - 1}, m) to "
                               f"match X {tuple(np.shape(X))}, got {tuple(np.shape(U))}")
    m = np.shape(U)[2]
    if n < 1 or m < 1 or N < 1:
        raise ForethoughtError(f"{where}: X {tuple(np.shape(X))} and U {tuple(np.shape(U))} "
                               "must have N, n, m >= 1")
    _check_float_finite(X, "X", where)
    _check_float_finite(U, "U", where)
    return N, T1 - 1, n, m


def _check_prior(prior: NIWPrior, T: int, n: int, m: int, where: str, dtype) -> NIWPrior:
    """`prior` cast to `dtype`, or a `ForethoughtError` naming the field whose shape does not fit
    rollouts of `T` steps, `n` states and `m` actions."""
    d = 2 * n + m
    for name, shape in {"mu0": (T, d), "Phi": (T, d, d), "kappa": (T,), "n0": (T,)}.items():
        got = tuple(np.shape(getattr(prior, name)))
        if got != shape:
            raise ForethoughtError(f"{where}: prior.{name} must have shape {shape} (T={T}, "
                                   f"d=2n+m={d} from X and U), got {got}")
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), prior)


def _check_weights(weights, N, where, dtype):
    """`weights` as a `[N]` array (all ones for None), or a `ForethoughtError` naming the fault."""
    if weights is None:
        return jnp.ones((N,), dtype)
    if tuple(np.shape(weights)) != (N,):
        raise ForethoughtError(f"{where}: weights must have shape ({N},), one per rollout, got "
                               f"{tuple(np.shape(weights))}")
    if _concrete(weights):
        w = np.asarray(weights, np.float64)
        if not (np.all(np.isfinite(w)) and np.all(w > 0)):
            raise ForethoughtError(f"{where}: weights must be finite and > 0, got {w}")
    return jnp.asarray(weights, dtype)


def _check_float_finite(value, name, where):
    """Raise unless `value` is floating point and (when concrete) free of NaN and inf; the
    message points at the first bad entry rather than printing the array."""
    dtype = np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype
    if not np.issubdtype(dtype, np.floating):
        raise ForethoughtError(f"{where}: {name} must be a floating-point array, got dtype {dtype}")
    if not _concrete(value):
        return  # inside a caller's jit nothing can be checked
    array = np.asarray(value)
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ForethoughtError(f"{where}: {name} holds {int(bad.sum())} NaN or inf entries "
                               f"(first at index {first}, value {array[first]}); a fit would "
                               "write them into the model")


def _concrete(value) -> bool:
    """False for a traced value (the fit called inside the caller's `jit` or `vmap`)."""
    return not isinstance(value, jax.core.Tracer)


def _check_strength(strength, where):
    if not (np.ndim(strength) == 0 and float(strength) > 0 and math.isfinite(float(strength))):
        raise ForethoughtError(f"{where}: strength must be a positive number (the prior's weight "
                               f"in rollouts), got {strength!r}")
