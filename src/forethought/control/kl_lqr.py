"""LQR under a KL bound: the controller update of LQR-FLM and guided policy search.

Seed 000, "Local Models": fit time-varying linear-Gaussian dynamics to a few rollouts of a
linear-Gaussian controller, improve the controller with LQR, and keep the new trajectory
distribution close to the old one, `D_KL(p(tau) || p̄(tau)) <= epsilon`, because the fitted model
is only good near the old rollouts (Levine and Abbeel 2014; GPS's `TrajOptLQRPython`).

The controller (`LinearGaussianController`, absolute coordinates):

    p(u_t | x_t) = N(K_t x_t + k_t, Sigma_t)

which is the note's `N(K_t (x_t - x̂_t) + k_t + û_t, Sigma_t)` with the nominal terms folded
into `k_t`. The problem

    min_p  E_p[ sum_t c(x_t, u_t) + c_T(x_T) ]   s.t.   D_KL(p(tau) || p̄(tau)) <= epsilon

over linear-Gaussian `p` with the fitted dynamics has the Lagrangian
`E_p[c] + eta (D_KL(p || p̄) - epsilon)`. Both trajectory distributions share the dynamics, so
`D_KL(p || p̄) = sum_t E_{x_t ~ p}[ D_KL(p(u|x_t) || p̄(u|x_t)) ]`, and for a fixed `eta` the
minimiser is the maximum-entropy LQR solution of the cost

    c̃(x, u) = c(x, u) / eta - log p̄(u | x)

namely `K, k` from the LQR backward pass (`control/lqr.py`) of `c̃` and `Sigma_t = Q_uu,t^-1`.
The note's "`Sigma_t = Q_uu^-1`: add noise so that samples don't look the same" is this
covariance. `-log p̄(u|x)` is quadratic in `z = [x; u]`: with `P = Sigmā^-1`,

    1/2 z' [[K̄' P K̄, -K̄' P], [-P K̄, P]] z + z' [K̄' P k̄; -P k̄] + const.

As `eta` grows the solution tends to `p̄` (KL 0); as it shrinks, to the LQR optimum of `c`. The
dual variable `eta` is found by bisection on `log eta` (the KL falls monotonically as `eta`
grows): `kl_update` returns the controller whose KL is at most `epsilon` with the smallest such
`eta` to the bisection's precision. A `Q_uu` that is not positive definite (a cost with negative
curvature in `u`) counts as an infinite KL, which pushes `eta` up until the old controller's
precision makes `Q_uu` positive definite.

Costs are quadratic expansions averaged over the rollouts (`quadratize_cost`), in absolute
coordinates, `1/2 z' C_t z + z' c_t + c0_t`; expected costs under the linear-Gaussian trajectory
distribution are exact for such a cost (`expected_cost`), which is GPS's "Laplace" estimate.
Guided policy search (`agents/gps.py`) calls the same update with `p̄` the linearization of its
global policy, which makes its local cost the note's `c - lambda log pi_theta(u|x)` with
`lambda = eta`.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from forethought.control.ilqr import quadratize, quadratize_final
from forethought.control.lqr import backward_pass, dot
from forethought.errors import ForethoughtError
from forethought.models.linear_gaussian import LinearGaussianDynamics


class LinearGaussianController(eqx.Module):
    """`p(u_t | x_t) = N(K_t x_t + k_t, cov_t)`, `t = 0 .. T-1`.

    Attributes:
      K: `[T, m, n]` gains, k: `[T, m]` offsets, cov: `[T, m, m]` covariances (positive definite).
    """

    K: jax.Array
    k: jax.Array
    cov: jax.Array

    @property
    def horizon(self) -> int:
        return self.K.shape[0]

    @property
    def state_dim(self) -> int:
        return self.K.shape[2]

    @property
    def action_dim(self) -> int:
        return self.K.shape[1]

    @classmethod
    def constant(cls, horizon: int, state_dim: int, action: jax.Array, std: jax.Array | float,
                 dtype=jnp.float32) -> "LinearGaussianController":
        """No feedback: `u_t ~ N(action, diag(std^2))` at every step (the usual first controller)."""
        action = jnp.asarray(action, dtype)
        m = action.shape[0]
        std = jnp.broadcast_to(jnp.asarray(std, dtype), (m,))
        if not bool(jnp.all(std > 0)):
            raise ForethoughtError(f"LinearGaussianController.constant: std must be > 0, got {std}")
        return cls(K=jnp.zeros((horizon, m, state_dim), dtype), k=jnp.tile(action, (horizon, 1)),
                   cov=jnp.tile(jnp.diag(std**2), (horizon, 1, 1)))

    def mean(self, x, t):
        """`K_t x + k_t` for `x [n]` and an integer step `t`."""
        return self.K[t] @ x + self.k[t]

    def sample(self, x, t, key):
        """`u ~ N(K_t x + k_t, cov_t)`."""
        L = jnp.linalg.cholesky(self.cov[t])
        return self.mean(x, t) + L @ jax.random.normal(key, (self.action_dim,), self.cov.dtype)

    def log_prob(self, x, u, t):
        """`log p(u | x)` at step `t`."""
        L = jnp.linalg.cholesky(self.cov[t])
        r = jax.scipy.linalg.solve_triangular(L, u - self.mean(x, t), lower=True)
        return -0.5 * r @ r - jnp.sum(jnp.log(jnp.diag(L))) - 0.5 * self.action_dim * jnp.log(2 * jnp.pi)


class QuadraticCost(NamedTuple):
    """`sum_t 1/2 z_t' C_t z_t + z_t' c_t + c0_t + 1/2 x_T' C_T x_T + x_T' c_T + c0_T`."""

    C: jax.Array     # [T, d, d]
    c: jax.Array     # [T, d]
    c0: jax.Array    # [T]
    C_T: jax.Array   # [n, n]
    c_T: jax.Array   # [n]
    c0_T: jax.Array  # []


class Marginals(NamedTuple):
    """The Gaussian marginals of `z_t = [x_t; u_t]` (`[T, d]`, `[T, d, d]`) and of `x_T`."""

    z_mean: jax.Array
    z_cov: jax.Array
    x_mean_T: jax.Array
    x_cov_T: jax.Array


class Update(NamedTuple):
    """The result of `kl_update`."""

    controller: LinearGaussianController
    eta: jax.Array
    """The dual variable: the cost's weight is `1 / eta` against `-log p̄`."""
    kl: jax.Array
    """`D_KL(p || p̄)` of the new controller under the fitted dynamics (nats)."""
    expected_cost: jax.Array
    """The new controller's expected cost under the fitted dynamics and the quadratic cost."""
    ok: jax.Array
    """False when no `eta` in the search range met the bound (the controller is then `p̄`'s
    closest solution found, with the largest `eta`)."""


