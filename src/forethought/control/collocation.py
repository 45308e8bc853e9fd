"""Collocation: optimize over states and actions, with the dynamics as constraints.

Seed 000, "Trajectory Optimization". Single shooting optimizes over the actions only and rolls
every candidate out through the dynamics, so the objective of `u_0` passes through `T` nested
dynamics calls ("extremely sensitive to the initial action", the note warns; on an unstable
system the sensitivities grow like the `T`-th power of its growth rate). Collocation makes the
states variables too and asks for the dynamics only as equality constraints:

    minimize over x_1..x_T, u_0..u_{T-1}   J = sum_{t<T} cost(x_t, u_t, t) + final(x_T)
    subject to                             d_t = x_{t+1} - dynamics(x_t, u_t, t) = 0,  t < T,

with `x_0` given (direct multiple shooting with one step per interval: the given discrete
dynamics are the constraint, no trapezoid or other quadrature is added). `final(x_T)` is
`terminal_cost(x_T)` if given, else trajax's `cost(x_T, 0, T)`. Every term then couples at most
two neighbouring steps, however unstable the system, and a guess of the *states* (a straight
line to the goal) can be given, which shooting cannot use.

Method: augmented Lagrangian (Hestenes-Powell; Nocedal & Wright, Algorithm 17.4) with
multipliers `lam [T, n]` and penalty `rho`:

    L(X, U; lam, rho) = J + sum_t lam_t' d_t + rho/2 sum_t |d_t|^2.

- Inner loop: minimize `L` over `(X, U)` by damped Newton steps. `L` is a sum of terms that
  each depend on `w_t = (x_t, u_t, x_{t+1})` (and `final(x_T)`), so with the stage variables
  `s_t = (u_t, x_{t+1})` its Hessian is block-tridiagonal with `(m+n) x (m+n)` blocks: `D_t`
  on the diagonal, `E_t` coupling `s_{t-1}` and `s_t` (only through `x_t`). The Newton system
  `(H + mu I) delta = -g` is solved in `O(T (n+m)^3)` by block elimination, a forward
  Riccati-like recursion `S_t = D_t + mu I - E_t' S_{t-1}^-1 E_t` followed by back
  substitution. The Hessian is exact (`jax.hessian` of each stage term, including the
  `(lam + rho d)' d^2 dynamics` curvature), so the steps converge quadratically near a
  solution; a failed Cholesky factor (indefinite `H + mu I`) or failed backtracking line
  search (Armijo on `L`) multiplies the Levenberg-Marquardt `mu` by `reg_factor`, a taken
  step divides it. The inner loop ends when `|grad L| <= grad_tol` (2-norm over all of
  `(X, U)`), after `max_inner` steps, or when `mu > reg_max`.
- Outer loop: `lam <- lam + rho d` (the first-order multiplier update); `rho <- penalty_factor
  * rho` (up to `penalty_max`) when the constraint violation `max |d|` did not fall below a
  quarter of the previous one.

Why this method: the constraints stay soft while far from feasible (a guess of states need not
be consistent with any actions), the multiplier update makes large penalties unnecessary (so the
Newton systems stay well conditioned, which matters in float32), and Newton with the banded
solve costs about what one iLQR backward pass costs per iteration while converging in a few tens
of iterations on the acrobot. First-order inner solvers (L-BFGS on `L`) were not used: with the
penalty the inner problems are stiff, and they need hundreds of iterations where Newton needs a
handful.

Stopping: `converged` when `max_t |d_t|_inf <= constraint_tol` and `|grad L| <= grad_tol` after
an inner loop (at that point `grad L` is the gradient of the Lagrangian `J + lam' d` with the
updated multipliers: the KKT conditions hold to those tolerances); otherwise after `maxiter`
Newton iterations in all or `max_outer` multiplier updates.

The solver is jit-compiled whole (nested `lax.while_loop`s, `lax.scan` for the banded solve),
`vmap`-able over `x0` (or anything else), and runs in the dtype of `x0` and `U0` (float32 or
float64). Compilation is cached per `(cost, dynamics, terminal_cost)` objects, shapes, dtype and
`maxiter`; arrays inside Equinox modules (a system's bound `system.cost`) are traced, as in
`ilqr.py`.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from forethought.control.solution import Solution, trajax_objective
from forethought.errors import ForethoughtError

_DEBUG = False
_LAM_Y = False


def defects(dynamics, x, u) -> jax.Array:
    """The collocation constraints `d_t = x_{t+1} - dynamics(x_t, u_t, t)`, `[T, n]`, of a
    trajectory `x [T+1, n]`, `u [T, m]`; `jnp.abs(defects(...)).max()` is the constraint
    violation (zero for any rollout)."""
    T = u.shape[0]
    return x[1:] - jax.vmap(dynamics)(x[:-1], u, jnp.arange(T))


def collocation(cost, dynamics, x0, U0, *, terminal_cost=None, X0=None, maxiter: int = 200,
                max_inner: int = 50, max_outer: int = 30, grad_tol: float = 1e-4,
                constraint_tol: float | None = None, penalty_init: float = 10.0,
                penalty_factor: float = 10.0, penalty_max: float | None = None,
                reg_init: float = 0.0, reg_min: float = 1e-6, reg_max: float = 1e10,
                reg_factor: float = 10.0, alpha_min: float = 1e-4,
                armijo: float = 1e-4) -> Solution:
    """Direct collocation by an augmented Lagrangian with banded Newton steps (module docstring).

    Args:
      cost: `cost(x, u, t) -> scalar`, twice differentiable.
      dynamics: `dynamics(x, u, t) -> x_next [n]`, twice differentiable.
      x0: `[n]` initial state (fixed).
      U0: `[T, m]` initial guess of the actions.
      terminal_cost: optional `terminal_cost(x) -> scalar`, replacing trajax's `cost(x_T, 0, T)`.
      X0: optional `[T+1, n]` initial guess of the states (`X0[0]` is ignored: the first state is
        `x0`), e.g. `jnp.linspace(x0, goal, T+1)` or a previous `Solution.x`. It need not be
        consistent with `U0`. Default: `x0` repeated (every state at the start; feasible when
        `x0` is an equilibrium under `U0`, and never diverging the way a rollout of a poor `U0`
        through an unstable system does).
      maxiter: most Newton iterations in all (static: sets the length of `history`).
      max_inner: most Newton iterations per multiplier update.
      max_outer: most multiplier updates.
      grad_tol: the tolerance on `|grad L|` (2-norm over `(X, U)`) ending an inner loop.
      constraint_tol: the tolerance on `max |d_t|`; default `1e-8` in float64, `1e-4` in
        float32.
      penalty_init, penalty_factor, penalty_max: the penalty `rho`: start, growth factor when
        the violation did not fall to a quarter, ceiling (default `1e8` in float64, `1e5` in
        float32, where larger penalties make the Newton systems too ill-conditioned).
      reg_init, reg_min, reg_max, reg_factor: Levenberg-Marquardt `mu` added to the Newton
        Hessian: start, floor (below it `mu` drops to 0), ceiling (ends the inner loop), factor.
      alpha_min: smallest step of the backtracking line search (halving from 1).
      armijo: sufficient-decrease constant of the line search.

    Returns:
      `Solution` with `x [T+1, n]` (the state variables, `x[0] = x0`), `u [T, m]`, `cost`
      (the objective of `(x, u)`), `iterations` (Newton iterations in all), `converged` (the
      KKT test above held), and `history [maxiter]` (the objective after each Newton iteration,
      the last value repeated after the end). `x` satisfies the dynamics to within
      `constraint_tol` when converged; `defects(dynamics, sol.x, sol.u)` gives the residuals.
    """
    where = "collocation"
    for name, fn in (("cost", cost), ("dynamics", dynamics)):
        if not callable(fn):
            raise ForethoughtError(f"{where}: {name} must be a function (x, u, t), got {fn!r}")
    if terminal_cost is not None and not callable(terminal_cost):
        raise ForethoughtError(f"{where}: terminal_cost must be a function x -> scalar or None, "
                               f"got {terminal_cost!r}")
    if np.ndim(x0) != 1:
        raise ForethoughtError(f"{where}: x0 must have shape (n,), got {np.shape(x0)}")
    if np.ndim(U0) != 2 or np.shape(U0)[0] < 1:
        raise ForethoughtError(f"{where}: U0 must have shape (T, m) with T >= 1, "
                               f"got {np.shape(U0)}")
    T, n = np.shape(U0)[0], np.shape(x0)[0]
    if X0 is not None and tuple(np.shape(X0)) != (T + 1, n):
        raise ForethoughtError(f"{where}: X0 must have shape (T+1, n) = {(T + 1, n)} "
                               f"(T from U0, n from x0), got {tuple(np.shape(X0))}")
    for name, value in (("maxiter", maxiter), ("max_inner", max_inner),
                        ("max_outer", max_outer)):
        if int(value) < 1:
            raise ForethoughtError(f"{where}: {name} must be >= 1, got {value}")
    double = jnp.result_type(x0, U0, 1.0) == jnp.float64
    if constraint_tol is None:
        constraint_tol = 1e-8 if double else 1e-4
    if penalty_max is None:
        penalty_max = 1e8 if double else 1e5
    settings = dict(max_inner=max_inner, max_outer=max_outer, grad_tol=grad_tol,
                    constraint_tol=constraint_tol, penalty_init=penalty_init,
                    penalty_factor=penalty_factor, penalty_max=penalty_max, reg_init=reg_init,
                    reg_min=reg_min, reg_max=reg_max, reg_factor=reg_factor,
                    alpha_min=alpha_min, armijo=armijo)
    # Arrays inside the functions (Equinox modules) are traced; the rest is the static jit key.
    fns_arrays, fns_static = eqx.partition((cost, dynamics, terminal_cost), eqx.is_array)
    return _solve(fns_arrays, x0, U0, X0, settings, fns_static=fns_static, maxiter=int(maxiter))


# ----- the banded Newton step ----------------------------------------------------------------

def solve_block_tridiagonal(D, E, r, mu):
    """Solve `(H + mu I) delta = r` for the symmetric block-tridiagonal `H` with diagonal blocks
    `D [T, k, k]` and off-diagonal blocks `E [T, k, k]` (`H[t-1, t] = E_t`, `H[t, t-1] = E_t'`;
    `E_0` is unused), `r [T, k]`, by block Cholesky elimination (a Riccati recursion):

        S_t = D_t + mu I - E_t' S_{t-1}^-1 E_t,   r~_t = r_t - E_t' S_{t-1}^-1 r~_{t-1},
        delta_{T-1} = S_{T-1}^-1 r~_{T-1},        delta_t = S_t^-1 (r~_t - E_{t+1} delta_{t+1}).

    Returns `(delta [T, k], ok)`, `ok` False (and `delta` non-finite) unless every `S_t` is
    positive definite, i.e. unless `H + mu I` is.
    """
    T, k, _ = D.shape
    eye = jnp.eye(k, dtype=D.dtype)
    E = E.at[0].set(0.0)

    def eliminate(carry, inputs):
        L_prev, r_prev = carry
        D_t, E_t, r_t = inputs
        W = jsl.cho_solve((L_prev, True), E_t)           # S_{t-1}^-1 E_t
        S = D_t + mu * eye - E_t.T @ W
        L = jnp.linalg.cholesky(0.5 * (S + S.T))
        r_tilde = r_t - W.T @ r_prev
        return (L, r_tilde), (L, r_tilde)

    _, (L, r_tilde) = jax.lax.scan(eliminate, (eye, jnp.zeros((k,), D.dtype)), (D, E, r))
    E_next = jnp.concatenate([E[1:], jnp.zeros((1, k, k), D.dtype)])

    def substitute(delta_next, inputs):
        L_t, r_t, E_t = inputs
        delta = jsl.cho_solve((L_t, True), r_t - E_t @ delta_next)
        return delta, delta

    _, delta = jax.lax.scan(substitute, jnp.zeros((k,), D.dtype), (L, r_tilde, E_next),
                            reverse=True)
    return delta, jnp.all(jnp.isfinite(L))


def augmented_lagrangian(cost, dynamics, final, x, u, lam, rho):
    """`L = J + sum_t lam_t' d_t + rho/2 sum_t |d_t|^2` of `x [T+1, n]`, `u [T, m]` with
    multipliers `lam [T, n]`, penalty `rho` and final cost `final(x_T)`."""
    d = defects(dynamics, x, u)
    stage = jax.vmap(cost)(x[:-1], u, jnp.arange(u.shape[0])).sum()
    return stage + final(x[-1]) + jnp.sum(lam * d) + 0.5 * rho * jnp.sum(d * d)


class NewtonModel(NamedTuple):
    """The quadratic model of `L` over the stage variables `s_t = (u_t, x_{t+1})` (`k = m+n`).

    Attributes:
      value: `L`, scalar.
      g: `grad L`, `[T, k]`.
      D: diagonal Hessian blocks `[T, k, k]`; E: off-diagonal blocks `[T, k, k]`, `E_t`
        coupling `s_{t-1}` (rows) and `s_t` (columns), nonzero only in the rows of `x_t`.
      d: the defects `[T, n]`.
      A: `A_t = d d_t / d w_t`, `[T, n, 2n+m]`, `w_t = (x_t, u_t, x_{t+1})`.
    """

    value: jax.Array
    g: jax.Array
    D: jax.Array
    E: jax.Array
    d: jax.Array
    A: jax.Array


def newton_model(cost, dynamics, final, x, u, lam, y, rho) -> NewtonModel:
    """`L` (`augmented_lagrangian`), its gradient, and the primal-dual Hessian

        H = hess_w (J + sum_t y_t' d_t) + rho sum_t A_t' A_t

    in block-tridiagonal form. With `y = lam + rho d` this is the exact Hessian of `L`; the
    solver passes its own multiplier estimate `y` (module docstring). `x [T+1, n]` (`x_0`
    fixed, not a variable), `u [T, m]`, `lam, y [T, n]`."""
    T, m = u.shape
    n = x.shape[1]
    W = jnp.concatenate([x[:-1], u, x[1:]], axis=1)

    def defect(w, t):
        return w[n + m:] - dynamics(w[:n], w[n:n + m], t)

    def stage_cost(w, t):
        return cost(w[:n], w[n:n + m], t)

    def curvature(w, t, y_t):
        return stage_cost(w, t) + y_t @ defect(w, t)

    def terms(w, t, lam_t, y_t):
        d, A = defect(w, t), jax.jacfwd(defect)(w, t)
        g = jax.grad(stage_cost)(w, t) + A.T @ (lam_t + rho * d)
        H = jax.hessian(curvature)(w, t, y_t) + rho * A.T @ A
        return d, A, g, H

    d, A, G, H = jax.vmap(terms)(W, jnp.arange(T), lam, y)
    g_T, H_T = jax.grad(final)(x[-1]), jax.hessian(final)(x[-1])
    # s_t = (u_t, x_{t+1}) is the tail of w_t, and x_{t+1} is also the head of w_{t+1}.
    g = G[:, n:].at[:-1, m:].add(G[1:, :n]).at[-1, m:].add(g_T)
    D = H[:, n:, n:].at[:-1, m:, m:].add(H[1:, :n, :n]).at[-1, m:, m:].add(H_T)
    E = jnp.zeros((T, m + n, m + n), H.dtype).at[:, m:, :].set(H[:, :n, n:])
    value = (jax.vmap(cost)(x[:-1], u, jnp.arange(T)).sum() + final(x[-1])
             + jnp.sum(lam * d) + 0.5 * rho * jnp.sum(d * d))
    return NewtonModel(value=value, g=g, D=D, E=E, d=d, A=A)


class _Inner(NamedTuple):
    S: jax.Array          # [T, m+n] stage variables (u_t, x_{t+1})
    y: jax.Array          # [T, n] multiplier estimate for the curvature
    model: NewtonModel
    mu: jax.Array
    steps: jax.Array      # Newton iterations in this inner loop
    iteration: jax.Array  # in all
    history: jax.Array


class _Outer(NamedTuple):
    S: jax.Array
    y: jax.Array
    lam: jax.Array        # [T, n]
    rho: jax.Array
    mu: jax.Array
    violation: jax.Array
    grad_norm: jax.Array
    outer: jax.Array
    iteration: jax.Array
    converged: jax.Array
    history: jax.Array


@partial(jax.jit, static_argnames=("fns_static", "maxiter"))
def _solve(fns_arrays, x0, U0, X0, settings, *, fns_static, maxiter):
    user_cost, user_dynamics, terminal_cost = eqx.combine(fns_arrays, fns_static)
    dtype = jnp.result_type(x0, U0, 1.0)
    x0 = jnp.asarray(x0, dtype)
    U0 = jnp.asarray(U0, dtype)
    T, m = U0.shape
    n = x0.shape[0]
    _check_functions(user_cost, user_dynamics, terminal_cost, x0, U0)
    s = {name: jnp.asarray(value, dtype) for name, value in settings.items()}
    max_inner = jnp.asarray(settings["max_inner"], jnp.int32)
    max_outer = jnp.asarray(settings["max_outer"], jnp.int32)

    # Keep the loop in the solver's dtype whatever constants the functions carry.
    def cost(x, u, t):
        return jnp.asarray(user_cost(x, u, t), dtype)

    def dynamics(x, u, t):
        return jnp.asarray(user_dynamics(x, u, t), dtype)

    if terminal_cost is None:
        def final(x):
            return cost(x, jnp.zeros((m,), dtype), T)
    else:
        def final(x):
            return jnp.asarray(terminal_cost(x), dtype)

    def unpack(S):
        """Stage variables `[T, m+n]` -> `(x [T+1, n], u [T, m])`."""
        return jnp.concatenate([x0[None], S[:, m:]]), S[:, :m]

    def objective(S):
        x, u = unpack(S)
        return jax.vmap(cost)(x[:-1], u, jnp.arange(T)).sum() + final(x[-1])

    def model(S, lam, y, rho):
        return newton_model(cost, dynamics, final, *unpack(S), lam, y, rho)

    def newton_step(state: _Inner, lam, rho):
        mod = state.model

        def factorize(mu):
            delta, ok = solve_block_tridiagonal(mod.D, mod.E, -mod.g, mu)
            return delta, ok & (jnp.sum(mod.g * delta) < 0)

        # Raise the damping until `H + mu I` is positive definite; each try is one banded
        # solve on the same model, much cheaper than an iteration.
        def indefinite(carry):
            mu, _, ok = carry
            return ~ok & (mu <= s["reg_max"])

        def damp_more(carry):
            mu = jnp.maximum(carry[0] * s["reg_factor"], s["reg_min"])
            return (mu, *factorize(mu))

        mu, delta, ok = jax.lax.while_loop(indefinite, damp_more,
                                           (state.mu, *factorize(state.mu)))
        slope = jnp.sum(mod.g * delta)

        def searching(carry):
            alpha, accepted = carry
            return ok & ~accepted & (alpha >= s["alpha_min"])

        def attempt(carry):
            alpha = carry[0]
            value = augmented_lagrangian(cost, dynamics, final, *unpack(state.S + alpha * delta),
                                         lam, rho)
            accepted = value <= mod.value + s["armijo"] * alpha * slope  # False for NaN
            return jnp.where(accepted, alpha, 0.5 * alpha), accepted

        alpha, accepted = jax.lax.while_loop(searching, attempt,
                                             (jnp.ones((), dtype), jnp.zeros((), bool)))
        alpha = jnp.where(accepted, alpha, 0.0)
        S = state.S + alpha * delta
        # The primal-dual multiplier step: y moves towards lam + rho (d + A dw), the
        # multipliers of the linearized constraints, not lam + rho d(new), whose curvature
        # error grows with rho.
        dx = jnp.concatenate([jnp.zeros((1, n), dtype), delta[:, m:]])
        dW = jnp.concatenate([dx[:-1], delta[:, :m], dx[1:]], axis=1)
        dy = lam + rho * (mod.d + jnp.einsum("tij,tj->ti", mod.A, dW)) - state.y
        y = state.y + alpha * dy
        new_model = jax.lax.cond(accepted, lambda: model(S, lam, y, rho), lambda: mod)
        mu_down = mu / s["reg_factor"]
        mu = jnp.where(accepted, jnp.where(mu_down < s["reg_min"], 0.0, mu_down),
                       jnp.maximum(mu * s["reg_factor"], s["reg_min"]))
        J = objective(S)
        if _DEBUG:
            jax.debug.print("it {i} J {J} L {L} g {g} mu {mu} alpha {a} rho {rho} viol {v}",
                            i=state.iteration, J=J, L=new_model.value,
                            g=jnp.linalg.norm(new_model.g), mu=mu, a=alpha, rho=rho,
                            v=jnp.abs(new_model.d).max())
        return _Inner(S=S, y=y, model=new_model, mu=mu, steps=state.steps + 1,
                      iteration=state.iteration + 1,
                      history=state.history.at[state.iteration].set(J))

    def minimize(state: _Outer):
        """The inner loop: Newton on `L(., lam, rho)` from `S`."""
        init = _Inner(S=state.S, y=state.y, model=model(state.S, state.lam, state.y, state.rho),
                      mu=state.mu, steps=jnp.zeros((), jnp.int32), iteration=state.iteration,
                      history=state.history)

        def going(st):
            return ((jnp.linalg.norm(st.model.g) > s["grad_tol"]) & (st.steps < max_inner)
                    & (st.iteration < maxiter) & (st.mu <= s["reg_max"]))

        return jax.lax.while_loop(going, lambda st: newton_step(st, state.lam, state.rho), init)

    def outer_step(state: _Outer):
        inner = minimize(state)
        d = inner.model.d
        violation = jnp.max(jnp.abs(d))
        grad_norm = jnp.linalg.norm(inner.model.g)
        converged = (violation <= s["constraint_tol"]) & (grad_norm <= s["grad_tol"])
        stalled = violation > 0.25 * state.violation
        rho = jnp.where(stalled, jnp.minimum(state.rho * s["penalty_factor"], s["penalty_max"]),
                        state.rho)
        # A new `L` next: let the damping start low again.
        mu = jnp.minimum(inner.mu, s["reg_max"] / s["reg_factor"])
        return _Outer(S=inner.S, y=inner.y, lam=(inner.y if _LAM_Y else state.lam + state.rho * d), rho=rho, mu=mu,
                      violation=violation, grad_norm=grad_norm, outer=state.outer + 1,
                      iteration=inner.iteration, converged=converged, history=inner.history)

    X_guess = jnp.broadcast_to(x0, (T + 1, n)) if X0 is None else jnp.asarray(X0, dtype)
    S0 = jnp.concatenate([U0, X_guess[1:]], axis=1)
    init = _Outer(S=S0, y=jnp.zeros((T, n), dtype), lam=jnp.zeros((T, n), dtype),
                  rho=s["penalty_init"], mu=s["reg_init"],
                  violation=jnp.asarray(jnp.inf, dtype), grad_norm=jnp.asarray(jnp.inf, dtype),
                  outer=jnp.zeros((), jnp.int32), iteration=jnp.zeros((), jnp.int32),
                  converged=jnp.zeros((), bool), history=jnp.zeros((maxiter,), dtype))
    out = jax.lax.while_loop(
        lambda st: ~st.converged & (st.outer < max_outer) & (st.iteration < maxiter),
        outer_step, init)

    x, u = unpack(out.S)
    J = objective(out.S)
    history = jnp.where(jnp.arange(maxiter) < out.iteration, out.history, J)
    return Solution(x=x, u=u, cost=J, iterations=out.iteration, converged=out.converged,
                    history=history)


def _check_functions(cost, dynamics, terminal_cost, x0, U0):
    """At trace time: the functions take and return what the contract says."""
    where = "collocation"
    t = jnp.zeros((), jnp.int32)
    x_next = jax.eval_shape(dynamics, x0, U0[0], t)
    if getattr(x_next, "shape", None) != x0.shape:
        raise ForethoughtError(f"{where}: dynamics(x, u, t) must return shape {x0.shape} "
                               f"like x0, got {getattr(x_next, 'shape', type(x_next))}")
    c = jax.eval_shape(cost, x0, U0[0], t)
    if getattr(c, "shape", None) != ():
        raise ForethoughtError(f"{where}: cost(x, u, t) must return a scalar, "
                               f"got shape {getattr(c, 'shape', type(c))}")
    if terminal_cost is not None:
        c = jax.eval_shape(terminal_cost, x0)
        if getattr(c, "shape", None) != ():
            raise ForethoughtError(f"{where}: terminal_cost(x) must return a scalar, "
                                   f"got shape {getattr(c, 'shape', type(c))}")
