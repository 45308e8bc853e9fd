"""Linear-quadratic regulator, time-varying, exactly as seed 000 ("LQR") writes it.

The problem, with `z_t = [x_t; u_t]` and `t = 0 .. T-1`:

    minimize   sum_t  1/2 z_t' C_t z_t + z_t' c_t   +   1/2 x_T' C_T x_T + x_T' c_T
    subject to x_{t+1} = F_t z_t + f_t,   x_0 given.

The note has no terminal term (its backward recursion starts from `V = 0`); that is the
default here, and the optional `C_T [n, n]`, `c_T [n]` put a quadratic cost on the final state
`x_T` by starting the recursion from `V_T = C_T`, `v_T = c_T` instead.

Backward recursion (symbols as in the note; `Q_ux` is the `u` rows and `x` columns of `Q_t`):

    Q_t = C_t + F_t' V_{t+1} F_t                q_t = c_t + F_t' V_{t+1} f_t + F_t' v_{t+1}
    K_t = -Q_uu^-1 Q_ux                         k_t = -Q_uu^-1 q_u
    V_t = Q_xx + Q_xu K_t + K_t' Q_ux + K_t' Q_uu K_t
    v_t = q_x + Q_xu k_t + K_t' q_u + K_t' Q_uu k_t

(the note prints `K_t' Q_u` in `v_t`; the gradient `q_u` is meant). We also carry the constant
`s_t` of `V(x_t) = 1/2 x_t' V_t x_t + x_t' v_t + s_t`, so `V(x_0)` is the optimal cost.
Forward recursion: `u_t = K_t x_t + k_t`, `x_{t+1} = F_t [x_t; u_t] + f_t`.

Stochastic dynamics (the note's "Stochastic Dynamics"): with `x_{t+1} ~ N(F_t z_t + f_t, S_t)`
the optimal controller is the same `K_t, k_t` (the noise is symmetric), and its expected cost
grows by `1/2 sum_t tr(V_{t+1} S_t)`; `lqr_rollout` samples such a rollout and
`lqr_expected_cost` gives the exact expectation.

`backward_pass` is shared with iLQR and DDP (`ilqr.py`), which add a Levenberg-Marquardt term
`mu I` to `Q_uu` and, for DDP, the second-order dynamics term to `Q_t`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax.tree_util import register_dataclass

from forethought.control.solution import Solution
from forethought.errors import ForethoughtError


@register_dataclass
@dataclasses.dataclass(frozen=True)
class BackwardPass:
    """The result of the backward recursion.

    Attributes:
      K: feedback gains `[T, m, n]`.
      k: feedforward terms `[T, m]`.
      V: value Hessians `[T+1, n, n]` (`V[T]` is the terminal one).
      v: value gradients `[T+1, n]`.
      s: value constants `[T+1]`: `V(x_t) = 1/2 x' V_t x + x' v_t + s_t`.
      Q_uu: the unregularized action Hessians `[T, m, m]` (LQR-FLM's controller covariance is
        their inverse).
      ok: True when every (regularized) `Q_uu` was positive definite; if not, the gains hold
        NaN and the problem has no minimum (or, in iLQR, the regularization must grow).
    """

    K: jax.Array
    k: jax.Array
    V: jax.Array
    v: jax.Array
    s: jax.Array
    Q_uu: jax.Array
    ok: jax.Array


def backward_pass(F, f, C, c, V_T, v_T, *, mu=0.0, F2=None) -> BackwardPass:
    """Backward recursion for `Q, q, K, k, V, v` (module docstring), from `V_T, v_T`.

    Args:
      F: `[T, n, n+m]`, f: `[T, n]`, C: `[T, n+m, n+m]`, c: `[T, n+m]` (the note's symbols).
      V_T: `[n, n]`, v_T: `[n]`: the value function at the final state.
      mu: Levenberg-Marquardt term added to `Q_uu` when solving for `K, k` (0 for LQR). The value
        update uses the unregularized `Q` (the note's formulas), which stays exact for the gains
        actually used.
      F2: optional second derivatives of the dynamics `[T, n, n+m, n+m]` (DDP): adds
        `sum_i g_i F2_t[i]` to `Q_t`, `g = V_{t+1} f_t + v_{t+1}` the value gradient at the
        predicted next state.
    """
    n = F.shape[1]
    dtype = F.dtype
    mu = jnp.asarray(mu, dtype)

    def step(carry, inputs):
        V, v, s = carry
        F_t, f_t, C_t, c_t, F2_t = inputs
        g = dot(V, f_t) + v
        Q = C_t + dot(dot(F_t.T, V), F_t)
        if F2_t is not None:
            Q = Q + jnp.sum(g[:, None, None] * F2_t, axis=0)
        Q = 0.5 * (Q + Q.T)
        q = c_t + dot(F_t.T, g)
        Q_xx, Q_xu, Q_ux, Q_uu = Q[:n, :n], Q[:n, n:], Q[n:, :n], Q[n:, n:]
        q_x, q_u = q[:n], q[n:]
        Kk, ok = solve_positive_definite(Q_uu + mu * jnp.eye(Q_uu.shape[0], dtype=dtype),
                                         -jnp.concatenate([Q_ux, q_u[:, None]], axis=1))
        K, k = Kk[:, :n], Kk[:, n]
        V_new = Q_xx + dot(Q_xu, K) + dot(K.T, Q_ux) + dot(K.T, dot(Q_uu, K))
        v_new = q_x + dot(Q_xu, k) + dot(K.T, q_u) + dot(K.T, dot(Q_uu, k))
        s_new = s + 0.5 * dot(f_t, dot(V, f_t)) + dot(f_t, v) + 0.5 * dot(k, dot(Q_uu, k)) \
            + dot(k, q_u)
        V_new = 0.5 * (V_new + V_new.T)
        return (V_new, v_new, s_new), (K, k, V_new, v_new, s_new, Q_uu, ok)

    init = (V_T, v_T, jnp.zeros((), dtype))
    _, (K, k, V, v, s, Q_uu, ok) = jax.lax.scan(step, init, (F, f, C, c, F2), reverse=True)
    return BackwardPass(K=K, k=k, V=jnp.concatenate([V, V_T[None]]),
                        v=jnp.concatenate([v, v_T[None]]),
                        s=jnp.concatenate([s, jnp.zeros((1,), dtype)]), Q_uu=Q_uu, ok=jnp.all(ok))


def dot(a, b):
    """`a @ b` for vectors and matrices. Small products are written as an elementwise product
    and a sum, which XLA fuses: on CPU that runs about 3x faster than a dot call on the 4 x 5
    matrices of a backward pass step; large ones use the dot."""
    a2 = a[None] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    if a2.shape[0] * a2.shape[1] * b2.shape[1] > 4096:
        return a @ b
    out = jnp.sum(a2[:, :, None] * b2[None, :, :], axis=1)
    if a.ndim == 1:
        out = out[0]
    if b.ndim == 1:
        out = out[..., 0]
    return out


def solve_positive_definite(A, B, *, unroll_below: int = 8):
    """`(A^-1 B, ok)` by Cholesky for a symmetric `A [m, m]`, `B [m, r]`; `ok` is False (and the
    solution NaN or meaningless) when `A` is not positive definite.

    For `m < unroll_below` the factorization is written out in scalar operations: inside the
    backward `scan` this is several times faster than LAPACK calls on tiny matrices on CPU.
    """
    m = A.shape[0]
    if m >= unroll_below:
        chol = jnp.linalg.cholesky(A)
        X = jsl.cho_solve((chol, True), B)
        return X, jnp.all(jnp.isfinite(chol))
    zero = jnp.zeros((), A.dtype)
    L = [[zero] * m for _ in range(m)]
    ok = jnp.ones((), bool)
    for j in range(m):
        pivot = A[j, j] - sum((L[j][i] ** 2 for i in range(j)), zero)
        ok = ok & (pivot > 0)
        L[j][j] = jnp.sqrt(pivot)
        for r in range(j + 1, m):
            L[r][j] = (A[r, j] - sum((L[r][i] * L[j][i] for i in range(j)), zero)) / L[j][j]
    y = []
    for r in range(m):  # L y = B
        y.append((B[r] - sum((L[r][i] * y[i] for i in range(r)), jnp.zeros_like(B[0]))) / L[r][r])
    X = [None] * m
    for r in reversed(range(m)):  # L' X = y
        X[r] = (y[r] - sum((L[i][r] * X[i] for i in range(r + 1, m)), jnp.zeros_like(B[0])))
        X[r] = X[r] / L[r][r]
    return jnp.stack(X), ok


@jax.jit
def lqr_rollout(K, k, F, f, x0, key=None, noise_cov=None):
    """Run `u_t = K_t x_t + k_t` through `x_{t+1} = F_t [x_t; u_t] + f_t (+ w_t)`.

    Args:
      K: `[T, m, n]`, k: `[T, m]`: the controller (from `lqr` or `lqr_backward`).
      F: `[T, n, n+m]`, f: `[T, n]`: the dynamics.
      x0: `[n]`.
      key, noise_cov: for stochastic dynamics, a `jax.random` key and the covariance of the
        Gaussian noise `w_t`, `[n, n]` or per step `[T, n, n]` (positive semi-definite).
        Without them the rollout is deterministic.

    Returns:
      `(x [T+1, n], u [T, m])`.
    """
    T, n = f.shape
    dtype = jnp.result_type(K, k, F, f, x0)
    if (key is None) != (noise_cov is None):
        raise ForethoughtError("lqr_rollout: give both key and noise_cov, or neither")
    if key is None:
        w = jnp.zeros((T, n), dtype)
    else:
        cov = jnp.broadcast_to(jnp.asarray(noise_cov, dtype), (T, n, n))
        # A square root by eigh accepts singular covariances (noise on some states only).
        S, E = jnp.linalg.eigh(cov)
        root = E * jnp.sqrt(jnp.maximum(S, 0.0))[:, None, :]
        # Draw all the noise before the scan (faster than inside, see DESIGN.md).
        w = jnp.einsum("tij,tj->ti", root, jax.random.normal(key, (T, n), dtype))

    def step(x, inputs):
        K_t, k_t, F_t, f_t, w_t = inputs
        u = K_t @ x + k_t
        x_next = F_t @ jnp.concatenate([x, u]) + f_t + w_t
        return x_next, (x_next, u)

    x0 = jnp.asarray(x0, dtype)
    _, (x, u) = jax.lax.scan(step, x0, (K, k, F, f, w))
    return jnp.concatenate([x0[None], x]), u


def lqr_objective(C, c, x, u, C_T=None, c_T=None):
    """`sum_t 1/2 z_t' C_t z_t + z_t' c_t + 1/2 x_T' C_T x_T + x_T' c_T` for `x [T+1, n]`,
    `u [T, m]` (terminal terms omitted when `C_T`, `c_T` are None)."""
    z = jnp.concatenate([x[:-1], u], axis=1)
    total = jnp.sum(0.5 * jnp.einsum("ti,tij,tj->t", z, C, z) + jnp.einsum("ti,ti->t", z, c))
    if C_T is not None:
        total = total + 0.5 * x[-1] @ C_T @ x[-1]
    if c_T is not None:
        total = total + x[-1] @ c_T
    return total


@jax.jit
def lqr_backward(F, f, C, c, C_T=None, c_T=None) -> BackwardPass:
    """The note's backward recursion for the problem in the module docstring: gains `K, k` and
    the value function `V, v, s`. Shapes as in `lqr`."""
    T, n, m = _check_shapes(F, f, C, c, C_T, c_T)
    dtype = jnp.result_type(F, f, C, c, *(a for a in (C_T, c_T) if a is not None))
    V_T = jnp.zeros((n, n), dtype) if C_T is None else jnp.asarray(C_T, dtype)
    v_T = jnp.zeros((n,), dtype) if c_T is None else jnp.asarray(c_T, dtype)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return backward_pass(cast(F), cast(f), cast(C), cast(c), V_T, v_T)


@jax.jit
def lqr(F, f, C, c, x0, C_T=None, c_T=None) -> Solution:
    """Solve the LQR problem of the module docstring (seed 000, "LQR") exactly.

    Args:
      F: `[T, n, n+m]` dynamics `x_{t+1} = F_t [x_t; u_t] + f_t`; f: `[T, n]`.
      C: `[T, n+m, n+m]` symmetric stage-cost Hessians; c: `[T, n+m]` stage-cost gradients:
        stage cost `1/2 z' C_t z + z' c_t`, `z = [x; u]`. The `u` block of `C_t + F_t' V F_t`
        must be positive definite (else the gains are NaN and `converged` is False).
      x0: `[n]` initial state.
      C_T: optional `[n, n]`, c_T: optional `[n]`: terminal cost `1/2 x_T' C_T x_T + x_T' c_T`
        (none by default, as in the note).

    Returns:
      `Solution` with `x [T+1, n]`, `u [T, m]`, `cost` (the objective above), `iterations = 1`,
      `converged` (all `Q_uu` positive definite), and the controller `u_t = K_t x_t + k_t`
      (`K [T, m, n]`, `k [T, m]`, in absolute coordinates). Jit-compiled; `vmap` over `x0`
      (or anything else) as needed.
    """
    _, n, _ = _check_shapes(F, f, C, c, C_T, c_T)
    if np.shape(x0) != (n,):
        raise ForethoughtError(f"lqr: x0 must have shape ({n},) (n from F), got {np.shape(x0)}")
    back = lqr_backward(F, f, C, c, C_T, c_T)
    dtype = back.K.dtype
    x, u = lqr_rollout(back.K, back.k, jnp.asarray(F, dtype), jnp.asarray(f, dtype),
                       jnp.asarray(x0, dtype))
    return Solution(x=x, u=u, cost=lqr_objective(jnp.asarray(C, dtype), jnp.asarray(c, dtype),
                                                 x, u, C_T, c_T),
                    iterations=jnp.ones((), jnp.int32), converged=back.ok, K=back.K, k=back.k)


def lqr_expected_cost(back: BackwardPass, x0, noise_cov=None):
    """Expected cost of running the optimal controller from `x0` with Gaussian noise of
    covariance `noise_cov` (`[n, n]` or `[T, n, n]`, None for none) added to every transition:

        V(x_0) + 1/2 sum_{t<T} tr(V_{t+1} S_t),  V(x_0) = 1/2 x_0' V_0 x_0 + x_0' v_0 + s_0.
    """
    value = 0.5 * x0 @ back.V[0] @ x0 + x0 @ back.v[0] + back.s[0]
    if noise_cov is None:
        return value
    T, n = back.k.shape[0], back.V.shape[1]
    cov = jnp.broadcast_to(jnp.asarray(noise_cov, back.V.dtype), (T, n, n))
    return value + 0.5 * jnp.einsum("tij,tji->", back.V[1:], cov)


def _check_shapes(F, f, C, c, C_T, c_T):
    """Raise a `ForethoughtError` naming the argument unless the shapes agree; return T, n, m."""
    if np.ndim(F) != 3:
        raise ForethoughtError(f"lqr: F must have shape (T, n, n+m), got {np.shape(F)}")
    T, n, nm = np.shape(F)
    m = nm - n
    if m < 1:
        raise ForethoughtError(f"lqr: F must have shape (T, n, n+m) with m >= 1, got {np.shape(F)}")
    expected = {"f": (f, (T, n)), "C": (C, (T, nm, nm)), "c": (c, (T, nm)),
                "C_T": (C_T, (n, n)), "c_T": (c_T, (n,))}
    for name, (value, shape) in expected.items():
        if value is not None and tuple(np.shape(value)) != shape:
            raise ForethoughtError(f"lqr: {name} must have shape {shape} (T={T}, n={n}, m={m} "
                                   f"from F), got {tuple(np.shape(value))}")
    return T, n, m