# ----- costs -------------------------------------------------------------------------------------

@eqx.filter_jit
def quadratize_cost(cost: Callable, terminal_cost: Callable | None, X, U) -> QuadraticCost:
    """Second-order expansions of `cost(x, u, t)` and `terminal_cost(x)` at every rollout's
    `(x_t, u_t)`, written in absolute coordinates and averaged over the rollouts (`X [N, T+1, n]`,
    `U [N, T, m]`): the expected Hessian, as GPS's `eval_cost` takes it."""
    T, n = U.shape[1], X.shape[2]

    def one(Xr, Ur):
        Z = jnp.concatenate([Xr[:-1], Ur], axis=1)
        H, g = quadratize(cost, Xr[:-1], Ur)
        value = jax.vmap(cost)(Xr[:-1], Ur, jnp.arange(T))
        c = g - jnp.einsum("tij,tj->ti", H, Z)
        c0 = value - jnp.einsum("ti,ti->t", g, Z) + 0.5 * jnp.einsum("ti,tij,tj->t", Z, H, Z)
        if terminal_cost is None:
            zero = jnp.zeros((), X.dtype)
            return H, c, c0, jnp.zeros((n, n), X.dtype), jnp.zeros((n,), X.dtype), zero
        x = Xr[-1]
        H_T, g_T = quadratize_final(terminal_cost, x)
        return H, c, c0, H_T, g_T - H_T @ x, terminal_cost(x) - g_T @ x + 0.5 * x @ H_T @ x

    parts = jax.vmap(one)(X, U)
    return QuadraticCost(*(jnp.mean(p, axis=0) for p in parts))


