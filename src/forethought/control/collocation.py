"""Collocation: optimize over states and actions, with the dynamics as constraints.

Seed 000, "Trajectory Optimization". Single shooting optimizes over the actions only and rolls
every candidate out through the dynamics, so `u_0` reaches the cost through `T` nested dynamics
calls ("extremely sensitive to the initial action", the note warns; on an unstable system the
sensitivities grow like the `T`-th power of its growth rate). Collocation makes the states
variables too and asks for the dynamics only as equality constraints:

    minimize over x_1..x_T, u_0..u_{T-1}   J = sum_{t<T} cost(x_t, u_t, t) + final(x_T)
    subject to                             d_t = x_{t+1} - dynamics(x_t, u_t, t) = 0,  t < T,

with `x_0` given: direct multiple shooting with one step per interval (the given discrete
dynamics are the constraint; no trapezoid or other quadrature is added). `final(x_T)` is
`terminal_cost(x_T)` if given, else trajax's `cost(x_T, 0, T)`. Every term couples at most two
neighbouring steps, however unstable the system, and a guess of the *states* (a straight line
to the goal) can be given, which shooting has no way to use.

Method: augmented Lagrangian, with multipliers `lam [T, n]` and penalty `rho`,

    L(X, U; lam, rho) = J + sum_t lam_t' d_t + rho/2 sum_t |d_t|^2,

and the outer loop of Nocedal & Wright, "Numerical Optimization" (2nd ed.), Algorithm 17.4
(after LANCELOT): minimize `L` over `(X, U)` until `|grad L| <= omega`; then if
`max |d| <= eta`, update `lam <- lam + rho d` and tighten `eta <- eta / rho^0.9`,
`omega <- omega / rho`; otherwise keep `lam`, raise `rho <- penalty_factor * rho` and reset
`eta = rho^-0.1`, `omega = 1 / rho` (once `rho` is at `penalty_max`, `lam` is updated anyway).

The inner minimization takes Newton steps `(H + mu I) delta = -grad L` in a primal-dual form,

    H = hess (J + sum_t y_t' d_t) + rho sum_t A_t' A_t,     A_t = d d_t / d (x_t, u_t, x_{t+1}),

with `y` a multiplier estimate moved along with each step towards the multipliers of the
linearized constraints, `y <- y + alpha (lam + rho (d + A delta) - y)`. With `y = lam + rho d`
this `H` is the exact Hessian of `L`, but Newton's method on a penalty function converges fast
only close to the solution (the curvature term `rho d' hess d` changes quickly with the step),
while the primal-dual `H` keeps the local behaviour of SQP at any `rho`: on the acrobot the same
outer loop needed two to three times fewer steps with it.

`delta` minimizes the quadratic model of `L`, which is an LQR problem in the deviations with a
slack `w_t` on the linearized dynamics, penalized by `rho/2 |w_t|^2` (`newton_direction`). A
Riccati recursion in the notes' symbols (`Q, q, K, k, V, v`, as in `lqr.py`) solves it in
`O(T (n+m)^3)`, and its slack gives the new multipliers, `y_t = rho w_t`. Every term of `L`
couples only neighbouring steps, so `H` is block-tridiagonal and could be factored directly, but
that forms `rho A'A` next to the cost's curvature and loses about `log10(rho)` digits: in
float32 the violations stalled between 1e-5 and 1e-4 on the built-in swing-ups, where the
Riccati form reaches about 1e-6. A non-positive-definite `H + mu I` (some `Q_uu` or
`rho I + V` not positive definite) raises the Levenberg-Marquardt `mu` by `reg_factor` (at
least to `reg_min`) and recomputes the step; a backtracking line search (Armijo on `L`, halving
from 1) that fails raises `mu` too; a taken step lowers it.

Why this method: the constraints stay soft while far from feasible, so a state guess need not be
consistent with any actions; the multiplier update reaches feasibility without the penalty
growing without bound; Newton steps converge in a few tens of iterations on the built-in
swing-ups (10 to 40), and the Riccati recursion makes each linear in `T` and accurate in float32.
A step costs more than an iLQR iteration (second derivatives of the dynamics, a slack to
eliminate). A first-order inner solver would avoid the Hessians, but the penalty makes the inner
problems stiff: optax's L-BFGS on the same `L` (acrobot, `rho = 1000`) still had `|grad L| ~ 1`
and violations ~ 2e-3 after 15 x 200 iterations.

Stopping: an inner minimization is solved when `|grad L| <= omega` (2-norm over all of
`(X, U)`) or the Newton decrement `-grad L' delta` is below `100 eps (1 + |L|)` (`eps` the
dtype's machine epsilon: no step can improve `L` beyond roundoff; this is the test that ends
float32 runs, whose `grad L` carries roundoff of order `rho eps |x|`), or after `max_inner`
steps, or when no descent step is found (`mu > reg_max`). The solver has `converged` when an
inner minimization is solved to `grad_tol` (or roundoff) with `max_t |d_t| <= constraint_tol`:
`grad L` is then the gradient of the Lagrangian `J + lam' d` with the updated multipliers, so
the KKT conditions hold to those tolerances. It stops there, after `maxiter` Newton steps in all,
after `max_outer` outer updates, or when no descent step can be found.

The solver is jit-compiled whole: one `lax.while_loop` whose body is a Newton step or, when an
inner minimization is over, an outer update (one site for the model and the Riccati recursion
keeps compiling short), `lax.scan` for the recursion. It is `vmap`-able over `x0` (or anything
else) and runs in the dtype of `x0` and `U0` (float32 or float64). Compilation is cached per
`(cost, dynamics, terminal_cost)` objects, shapes, dtype, `X0` given or not, and `maxiter`;
arrays inside Equinox modules (a system's bound `system.cost`) are traced arguments, as in
`ilqr.py`.

Note: an open-loop `u` from any method is only as good as the model and the arithmetic, and on an
unstable system rolling it out amplifies the `1e-8` defects exponentially; execute it with
feedback (MPC, or the LQR gains about `(x, u)`).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from forethought.control.solution import Solution, check_arguments, check_problem
from forethought.errors import ForethoughtError


def collocation(cost, dynamics, x0, U0, *, terminal_cost=None, X0=None, maxiter: int = 200,
                max_inner: int = 10, max_outer: int = 50, grad_tol: float = 1e-4,
                constraint_tol: float | None = None, penalty_init: float = 1000.0,
                penalty_factor: float = 10.0, penalty_max: float = 1e8,
                reg_init: float = 0.0, reg_min: float = 1e-6, reg_max: float = 1e10,
                reg_factor: float = 10.0, alpha_min: float = 1e-4,
                armijo: float = 1e-4) -> Solution:
    """Direct collocation by an augmented Lagrangian with Riccati-solved Newton steps (module
    docstring).

    Args:
      cost: `cost(x, u, t) -> scalar`, twice differentiable.
      dynamics: `dynamics(x, u, t) -> x_next [n]`, twice differentiable.
      x0: `[n]` initial state (fixed).
      U0: `[T, m]` initial guess of the actions.
      terminal_cost: optional `terminal_cost(x) -> scalar`, replacing trajax's `cost(x_T, 0, T)`.
      X0: optional `[T+1, n]` initial guess of the states, e.g. `jnp.linspace(x0, goal, T+1)` or
        a previous `Solution.x`; `X0[0]` is ignored (the first state is `x0`), and the guess
        need not be consistent with `U0`. Default: `x0` repeated at every step (feasible when
        `x0` is an equilibrium under `U0`, and never diverging the way a rollout of a poor `U0`
        through an unstable system can). Pass the rollout of `U0` to start where shooting does.
      maxiter: most Newton steps in all (static: sets the length of `history`).
      max_inner: most Newton steps per outer iteration.
      max_outer: most outer (multiplier or penalty) updates.
      grad_tol: `|grad L|` (2-norm over all `(X, U)`) at which the solve is stationary.
      constraint_tol: `max_t |d_t|` at which it is feasible; default `1e-8` in float64, `1e-5`
        in float32.
      penalty_init, penalty_factor, penalty_max: the penalty `rho`: start, growth factor,
        ceiling. The default start suits costs of order 1 to 1000 per trajectory, as the
        built-in systems have.
      reg_init, reg_min, reg_max, reg_factor: Levenberg-Marquardt `mu` added to the Newton
        Hessian: start, floor (below it `mu` drops to 0), ceiling (ends the solve), factor.
      alpha_min: smallest step of the backtracking line search (halving from 1).
      armijo: sufficient-decrease constant of the line search.

    Returns:
      `Solution` with `x [T+1, n]` (the state variables, `x[0] = x0`), `u [T, m]`, `cost` (the
      objective of these `(x, u)` in trajax's convention, not of a rollout of `u`),
      `iterations` (Newton steps in all), `converged` (the KKT test in the module docstring
      held) and `history [maxiter]` (the objective after each Newton step, the last value
      repeated after the end); no feedback gains (`K`, `k` are None). `x` satisfies the
      dynamics to `constraint_tol` when converged; `defects(dynamics, sol.x, sol.u)` gives
      the residuals.
    """
    where = "collocation"
    check_arguments(cost, dynamics, terminal_cost, x0, U0, where)
    T, n = np.shape(U0)[0], np.shape(x0)[0]
    if X0 is not None and tuple(np.shape(X0)) != (T + 1, n):
        raise ForethoughtError(f"{where}: X0 must have shape (T+1, n) = {(T + 1, n)} "
                               f"(T from U0, n from x0), got {tuple(np.shape(X0))}")
    for name, value in (("maxiter", maxiter), ("max_inner", max_inner),
                        ("max_outer", max_outer)):
        if int(value) < 1:
            raise ForethoughtError(f"{where}: {name} must be >= 1, got {value}")
    if not penalty_init > 0 or not penalty_factor > 1:
        raise ForethoughtError(f"{where}: need penalty_init > 0 and penalty_factor > 1, got "
                               f"{penalty_init} and {penalty_factor}")
    double = jnp.result_type(x0, U0, 1.0) == jnp.float64
    if constraint_tol is None:
        constraint_tol = 1e-8 if double else 1e-5
    settings = dict(max_inner=max_inner, max_outer=max_outer, grad_tol=grad_tol,
                    constraint_tol=constraint_tol, penalty_init=penalty_init,
                    penalty_factor=penalty_factor, penalty_max=penalty_max, reg_init=reg_init,
                    reg_min=reg_min, reg_max=reg_max, reg_factor=reg_factor,
                    alpha_min=alpha_min, armijo=armijo)
    # Arrays inside the functions (Equinox modules) are traced; the rest is the static jit key.
    fns_arrays, fns_static = eqx.partition((cost, dynamics, terminal_cost), eqx.is_array)
    return _solve(fns_arrays, x0, U0, X0, settings, fns_static=fns_static, maxiter=int(maxiter))


# ----- the pieces, each testable on its own --------------------------------------------------

def defects(dynamics, x, u) -> jax.Array:
    """The collocation constraints `d_t = x_{t+1} - dynamics(x_t, u_t, t)`, `[T, n]`, of a
    trajectory `x [T+1, n]`, `u [T, m]`; `jnp.abs(defects(...)).max()` is the constraint
    violation (zero for a rollout)."""
    return x[1:] - jax.vmap(dynamics)(x[:-1], u, jnp.arange(u.shape[0]))


def augmented_lagrangian(cost, dynamics, final, x, u, lam, rho) -> jax.Array:
    """`L = J + sum_t lam_t' d_t + rho/2 sum_t |d_t|^2` of `x [T+1, n]`, `u [T, m]`, with
    multipliers `lam [T, n]`, penalty `rho` and final cost `final(x_T)`."""
    d = defects(dynamics, x, u)
    J = jax.vmap(cost)(x[:-1], u, jnp.arange(u.shape[0])).sum() + final(x[-1])
    return J + jnp.sum(lam * d) + 0.5 * rho * jnp.sum(d * d)


class NewtonModel(NamedTuple):
    """`L` with its gradient, and the LQR data of the Newton step (seed 000's symbols), about a
    trajectory `x [T+1, n]`, `u [T, m]`, `z_t = [x_t; u_t]`.

    Attributes:
      value: `L`, scalar.
      g: `grad L` over the stage variables `s_t = (u_t, x_{t+1})`, `[T, m+n]`.
      d: the defects `[T, n]`.
      F: `d dynamics / d z_t`, `[T, n, n+m]`.
      C: `hess_z (cost(x_t, u_t, t) - y_t' dynamics(x_t, u_t, t))`, `[T, n+m, n+m]`.
      c: `grad_z cost(x_t, u_t, t)`, `[T, n+m]`.
      V_T: `hess final(x_T)`, `[n, n]`; v_T: `grad final(x_T)`, `[n]`.
    """

    value: jax.Array
    g: jax.Array
    d: jax.Array
    F: jax.Array
    C: jax.Array
    c: jax.Array
    V_T: jax.Array
    v_T: jax.Array


def newton_model(cost, dynamics, final, x, u, lam, y, rho) -> NewtonModel:
    """`L` (`augmented_lagrangian`), its gradient over the stage variables, and the derivatives
    the Newton step needs (`NewtonModel`). `x [T+1, n]` (`x_0` is fixed, not a variable),
    `u [T, m]`, `lam, y [T, n]`. With `y = lam + rho d` the step is exact Newton on `L`."""
    T, m = u.shape
    n = x.shape[1]
    Z = jnp.concatenate([x[:-1], u], axis=1)
    steps = jnp.arange(T)

    def dynamics_z(z, t):
        return dynamics(z[:n], z[n:], t)

    def cost_z(z, t):
        return cost(z[:n], z[n:], t)

    def curvature(z, t, y_t):
        return cost_z(z, t) - y_t @ dynamics_z(z, t)

    d = x[1:] - jax.vmap(dynamics_z)(Z, steps)
    F = jax.vmap(jax.jacfwd(dynamics_z))(Z, steps)
    c = jax.vmap(jax.grad(cost_z))(Z, steps)
    C = jax.vmap(jax.hessian(curvature))(Z, steps, y)
    v_T, V_T = jax.grad(final)(x[-1]), jax.hessian(final)(x[-1])
    # dL/dz_t = c_t - F_t' p_t and dL/dx_{t+1} gets + p_t, with p_t = lam_t + rho d_t.
    p = lam + rho * d
    G = c - jnp.einsum("tij,ti->tj", F, p)
    g_x = p + jnp.concatenate([G[1:, :n], v_T[None]])
    value = (jax.vmap(cost)(x[:-1], u, steps).sum() + final(x[-1])
             + jnp.sum(lam * d) + 0.5 * rho * jnp.sum(d * d))
    return NewtonModel(value=value, g=jnp.concatenate([G[:, n:], g_x], axis=1), d=d, F=F,
                       C=0.5 * (C + jnp.swapaxes(C, 1, 2)), c=c, V_T=V_T, v_T=v_T)


def newton_direction(model: NewtonModel, lam, rho, mu=0.0):
    """The step `delta = -(H + mu I)^-1 grad L` (module docstring), by a Riccati recursion.

    It minimizes the quadratic model of `L`, which is the LQR problem in the deviations
    `(dx_t, du_t)`, `dx_0 = 0`, with a slack `w_t` on the linearized dynamics,

        minimize   sum_t 1/2 z_t' (C_t + mu I) z_t + c_t' z_t + rho/2 |w_t|^2
                   + 1/2 x_T' (V_T + mu I) x_T + v_T' x_T
        subject to x_{t+1} = F_t z_t + f_t + w_t,    f_t = -(d_t + lam_t / rho),

    (`z_t = [dx_t; du_t]`; `rho/2 |w_t|^2` is the penalty `rho/2 |d_t + A_t delta|^2` with the
    multipliers folded in). Minimizing over `w_t` first turns the value `1/2 x'V x + v'x` of the
    next state into `V^ = V - V P^-1 V`, `v^ = v - V P^-1 v`, `P = rho I + V`, of the predicted
    state `F_t z_t + f_t`; the rest is the LQR recursion of `lqr.py` (`Q, q, K, k, V, v`; the
    value update in the short form `V = Q_xx + Q_xu K`, `v = q_x + Q_xu k`, exact because
    `mu` is part of the cost). `rho` enters only through `P`, whose inverse shrinks `V`, so no
    `rho`-sized number is ever subtracted from a curvature-sized one and the step stays accurate
    for large `rho` in float32 (factoring the Hessian `H` itself would not). The minimizing
    slack gives the multipliers of the linearized constraints, `y_t = rho w_t`.

    Returns `(dS [T, m+n], y [T, n], ok)`: the step over the stage variables `(u_t, x_{t+1})`,
    the multipliers, and whether every `P` and `Q_uu` was positive definite (exactly when
    `H + mu I` is; the step is NaN otherwise).
    """
    n, nm = model.F.shape[1:]
    dtype = model.F.dtype
    eye_n, eye_z = jnp.eye(n, dtype=dtype), jnp.eye(nm, dtype=dtype)
    f = -(model.d + lam / rho)

    def backward(carry, inputs):
        V, v = carry
        F_t, f_t, C_t, c_t = inputs
        P = jnp.linalg.cholesky(rho * eye_n + V)
        PV = jsl.cho_solve((P, True), jnp.concatenate([V, v[:, None]], axis=1))
        V_hat = V - V @ PV[:, :n]
        V_hat = 0.5 * (V_hat + V_hat.T)
        v_hat = v - V @ PV[:, n]
        Q = C_t + mu * eye_z + F_t.T @ V_hat @ F_t
        q = c_t + F_t.T @ (V_hat @ f_t + v_hat)
        Q_xx, Q_xu, Q_ux, Q_uu = Q[:n, :n], Q[:n, n:], Q[n:, :n], Q[n:, n:]
        L = jnp.linalg.cholesky(Q_uu)
        K = -jsl.cho_solve((L, True), Q_ux)
        k = -jsl.cho_solve((L, True), q[n:])
        V_new = Q_xx + Q_xu @ K
        v_new = q[:n] + Q_xu @ k
        ok = jnp.all(jnp.isfinite(P)) & jnp.all(jnp.isfinite(L))
        return (0.5 * (V_new + V_new.T), v_new), (K, k, V, v, P, ok)

    V_T = model.V_T + mu * eye_n
    _, (K, k, V_next, v_next, P, ok) = jax.lax.scan(
        backward, (V_T, model.v_T), (model.F, f, model.C, model.c), reverse=True)

    def forward(x, inputs):
        K_t, k_t, F_t, f_t, V_t, v_t, P_t = inputs
        u = K_t @ x + k_t
        predicted = F_t @ jnp.concatenate([x, u]) + f_t
        w = -jsl.cho_solve((P_t, True), V_t @ predicted + v_t)
        x_next = predicted + w
        return x_next, (u, x_next, rho * w)

    _, (du, dx, y) = jax.lax.scan(forward, jnp.zeros((n,), dtype),
                                  (K, k, model.F, f, V_next, v_next, P))
    return jnp.concatenate([du, dx], axis=1), y, jnp.all(ok)


# ----- the solver ------------------------------------------------------------------------------

class _State(NamedTuple):
    S: jax.Array          # [T, m+n] stage variables (u_t, x_{t+1})
    y: jax.Array          # [T, n] multiplier estimate of the curvature term
    lam: jax.Array        # [T, n] multipliers of L
    rho: jax.Array        # penalty
    omega: jax.Array      # gradient tolerance of the current inner minimization
    eta: jax.Array        # the violation that counts as progress
    mu: jax.Array         # Levenberg-Marquardt damping
    inner: jax.Array      # Newton steps in the current inner minimization
    outer: jax.Array      # outer updates so far
    iteration: jax.Array  # Newton steps in all
    converged: jax.Array
    done: jax.Array
    history: jax.Array


@partial(jax.jit, static_argnames=("fns_static", "maxiter"))
def _solve(fns_arrays, x0, U0, X0, settings, *, fns_static, maxiter):
    user_cost, user_dynamics, terminal_cost = eqx.combine(fns_arrays, fns_static)
    dtype = jnp.result_type(x0, U0, 1.0)
    x0 = jnp.asarray(x0, dtype)
    U0 = jnp.asarray(U0, dtype)
    T, m = U0.shape
    n = x0.shape[0]
    check_problem(user_cost, user_dynamics, terminal_cost, x0, U0, "collocation")
    s = {name: jnp.asarray(value, dtype) for name, value in settings.items()}
    max_inner = jnp.asarray(settings["max_inner"], jnp.int32)
    max_outer = jnp.asarray(settings["max_outer"], jnp.int32)
    roundoff = 100 * jnp.finfo(dtype).eps

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

    def direction(model, st):
        """The Newton step, raising `mu` until `H + mu I` is positive definite (each try is
        one Riccati recursion on the same model, much cheaper than a step)."""
        def attempt(mu):
            delta, y, ok = newton_direction(model, st.lam, st.rho, mu)
            return mu, delta, y, ok & (jnp.sum(model.g * delta) < 0)

        def indefinite(carry):
            mu, *_, ok = carry
            return ~ok & (mu <= s["reg_max"])

        def damp_more(carry):
            return attempt(jnp.maximum(carry[0] * s["reg_factor"], s["reg_min"]))

        return jax.lax.while_loop(indefinite, damp_more, attempt(st.mu))

    def newton_step(st: _State, model, delta, y_step, mu):
        """Backtracking line search on `L` along `delta`; move `y` along with `S`."""
        slope = jnp.sum(model.g * delta)

        def searching(carry):
            alpha, accepted = carry
            return ~accepted & (alpha >= s["alpha_min"])

        def attempt(carry):
            alpha = carry[0]
            value = augmented_lagrangian(cost, dynamics, final, *unpack(st.S + alpha * delta),
                                         st.lam, st.rho)
            accepted = value <= model.value + s["armijo"] * alpha * slope  # False for NaN
            return jnp.where(accepted, alpha, 0.5 * alpha), accepted

        alpha, accepted = jax.lax.while_loop(searching, attempt,
                                             (jnp.ones((), dtype), jnp.zeros((), bool)))
        alpha = jnp.where(accepted, alpha, 0.0)
        S = st.S + alpha * delta
        y = st.y + alpha * (y_step - st.y)
        mu_down = mu / s["reg_factor"]
        mu = jnp.where(accepted, jnp.where(mu_down < s["reg_min"], 0.0, mu_down),
                       jnp.maximum(mu * s["reg_factor"], s["reg_min"]))
        return st._replace(S=S, y=y, mu=mu, inner=st.inner + 1, iteration=st.iteration + 1,
                           history=st.history.at[st.iteration].set(objective(S)))

    def outer_update(st: _State, model, converged, stuck):
        """Nocedal & Wright, Algorithm 17.4, after an inner minimization."""
        violation = jnp.max(jnp.abs(model.d))
        progress = violation <= st.eta
        rho = jnp.where(progress, st.rho, jnp.minimum(st.rho * s["penalty_factor"],
                                                      s["penalty_max"]))
        # At the penalty's ceiling the multipliers are the only lever left.
        lam = jnp.where(progress | (st.rho >= s["penalty_max"]), st.lam + st.rho * model.d,
                        st.lam)
        eta = jnp.where(progress, st.eta / st.rho ** 0.9, rho ** -0.1)
        omega = jnp.where(progress, st.omega / st.rho, 1 / rho)
        return st._replace(lam=lam, rho=rho, omega=omega,
                           eta=jnp.maximum(eta, s["constraint_tol"]),
                           inner=jnp.zeros_like(st.inner),
                           # A new `L` next: let the damping start low again.
                           mu=jnp.minimum(st.mu, s["reg_max"] / s["reg_factor"]),
                           outer=st.outer + 1, converged=converged,
                           done=converged | stuck | (st.outer + 1 >= max_outer))

    def tick(st: _State) -> _State:
        """One Newton step on `L`, or, when the inner minimization is over, one outer update."""
        model = newton_model(cost, dynamics, final, *unpack(st.S), st.lam, st.y, st.rho)
        mu, delta, y_step, ok = direction(model, st)
        grad_norm = jnp.linalg.norm(model.g)
        at_roundoff = ok & (-jnp.sum(model.g * delta) <= roundoff * (1 + jnp.abs(model.value)))
        solved = (grad_norm <= jnp.maximum(st.omega, s["grad_tol"])) | at_roundoff
        converged = ((jnp.max(jnp.abs(model.d)) <= s["constraint_tol"])
                     & ((grad_norm <= s["grad_tol"]) | at_roundoff))
        return jax.lax.cond(solved | ~ok | (st.inner >= max_inner),
                            lambda: outer_update(st, model, converged, ~ok),
                            lambda: newton_step(st, model, delta, y_step, mu))

    X_guess = jnp.broadcast_to(x0, (T + 1, n)) if X0 is None else jnp.asarray(X0, dtype)
    rho0 = s["penalty_init"]
    zero = jnp.zeros((), jnp.int32)
    init = _State(S=jnp.concatenate([U0, X_guess[1:]], axis=1), y=jnp.zeros((T, n), dtype),
                  lam=jnp.zeros((T, n), dtype), rho=rho0, omega=1 / rho0, eta=rho0 ** -0.1,
                  mu=s["reg_init"], inner=zero, outer=zero, iteration=zero,
                  converged=jnp.zeros((), bool), done=jnp.zeros((), bool),
                  history=jnp.zeros((maxiter,), dtype))
    out = jax.lax.while_loop(lambda st: ~st.done & (st.iteration < maxiter), tick, init)

    J = objective(out.S)
    history = jnp.where(jnp.arange(maxiter) < out.iteration, out.history, J)
    return Solution(x=unpack(out.S)[0], u=out.S[:, :m], cost=J, iterations=out.iteration,
                    converged=out.converged, history=history)

