"""iLQR and DDP: seed 000, sections "iLQR" and "DDP", with the note's symbols.

Around the current trajectory `(x̂_t, û_t)` each iteration

1. linearizes the dynamics, `F_t = d f / d[x; u]` (`jax.jacfwd`), and quadratizes the cost,
   `c_t = d c / d[x; u]`, `C_t = d^2 c / d[x; u]^2` (`jax.hessian`, forward over reverse);
2. runs the LQR backward pass of `lqr.py` on the deviations `δx_t, δu_t` (with `f_t = 0`: the
   trajectory is feasible), adding `mu I` to `Q_uu` (Levenberg-Marquardt) -> `K_t, k_t`;
   DDP also adds the second-order dynamics term `sum_i v_{t+1,i} d^2 f_i / d[x; u]^2` to `Q_t`,
   and where that leaves some `Q_uu + mu I` indefinite (far from a minimum) it takes the iLQR
   (Gauss-Newton) pass for this iteration rather than a tiny heavily damped step;
3. rolls out the closed loop `u_t = û_t + α k_t + K_t (x_t - x̂_t)`,
   `x_{t+1} = dynamics(x_t, u_t, t)`, halving `α` from `alpha_0` until the objective strictly
   decreases (line search), or gives up below `alpha_min`.

A step that decreases the objective is taken and `mu` is divided by `reg_factor` (set to 0 below
`reg_min`); a non-positive-definite `Q_uu` or a failed line search multiplies it by `reg_factor`
(at least `reg_min`) and the iteration is retried from the same trajectory.

The objective is trajax's: `sum_{t<T} cost(x_t, u_t, t) + cost(x_T, 0, T)`, or with
`terminal_cost` given, `sum_{t<T} cost(x_t, u_t, t) + terminal_cost(x_T)`.

Stopping: after at most `maxiter` iterations (each one backward pass and one line search, taken
or not), or when

- the gradient norm `|dJ/dU|` (Frobenius over `[T, m]`, the total derivative of the objective
  with respect to the controls, by the adjoint recursion on the current linearization; trajax's
  measure, here taken at the returned `U`) is at most `grad_norm_threshold`, or
- a step decreased the objective by at most `relative_cost_threshold * |J|`, or
- `mu` exceeded `reg_max` (no descent step could be found; `converged` is then False unless the
  gradient test holds).

The solvers are jit-compiled whole: one `lax.while_loop` over iterations, `lax.scan` for the
backward and forward passes, a nested `lax.while_loop` for the line search. Compilation is cached
per `(cost, dynamics, terminal_cost)` objects, shapes, dtype, `maxiter`: pass the same function
objects to reuse it. Arrays inside Equinox modules (a system's bound `system.cost`, a learned
model) are traced arguments, not constants, so changing them does not recompile and a batch of
systems can be `vmap`ped over.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from forethought.control.lqr import backward_pass, dot
from forethought.control.solution import Solution, check_arguments, check_problem
from forethought.errors import ForethoughtError


# ----- derivatives the solvers use ---------------------------------------------------------------

def _as_z(fn, n):
    """`fn(x, u, t)` as a function of `z = [x; u]` and `t`."""
    return lambda z, t: fn(z[:n], z[n:], t)


def linearize(dynamics, X, U):
    """`F_t = d dynamics(x, u, t) / d[x; u]` at `(X[t], U[t], t)`: `X [T, n]`, `U [T, m]` ->
    `F [T, n, n+m]`."""
    n = X.shape[1]
    jac = jax.jacfwd(_as_z(dynamics, n))
    return jax.vmap(jac)(jnp.concatenate([X, U], axis=1), jnp.arange(U.shape[0]))


def linearize_second_order(dynamics, X, U):
    """`F [T, n, n+m]` and the dynamics' second derivatives `F2 [T, n, n+m, n+m]`,
    `F2[t, i] = d^2 dynamics_i / d[x; u]^2` at `(X[t], U[t], t)` (for DDP)."""
    n = X.shape[1]
    jac = jax.jacfwd(_as_z(dynamics, n))

    def jac_twice(z, t):
        J = jac(z, t)
        return J, J

    F2, F = jax.vmap(jax.jacfwd(jac_twice, has_aux=True))(
        jnp.concatenate([X, U], axis=1), jnp.arange(U.shape[0]))
    return F, F2


def quadratize(cost, X, U):
    """Cost Hessians and gradients with respect to `z = [x; u]` at `(X[t], U[t], t)`:
    `X [T, n]`, `U [T, m]` -> `(C [T, n+m, n+m], c [T, n+m])`."""
    n = X.shape[1]
    grad = jax.grad(_as_z(cost, n))

    def grad_twice(z, t):
        g = grad(z, t)
        return g, g

    return jax.vmap(jax.jacfwd(grad_twice, has_aux=True))(
        jnp.concatenate([X, U], axis=1), jnp.arange(U.shape[0]))


def quadratize_final(final, x):
    """Hessian `[n, n]` and gradient `[n]` of the final cost `final(x)` at `x [n]`."""
    grad = jax.grad(final)

    def grad_twice(x):
        g = grad(x)
        return g, g

    return jax.jacfwd(grad_twice, has_aux=True)(x)


def gradient(F, c, v_T):
    """`dJ/dU [T, m]` by the adjoint (costate) recursion from the linearization:
    `lambda_T = v_T`, `g_t = c_u + F_u' lambda_{t+1}`, `lambda_t = c_x + F_x' lambda_{t+1}`."""
    n = F.shape[1]

    def step(lam, inputs):
        F_t, c_t = inputs
        g = c_t + dot(F_t.T, lam)
        return g[:n], g[n:]

    _, g = jax.lax.scan(step, v_T, (F, c), reverse=True)
    return g


def rollout(dynamics, x0, U):
    """States `X [T+1, n]` from `x0 [n]` under the open-loop controls `U [T, m]`."""
    def step(x, inputs):
        u, t = inputs
        x_next = dynamics(x, u, t)
        return x_next, x_next

    _, X = jax.lax.scan(step, x0, (U, jnp.arange(U.shape[0])))
    return jnp.concatenate([x0[None], X])


# ----- the solvers -------------------------------------------------------------------------------

def ilqr(cost, dynamics, x0, U0, *, terminal_cost=None, maxiter: int = 100,
         grad_norm_threshold: float = 1e-4, relative_cost_threshold: float | None = None,
         alpha_0: float = 1.0, alpha_min: float = 5e-5, alpha_shrink: float = 0.5,
         reg_init: float = 0.0, reg_min: float = 1e-6, reg_max: float = 1e10,
         reg_factor: float = 10.0) -> Solution:
    """Iterative LQR (seed 000, "iLQR"); the algorithm and stopping rules are in the module
    docstring.

    Args:
      cost: `cost(x, u, t) -> scalar`, twice differentiable.
      dynamics: `dynamics(x, u, t) -> x_next [n]`, differentiable.
      x0: `[n]` initial state.
      U0: `[T, m]` initial controls.
      terminal_cost: optional `terminal_cost(x) -> scalar`, replacing trajax's `cost(x_T, 0, T)`.
      maxiter: most iterations (static: sets the length of `history`).
      grad_norm_threshold: stop when `|dJ/dU| <= grad_norm_threshold`.
      relative_cost_threshold: stop when a step lowers the objective by at most this times `|J|`;
        None means 10 machine epsilons of the dtype (the objective no longer changes beyond
        rounding, which in float32 comes before the gradient test); 0 turns the test off, as
        trajax's default `obj_step_threshold`.
      alpha_0, alpha_min, alpha_shrink: line search: first step, smallest step, shrink factor.
      reg_init, reg_min, reg_max, reg_factor: Levenberg-Marquardt `mu` on `Q_uu`: start, floor
        (below it `mu` drops to 0), ceiling (stop), factor.

    Returns:
      `Solution` with `x [T+1, n]`, `u [T, m]`, `cost` (objective), `iterations`, `converged`
      (a stopping test other than `maxiter` / `reg_max` held), `history [maxiter]` (objective
      after each iteration, the last value repeated after the end), and the LQR gains about the
      returned trajectory, in deviation form as in the note: `δu_t = K_t δx_t + k_t`
      (`K [T, m, n]`, `k [T, m]`; `k ~ 0` at convergence), i.e. the feedback controller
      `u_t = u[t] + K_t (x_t - x[t])`: those of the positive definite backward pass about it with
      the smallest `mu` tried (raised past the last one if needed; NaN only if none up to `reg_max`
      is positive definite).
    """
    return _dispatch(cost, dynamics, x0, U0, terminal_cost, maxiter, False, locals())


def ddp(cost, dynamics, x0, U0, *, terminal_cost=None, maxiter: int = 100,
        grad_norm_threshold: float = 1e-4, relative_cost_threshold: float | None = None,
        alpha_0: float = 1.0, alpha_min: float = 5e-5, alpha_shrink: float = 0.5,
        reg_init: float = 0.0, reg_min: float = 1e-6, reg_max: float = 1e10,
        reg_factor: float = 10.0) -> Solution:
    """Differential dynamic programming (seed 000, "DDP"): `ilqr` with the second-order
    dynamics term in the backward pass, `Q_t += sum_i v_{t+1,i} F2_t[i]` (`F2` from
    `linearize_second_order`). Near a minimum it converges like Newton's method on the
    objective over `U` (quadratically, where iLQR's Gauss-Newton steps converge linearly when the
    residuals are large); an iteration where the term makes `Q_uu + mu I` indefinite takes the
    iLQR pass instead. Arguments and result as `ilqr`."""
    return _dispatch(cost, dynamics, x0, U0, terminal_cost, maxiter, True, locals())


_SETTINGS = ("grad_norm_threshold", "relative_cost_threshold", "alpha_0", "alpha_min",
             "alpha_shrink", "reg_init", "reg_min", "reg_max", "reg_factor")


def _dispatch(cost, dynamics, x0, U0, terminal_cost, maxiter, second_order, arguments):
    where = "ddp" if second_order else "ilqr"
    check_arguments(cost, dynamics, terminal_cost, x0, U0, where)
    if int(maxiter) < 1:
        raise ForethoughtError(f"{where}: maxiter must be >= 1, got {maxiter}")
    settings = {name: arguments[name] for name in _SETTINGS}
    # Arrays inside the functions (Equinox modules) are traced; the rest is the static jit key.
    fns_arrays, fns_static = eqx.partition((cost, dynamics, terminal_cost), eqx.is_array)
    return _solve(fns_arrays, x0, U0, settings, fns_static=fns_static, maxiter=int(maxiter),
                  second_order=second_order)


class _Linearization(NamedTuple):
    F: jax.Array          # [T, n, n+m]
    F2: jax.Array | None  # [T, n, n+m, n+m] (DDP) or None
    C: jax.Array          # [T, n+m, n+m]
    c: jax.Array          # [T, n+m]
    V_T: jax.Array        # [n, n]
    v_T: jax.Array        # [n]


class _State(NamedTuple):
    X: jax.Array          # current trajectory [T+1, n] and controls [T, m]
    U: jax.Array
    J: jax.Array          # its objective (inf before the first rollout)
    lin: _Linearization   # derivatives about (X, U)
    grad_norm: jax.Array  # |dJ/dU| at U
    mu: jax.Array         # Levenberg-Marquardt term
    K: jax.Array          # gains of the backward pass about (X, U) with mu
    k: jax.Array
    ok: jax.Array         # whether that backward pass found every Q_uu positive definite
    K_ok: jax.Array       # gains of the first positive definite pass about (X, U) (smallest mu)
    k_ok: jax.Array
    have_ok: jax.Array    # whether there was one
    iteration: jax.Array
    converged: jax.Array
    done: jax.Array
    history: jax.Array


@partial(jax.jit, static_argnames=("fns_static", "maxiter", "second_order"))
def _solve(fns_arrays, x0, U0, settings, *, fns_static, maxiter, second_order):
    user_cost, user_dynamics, terminal_cost = eqx.combine(fns_arrays, fns_static)
    dtype = jnp.result_type(x0, U0, 1.0)
    x0 = jnp.asarray(x0, dtype)
    U0 = jnp.asarray(U0, dtype)
    T, m = U0.shape
    n = x0.shape[0]
    check_problem(user_cost, user_dynamics, terminal_cost, x0, U0,
                     "ddp" if second_order else "ilqr")
    if settings["relative_cost_threshold"] is None:
        settings = {**settings, "relative_cost_threshold": 10 * jnp.finfo(dtype).eps}
    s = {name: jnp.asarray(value, dtype) for name, value in settings.items()}
    steps = jnp.arange(T)

    # Keep the loop in the solver's dtype whatever constants the functions carry.
    def cost(x, u, t):
        return jnp.asarray(user_cost(x, u, t), dtype)

    def dynamics(x, u, t):
        return jnp.asarray(user_dynamics(x, u, t), dtype)

    def final(x):
        if terminal_cost is None:
            return cost(x, jnp.zeros((m,), dtype), T)
        return jnp.asarray(terminal_cost(x), dtype)

    def relinearize(X, U):
        if second_order:
            F, F2 = linearize_second_order(dynamics, X[:-1], U)
        else:
            F, F2 = linearize(dynamics, X[:-1], U), None
        C, c = quadratize(cost, X[:-1], U)
        V_T, v_T = quadratize_final(final, X[-1])
        lin = _Linearization(F=F, F2=F2, C=C, c=c, V_T=V_T, v_T=v_T)
        return lin, jnp.linalg.norm(gradient(F, c, v_T))

    def backward(lin, mu):
        zeros = jnp.zeros((T, n), dtype)
        if not second_order:
            back = backward_pass(lin.F, zeros, lin.C, lin.c, lin.V_T, lin.v_T, mu=mu)
            return back.K, back.k, back.ok

        # Far from a minimum the second-order term can make Q_uu indefinite for any small mu;
        # then take this iteration's Gauss-Newton (iLQR) step instead of a tiny damped one. (A
        # loop of at most two passes rather than a `cond`, so the pass is compiled once.)
        def attempt(carry):
            tries, *_ = carry
            F2 = lin.F2 * (tries == 0).astype(dtype)
            back = backward_pass(lin.F, zeros, lin.C, lin.c, lin.V_T, lin.v_T, mu=mu, F2=F2)
            return tries + 1, back.K, back.k, back.ok

        init = (0, jnp.zeros((T, m, n), dtype), jnp.zeros((T, m), dtype), jnp.zeros((), bool))
        _, K, k, ok = jax.lax.while_loop(lambda c: ~c[3] & (c[0] < 2), attempt, init)
        return K, k, ok

    def forward(X, U, K, k, alpha):
        """Closed-loop rollout `u_t = û_t + α k_t + K_t (x_t - x̂_t)` and its objective."""
        def step(x, inputs):
            x_hat, u_hat, K_t, k_t, t = inputs
            u = u_hat + alpha * k_t + dot(K_t, x - x_hat)
            return dynamics(x, u, t), (x, u, cost(x, u, t))

        x_T, (X_new, U_new, costs) = jax.lax.scan(step, x0, (X[:-1], U, K, k, steps))
        return jnp.concatenate([X_new, x_T[None]]), U_new, costs.sum() + final(x_T)

    def line_search(state):
        def searching(carry):
            alpha, *_, accepted = carry
            return state.ok & ~accepted & (alpha >= s["alpha_min"])

        def attempt(carry):
            alpha = carry[0]
            X, U, J = forward(state.X, state.U, state.K, state.k, alpha)
            accepted = J < state.J  # False for NaN
            return jnp.where(accepted, alpha, alpha * s["alpha_shrink"]), X, U, J, accepted

        init = (s["alpha_0"], state.X, state.U, state.J, jnp.zeros((), bool))
        _, X, U, J, accepted = jax.lax.while_loop(searching, attempt, init)
        return (jnp.where(accepted, X, state.X), jnp.where(accepted, U, state.U),
                jnp.where(accepted, J, state.J), accepted)

    def iteration(state):
        # The first pass starts from J = inf and zero gains: its "line search" is the rollout of
        # U0, which it accepts unless that is NaN. Every later pass is one iLQR/DDP iteration.
        first = state.J == jnp.inf
        X, U, J, accepted = line_search(state)
        lin, grad_norm = jax.lax.cond(accepted, relinearize,
                                      lambda X, U: (state.lin, state.grad_norm), X, U)
        mu_down = state.mu / s["reg_factor"]
        mu = jnp.where(accepted, jnp.where(mu_down < s["reg_min"], 0.0, mu_down),
                       jnp.maximum(state.mu * s["reg_factor"], s["reg_min"]))
        mu = jnp.where(first, state.mu, mu)
        K, k, ok = backward(lin, mu)
        # mu only grows between accepted steps, so the first good pass about X has the smallest mu
        keep = ok & (accepted | ~state.have_ok)
        K_ok, k_ok = jnp.where(keep, K, state.K_ok), jnp.where(keep, k, state.k_ok)
        have_ok = jnp.where(accepted, ok, state.have_ok | ok)
        decrease = (state.J - J) / jnp.maximum(jnp.abs(state.J), jnp.finfo(dtype).tiny)
        converged = ((grad_norm <= s["grad_norm_threshold"])
                     | (accepted & ~first & (decrease <= s["relative_cost_threshold"])))
        history = jnp.where(first, state.history, state.history.at[state.iteration].set(J))
        return _State(X=X, U=U, J=J, lin=lin, grad_norm=grad_norm, mu=mu, K=K, k=k, ok=ok,
                      K_ok=K_ok, k_ok=k_ok, have_ok=have_ok,
                      iteration=state.iteration + (~first).astype(jnp.int32),
                      converged=converged,
                      done=converged | (mu > s["reg_max"]) | (first & ~accepted),
                      history=history)

    nm = n + m
    lin0 = _Linearization(
        F=jnp.zeros((T, n, nm), dtype), F2=jnp.zeros((T, n, nm, nm), dtype) if second_order
        else None, C=jnp.zeros((T, nm, nm), dtype), c=jnp.zeros((T, nm), dtype),
        V_T=jnp.zeros((n, n), dtype), v_T=jnp.zeros((n,), dtype))
    init = _State(X=jnp.zeros((T + 1, n), dtype), U=U0, J=jnp.asarray(jnp.inf, dtype), lin=lin0,
                  grad_norm=jnp.asarray(jnp.inf, dtype), mu=s["reg_init"],
                  K=jnp.zeros((T, m, n), dtype), k=jnp.zeros((T, m), dtype),
                  ok=jnp.ones((), bool), K_ok=jnp.zeros((T, m, n), dtype), k_ok=jnp.zeros((T, m), dtype),
                  have_ok=jnp.zeros((), bool), iteration=jnp.zeros((), jnp.int32),
                  converged=jnp.zeros((), bool), done=jnp.zeros((), bool),
                  history=jnp.zeros((maxiter,), dtype))
    out = jax.lax.while_loop(lambda st: ~st.done & (st.iteration < maxiter), iteration, init)

    # The gains returned belong to the returned trajectory: the positive definite backward pass
    # about it with the smallest mu. The loop's last pass may have failed (non-finite gains, e.g.
    # where squashed actions saturate and Q_uu is singular); then mu is raised until one succeeds.
    def regularize(carry):
        mu, *_ = carry
        mu = jnp.maximum(mu * s["reg_factor"], s["reg_min"])
        return (mu, *backward(out.lin, mu))

    _, K, k, ok = jax.lax.while_loop(lambda c: ~c[3] & (c[0] <= s["reg_max"]), regularize,
                                     (out.mu, out.K_ok, out.k_ok, out.have_ok))
    history = jnp.where(jnp.arange(maxiter) < out.iteration, out.history, out.J)
    return Solution(x=out.X, u=out.U, cost=out.J, iterations=out.iteration,
                    converged=out.converged, K=jnp.where(ok, K, jnp.nan), k=jnp.where(ok, k, jnp.nan),
                    history=history)