def expected_cost(cost: QuadraticCost, marginals: Marginals):
    """`E[sum_t c(z_t) + c_T(x_T)]` under Gaussian marginals, exact for the quadratic cost."""
    mu, S = marginals.z_mean, marginals.z_cov
    stage = 0.5 * (jnp.einsum("ti,tij,tj->t", mu, cost.C, mu) + jnp.einsum("tij,tji->t", cost.C, S)) \
        + jnp.einsum("ti,ti->t", cost.c, mu) + cost.c0
    m, S_T = marginals.x_mean_T, marginals.x_cov_T
    final = 0.5 * (m @ cost.C_T @ m + jnp.trace(cost.C_T @ S_T)) + cost.c_T @ m + cost.c0_T
    return jnp.sum(stage) + final


# ----- trajectory distributions ------------------------------------------------------------------

def marginals(controller: LinearGaussianController, dynamics: LinearGaussianDynamics, x0_mean,
              x0_cov) -> Marginals:
    """The marginals of `z_t` under the controller and the linear-Gaussian dynamics, from
    `x_0 ~ N(x0_mean, x0_cov)`."""
    F, f, N = dynamics.F, dynamics.f, dynamics.N

    def step(carry, inputs):
        m_x, S_x = carry
        K, k, cov, F_t, f_t, N_t = inputs
        m_u = dot(K, m_x) + k
        S_xu = dot(S_x, K.T)
        S_uu = dot(K, S_xu) + cov
        z_mean = jnp.concatenate([m_x, m_u])
        z_cov = jnp.block([[S_x, S_xu], [S_xu.T, S_uu]])
        m_next = dot(F_t, z_mean) + f_t
        S_next = dot(dot(F_t, z_cov), F_t.T) + N_t
        return (m_next, 0.5 * (S_next + S_next.T)), (z_mean, z_cov)

    (m_T, S_T), (z_mean, z_cov) = jax.lax.scan(
        step, (x0_mean, x0_cov), (controller.K, controller.k, controller.cov, F, f, N))
    return Marginals(z_mean, z_cov, m_T, S_T)


def trajectory_kl(new: LinearGaussianController, old: LinearGaussianController, marg: Marginals):
    """`D_KL(p || p̄) = sum_t E_{x_t ~ p}[D_KL(p(u|x_t) || p̄(u|x_t))]` for two controllers under
    the same dynamics, `marg` being `p`'s marginals."""
    n = new.state_dim

    def one(K, k, cov, K_old, k_old, cov_old, m_x, S_x):
        L_old = jnp.linalg.cholesky(cov_old)
        P = jax.scipy.linalg.cho_solve((L_old, True), jnp.eye(cov_old.shape[0], dtype=cov_old.dtype))
        dK, dk = K - K_old, k - k_old
        r = dK @ m_x + dk
        logdet_old = 2 * jnp.sum(jnp.log(jnp.diag(L_old)))
        logdet_new = jnp.linalg.slogdet(cov)[1]
        return 0.5 * (jnp.trace(P @ cov) - cov.shape[0] + logdet_old - logdet_new + r @ P @ r
                      + jnp.trace(dK.T @ P @ dK @ S_x))

    m_x, S_x = marg.z_mean[:, :n], marg.z_cov[:, :n, :n]
    return jnp.sum(jax.vmap(one)(new.K, new.k, new.cov, old.K, old.k, old.cov, m_x, S_x))


def neg_log_prob_quadratic(controller: LinearGaussianController):
    """`-log p(u | x)` of a linear-Gaussian controller as a quadratic in `z = [x; u]`, up to a
    constant: `(C [T, d, d], c [T, d])` with, for `P = Sigma^-1`,
    `C = [[K' P K, -K' P], [-P K, P]]` and `c = [K' P k; -P k]`."""
    eye = jnp.eye(controller.action_dim, dtype=controller.cov.dtype)
    P = jax.vmap(lambda S: jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(S), True), eye))(controller.cov)
    PK = jnp.einsum("tij,tjk->tik", P, controller.K)              # P K   [T, m, n]
    Pk = jnp.einsum("tij,tj->ti", P, controller.k)                # P k   [T, m]
    top = jnp.concatenate([jnp.einsum("tji,tjk->tik", controller.K, PK), -jnp.swapaxes(PK, 1, 2)], axis=2)
    bottom = jnp.concatenate([-PK, P], axis=2)
    return (jnp.concatenate([top, bottom], axis=1),
            jnp.concatenate([jnp.einsum("tji,tj->ti", controller.K, Pk), -Pk], axis=1))


def solve_eta(dynamics: LinearGaussianDynamics, cost: QuadraticCost, old: LinearGaussianController,
              eta):
    """The maximum-entropy LQR controller of `c / eta - log p̄(u|x)` (module docstring) and
    whether every `Q_uu` was positive definite."""
    eye = jnp.eye(old.action_dim, dtype=old.cov.dtype)
    C_old, c_old = neg_log_prob_quadratic(old)
    C = cost.C / eta + C_old
    c = cost.c / eta + c_old
    back = backward_pass(dynamics.F, dynamics.f, C, c, cost.C_T / eta, cost.c_T / eta)
    cov = jax.vmap(lambda Q: jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(Q), True), eye))(back.Q_uu)
    cov = 0.5 * (cov + jnp.swapaxes(cov, 1, 2))
    ok = back.ok & jnp.all(jnp.isfinite(cov)) & jnp.all(jnp.isfinite(back.K)) & jnp.all(jnp.isfinite(back.k))
    return LinearGaussianController(K=back.K, k=back.k, cov=cov), ok


@partial(jax.jit, static_argnames=("bisections",))
def kl_update(dynamics: LinearGaussianDynamics, cost: QuadraticCost, old: LinearGaussianController,
              x0_mean, x0_cov, epsilon, *, eta_min: float = 1e-6, eta_max: float = 1e16,
              bisections: int = 60) -> Update:
    """The controller minimising the expected quadratic `cost` under `dynamics` subject to
    `D_KL(p || old) <= epsilon` (module docstring), from `x_0 ~ N(x0_mean, x0_cov)`.

    One jitted program: `bisections` halvings of `[log eta_min, log eta_max]`, each a backward
    pass and a forward pass of the marginals. If the bound is slack even at `eta_min` the result
    is (nearly) the unconstrained LQR solution.
    """
    dtype = old.cov.dtype

    def evaluate(log_eta):
        new, ok = solve_eta(dynamics, cost, old, jnp.exp(log_eta))
        marg = marginals(new, dynamics, x0_mean, x0_cov)
        kl = trajectory_kl(new, old, marg)
        kl = jnp.where(ok & jnp.isfinite(kl), kl, jnp.inf)
        return new, marg, kl

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        _, _, kl = evaluate(mid)
        too_far = kl > epsilon
        return jnp.where(too_far, mid, lo), jnp.where(too_far, hi, mid)

    lo, hi = jnp.log(jnp.asarray(eta_min, dtype)), jnp.log(jnp.asarray(eta_max, dtype))
    _, _, kl_lo = evaluate(lo)
    lo, hi = jax.lax.cond(kl_lo <= epsilon, lambda: (lo, lo),
                          lambda: jax.lax.fori_loop(0, bisections, halve, (lo, hi)))
    new, marg, kl = evaluate(hi)
    return Update(controller=new, eta=jnp.exp(hi), kl=kl, expected_cost=expected_cost(cost, marg),
                  ok=kl <= epsilon)


def initial_distribution(X, ridge: float = 1e-6):
    """Sample mean and covariance (plus `ridge I`) of the rollouts' first states `X[:, 0]`."""
    x0 = jnp.asarray(X)[:, 0]
    mean = x0.mean(0)
    d = x0 - mean
    cov = d.T @ d / max(x0.shape[0], 1) + ridge * jnp.eye(x0.shape[1], dtype=x0.dtype)
    return mean, cov


def step_multiplier(previous_cost, predicted_cost, actual_cost, multiplier, *, lower: float = 0.1,
                    upper: float = 10.0) -> float:
    """GPS's step-size rule: with the improvement the last update predicted
    (`previous_cost - predicted_cost`, both under the old fit) and the one it achieved
    (`previous_cost - actual_cost`, the new controller under the new fit), scale the KL step by
    `predicted / (2 (predicted - actual))`, clipped to [0.1, 5], and keep the product in
    `[lower, upper]`: steps grow while the model's predictions hold and shrink when they do not."""
    predicted = previous_cost - predicted_cost
    actual = previous_cost - actual_cost
    if not np.isfinite(predicted) or not np.isfinite(actual):
        return float(np.clip(multiplier * 0.5, lower, upper))
    scale = predicted / (2 * max(1e-4, predicted - actual))
    scale = float(np.clip(scale, 0.1, 5.0))
    return float(np.clip(multiplier * scale, lower, upper))
