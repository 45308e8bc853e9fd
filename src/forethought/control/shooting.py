"""Sampling-based planners: random shooting, the cross-entropy method (CEM) and MPPI.

Seed 000, "Stochastic Optimization Methods", and seed 002, section 5.1. Open-loop planning
chooses the action sequence `A = (u_0, ..., u_{T-1})` minimising `J(A)`, the cost of rolling
`A` out through `dynamics` from `x0` (we minimise cost; the notes maximise reward = -cost):

- **random shooting** samples `A_1, ..., A_N` once and keeps `argmin_i J(A_i)`;
- **CEM** samples `A_i ~ p(A)`, evaluates `J(A_i)`, picks the `M` elites with the lowest cost,
  refits `p(A)` (a diagonal Gaussian) to them, and repeats; it returns the *mean* of the final
  elites, not the best sample (the best of a finite sample overfits its noise);
- **MPPI** (Williams et al. 2017) replaces the hard elite cut by softmax weights
  `w_i ∝ exp(-J(A_i) / lambda)` and returns the weighted mean.

All three share trajax's contract, `planner(cost, dynamics, x0, U0, key, *, lower, upper,
terminal_cost=None, ...) -> Solution`, with `cost(x, u, t) -> scalar`, `dynamics(x, u, t) ->
x_next`, `x0: [n]`, `U0: [T, m]` (the initial mean, e.g. a shifted previous plan) and action bounds
`lower, upper: [m]` or scalars. The objective is

    J(U) = sum_{t<T} cost(x_t, u_t, t) + final,   final = terminal_cost(x_T) if given,
                                                   else cost(x_T, 0, T)  (trajax's convention).

Every candidate is evaluated by `rollout_costs`: one `vmap` over the population of a `lax.scan`
rollout, with the sampling noise drawn before it. The planners are jit-compiled whole (the
iterations are a `lax.scan`), `vmap`-able over `x0`, and keep the dtype of `U0` (float32 or
float64).

Extension point for learned models: the optimisers themselves (`shooting_search`, `cem_search`,
`mppi_search`) only see `evaluate(U_batch [N, T, m], key) -> costs [N]`. A model-based agent with
a stochastic model (an ensemble sampling per particle) builds its own `evaluate`, e.g. from
`rollout_costs(..., keys=...)` where `dynamics(x, u, t, key)` takes a per-step key, averaged
over particles, and calls the search directly.
"""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from forethought.control.solution import Solution, trajax_objective
from forethought.errors import ForethoughtError, check_int

Evaluate = Callable[[jax.Array, jax.Array], jax.Array]
"""`evaluate(U_batch [N, T, m], key) -> costs [N]`: what the searches minimise."""


# ----- rollouts ------------------------------------------------------------------------------

def rollout(dynamics, x0, U, keys=None) -> jax.Array:
    """States `X: [T+1, n]` (`X[0] = x0`) of `U: [T, m]` applied open loop from `x0: [n]`.

    With `keys` (`[T]` PRNG keys), `dynamics(x, u, t, key)` is called instead, for stochastic
    models; the keys are drawn by the caller, before the scan.
    """
    def step(x, inputs):
        t, u, key = inputs
        x_next = dynamics(x, u, t) if keys is None else dynamics(x, u, t, key)
        return x_next, x_next

    T = U.shape[0]
    _, X = jax.lax.scan(step, x0, (jnp.arange(T), U, keys))
    return jnp.concatenate([x0[None], X])


def rollout_costs(cost, dynamics, x0, U_batch, terminal_cost=None, keys=None,
                  is_terminal=None, end_probability=None) -> jax.Array:
    """The objective `J` (see the module docstring) of each plan in `U_batch: [N, T, m]`
    from `x0: [n]` -> `[N]`.

    One `vmap` over the batch of one `lax.scan` over time that emits stage costs, so the
    `[N, T+1, n]` states are never stored. With `keys` (`[N, T]` PRNG keys), `dynamics(x, u, t,
    key)` is called instead (stochastic models). Model-based agents reuse this to score a
    population through a learned model.

    With `is_terminal(x) -> bool`, a rollout that reaches a terminal state stops accruing cost
    there (the episode would have ended): stage costs after it and the final term count zero.
    `is_terminal` and `cost` may also return arrays of one shape (e.g. `[P]` over particles);
    the accrued costs are then averaged.

    With `end_probability(x) -> p` instead (a learned end test), the rollout ends on reaching `x`
    with probability `p`: each stage cost, and the final term, is weighted by the probability of
    still being alive, so `J` is the expected accrued cost. Unlike a thresholded test this ranks
    plans that all survive the horizon by how close they come to ending.
    """
    if is_terminal is not None and end_probability is not None:
        raise ForethoughtError("rollout_costs: give is_terminal or end_probability, not both")
    T = U_batch.shape[1]

    def objective(U, keys_i):
        def step(carry, inputs):
            x, alive = carry
            t, u, key = inputs
            x_next = dynamics(x, u, t) if keys_i is None else dynamics(x, u, t, key)
            c = cost(x, u, t)
            if end_probability is not None:
                return (x_next, alive * (1.0 - end_probability(x_next))), alive * c
            if is_terminal is None:
                return (x_next, alive), c
            return (x_next, alive & ~is_terminal(x_next)), jnp.where(alive, c, 0.0)

        if end_probability is not None:
            alive0 = jnp.ones(jnp.shape(end_probability(x0)), jnp.result_type(float))
        else:
            alive0 = True if is_terminal is None else jnp.ones(jnp.shape(is_terminal(x0)), bool)
        (xT, alive), stage = jax.lax.scan(step, (x0, alive0), (jnp.arange(T), U, keys_i))
        final = cost(xT, jnp.zeros_like(U[0]), T) if terminal_cost is None else terminal_cost(xT)
        if end_probability is not None:
            final = alive * final
        elif is_terminal is not None:
            final = jnp.where(alive, final, 0.0)
        return jnp.mean(stage.sum(0) + final)

    return jax.vmap(objective)(U_batch, keys)


def colored_noise(key, shape, beta, dtype=None) -> jax.Array:
    """Standard Gaussian noise of `shape = (..., T, m)` whose power spectrum along the time axis
    `T` falls as `1 / f**beta` (iCEM, Pinneri et al. 2020): `beta = 0` is white noise, `beta = 2`
    a random-walk-like signal whose samples flip whole stretches of a plan at once, which lets a
    warm-started planner leave a plan it has locked onto. Each entry has unit variance.
    """
    dtype = dtype or jnp.result_type(float)
    if beta == 0:
        return _normal(key, shape, dtype)
    T = shape[-2]
    f = jnp.fft.rfftfreq(T)
    # Frequencies below 1/T are not resolvable over the horizon; clamp them (as iCEM does).
    scale = (jnp.maximum(f, 1.0 / T) ** (-beta / 2))[:, None]
    spectrum_shape = shape[:-2] + (f.shape[0], shape[-1])
    k_re, k_im = jax.random.split(key)
    re = _normal(k_re, spectrum_shape) * scale
    im = _normal(k_im, spectrum_shape) * scale
    # The DC term, and the Nyquist term for even T, are real; each other term enters the signal
    # twice (as itself and its conjugate), so Var(x_t) = (s_0^2 + 4 sum s_k^2 + s_nyq^2) / T^2.
    real_only = jnp.zeros(f.shape[0], bool).at[0].set(True)
    if T % 2 == 0:
        real_only = real_only.at[-1].set(True)
    im = jnp.where(real_only[:, None], 0, im)
    variance = jnp.sum(jnp.where(real_only, 1.0, 4.0) * scale[:, 0] ** 2) / T**2
    signal = jnp.fft.irfft(re + 1j * im, n=T, axis=-2)
    return (signal / jnp.sqrt(variance)).astype(dtype)


def _normal(key, shape, dtype=None):
    # Drawn flat and reshaped: on XLA's CPU backend, threefry over a multi-dimensional shape
    # such as (500, 30, 1) took 5-10x longer to compile (1-2 s) than over the flat one.
    dtype = dtype or jnp.result_type(float)
    return jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape)


def _rank_costs(costs):
    """NaN (a diverged rollout) ranks last instead of poisoning the refit."""
    return jnp.where(jnp.isnan(costs), jnp.inf, costs)


# ----- the three searches over an `evaluate` ------------------------------------------------

def shooting_search(evaluate: Evaluate, U0, key, lower, upper, *, population: int, init_std=None,
                    noise_beta=0.0):
    """Random shooting: `population - 1` random plans plus `clip(U0)`; keep the cheapest.

    Candidates are uniform in `[lower, upper]` when `init_std` is None, else `U0 + init_std *
    N(0, 1)` clipped to the bounds. `U0` itself is candidate 0, so a warm-started MPC never does
    worse than its shifted plan. Returns `(U [T, m], costs of the kept plan [1])`.
    """
    shape = (population - 1,) + U0.shape
    if init_std is None:
        unit = jax.random.uniform(key, (int(np.prod(shape)),), U0.dtype).reshape(shape)
        samples = lower + (upper - lower) * unit
    else:
        samples = jnp.clip(U0 + init_std * colored_noise(key, shape, noise_beta, U0.dtype),
                           lower, upper)
    candidates = jnp.concatenate([jnp.clip(U0, lower, upper)[None], samples])
    costs = _rank_costs(evaluate(candidates, jax.random.fold_in(key, 1)))
    best = jnp.argmin(costs)
    return candidates[best], costs[best][None]


def cem_search(evaluate: Evaluate, U0, key, lower, upper, *, population: int, elites: int,
               iterations: int, alpha, init_std, noise_beta=0.0):
    """CEM over a diagonal Gaussian `N(mu, sigma^2)` on plans `[T, m]`, starting at `mu = U0`.

    Each iteration samples `population` plans, clips them to the bounds, picks the `elites`
    cheapest and refits `mu, sigma` to them, smoothed: `mu <- alpha mu + (1 - alpha) mean(elites)`
    (likewise `sigma`). Returns `(mean of the last iteration's elites [T, m], history
    [iterations])`, where `history[i]` is the mean elite cost of iteration `i`.
    """
    noise = colored_noise(key, (iterations, population) + U0.shape, noise_beta, U0.dtype)
    eval_keys = jax.random.split(jax.random.fold_in(key, 1), iterations)
    sigma0 = jnp.broadcast_to(jnp.asarray(init_std, U0.dtype), U0.shape)

    def iteration(carry, inputs):
        mu, sigma, _ = carry
        eps, eval_key = inputs
        samples = jnp.clip(mu + sigma * eps, lower, upper)
        costs = _rank_costs(evaluate(samples, eval_key))
        _, best = jax.lax.top_k(-costs, elites)
        elite = samples[best]
        elite_mean, elite_std = elite.mean(0), elite.std(0)
        mu = alpha * mu + (1 - alpha) * elite_mean
        sigma = alpha * sigma + (1 - alpha) * elite_std
        return (mu, sigma, elite_mean), costs[best].mean()

    mu0 = jnp.clip(U0, lower, upper)
    (_, _, elite_mean), history = jax.lax.scan(iteration, (mu0, sigma0, mu0), (noise, eval_keys))
    return elite_mean, history


def mppi_search(evaluate: Evaluate, U0, key, lower, upper, *, population: int, iterations: int,
                lambda_, noise_std, noise_beta=0.0):
    """MPPI: sample `U0 + noise_std * N(0, 1)` (clipped), weight each plan by
    `exp(-(J_i - min J) / lambda_)` and move the mean to the weighted mean; repeat.

    The mean itself is candidate 0 of every iteration. The information-theoretic control-cost
    term of Williams et al. is left out (it vanishes for `lambda_ -> 0` and is usually
    folded into the action cost). Returns `(U [T, m], history [iterations])`, where
    `history[i]` is the softmax-weighted cost of iteration `i`.
    """
    noise = noise_std * colored_noise(key, (iterations, population - 1) + U0.shape, noise_beta,
                                      U0.dtype)
    eval_keys = jax.random.split(jax.random.fold_in(key, 1), iterations)

    def iteration(mu, inputs):
        eps, eval_key = inputs
        samples = jnp.concatenate([mu[None], jnp.clip(mu + eps, lower, upper)])
        costs = _rank_costs(evaluate(samples, eval_key))
        weights = jax.nn.softmax(-(costs - costs.min()) / lambda_)
        mu = jnp.einsum("i,itm->tm", weights, samples)
        return mu, jnp.sum(weights * jnp.where(jnp.isinf(costs), 0, costs))

    mu, history = jax.lax.scan(iteration, jnp.clip(U0, lower, upper), (noise, eval_keys))
    return mu, history


# ----- the planners -------------------------------------------------------------------------

def random_shooting(cost, dynamics, x0, U0, key, *, lower, upper, terminal_cost=None,
                    population: int = 1000, init_std=None, noise_beta: float = 0.0) -> Solution:
    """Random shooting (seed 000): evaluate `population` plans, return the cheapest.

    Args:
      cost, dynamics, x0: [n], U0: [T, m], key, lower, upper, terminal_cost: see the module
        docstring. `U0` (clipped to the bounds) is always one of the candidates.
      population: plans evaluated, `U0` included.
      init_std: None samples uniformly in `[lower, upper]` (bounds must be finite); a scalar,
        `[m]` or `[T, m]` samples `U0 + init_std * noise` clipped to the bounds.
      noise_beta: colour of that Gaussian noise along time (see `colored_noise`; 0 is white).

    Returns:
      `Solution` with the best plan `u`, its states `x`, its objective `cost`, `iterations = 1`,
      `converged = False`, `history = [cost]`.
    """
    lower, upper = _check("random_shooting", x0, U0, lower, upper, init_std,
                          need_finite=init_std is None)
    check_int(population, "population", where="random_shooting", minimum=2)
    knobs = dict(population=population, init_std=init_std, noise_beta=noise_beta)
    return _plan(shooting_search, cost, dynamics, x0, U0, key, lower, upper, terminal_cost, knobs)


def cem(cost, dynamics, x0, U0, key, *, lower, upper, terminal_cost=None, population: int = 500,
        elite_fraction: float = 0.1, iterations: int = 5, alpha: float = 0.1, init_std=None,
        noise_beta: float = 0.0) -> Solution:
    """Cross-entropy method (seed 000; seed 002 section 5.1): sample, evaluate, refit to elites.

    Args:
      cost, dynamics, x0: [n], U0: [T, m], key, lower, upper, terminal_cost: see the module
        docstring. `U0` is the initial mean (warm start); the std restarts at `init_std`.
      population: plans sampled per iteration (N).
      elite_fraction: fraction of the population kept as elites (M = max(1, round(N * f))).
      iterations: refits; a fixed budget (no early stop), so the solver is one compiled scan.
      alpha: smoothing, the weight of the previous mean and std in each refit (0: no smoothing).
      init_std: initial standard deviation, scalar, `[m]` or `[T, m]`; None means
        `(upper - lower) / 4` (bounds must then be finite).
      noise_beta: colour of the sampling noise along time (see `colored_noise`): 0 is the
        classic white-noise CEM, about 2 is iCEM's choice, which a warm-started MPC needs on
        swing-ups to switch the direction of a whole stretch of its plan.

    Returns:
      `Solution` whose `u` is the mean of the final iteration's elites (inside the bounds, since
      samples are clipped to them), `x` its rollout, `cost` its objective, `iterations`,
      `converged = False`, and `history[i]` the mean elite cost of iteration `i`.
    """
    lower, upper = _check("cem", x0, U0, lower, upper, init_std, need_finite=init_std is None)
    check_int(population, "population", where="cem", minimum=1)
    check_int(iterations, "iterations", where="cem", minimum=1)
    if not 0 < elite_fraction <= 1:
        raise ForethoughtError(f"cem: elite_fraction must be in (0, 1], got {elite_fraction}")
    if isinstance(alpha, (int, float)) and not 0 <= alpha < 1:
        raise ForethoughtError(f"cem: alpha must be in [0, 1), got {alpha}")
    knobs = dict(population=population, elites=max(1, int(round(population * elite_fraction))),
                 iterations=iterations, alpha=alpha, noise_beta=noise_beta,
                 init_std=_default_std(init_std, lower, upper))
    return _plan(cem_search, cost, dynamics, x0, U0, key, lower, upper, terminal_cost, knobs)


def mppi(cost, dynamics, x0, U0, key, *, lower, upper, terminal_cost=None, population: int = 500,
         iterations: int = 1, lambda_: float = 1.0, noise_std=None,
         noise_beta: float = 0.0) -> Solution:
    """Model predictive path integral control: a softmax-weighted average of sampled plans.

    Args:
      cost, dynamics, x0: [n], U0: [T, m], key, lower, upper, terminal_cost: see the module
        docstring. `U0` is the initial mean (warm start).
      population: plans per iteration, the current mean included.
      iterations: reweighting rounds (1 is the usual choice inside MPC).
      lambda_: temperature, in units of cost: small is greedy (-> the best sample), large
        averages everything (-> the mean).
      noise_std: sampling standard deviation, scalar, `[m]` or `[T, m]`; None means
        `(upper - lower) / 4` (bounds must then be finite).
      noise_beta: colour of the sampling noise along time (see `colored_noise`; 0 is white).

    Returns:
      `Solution` with the weighted mean plan `u`, its rollout `x` and objective `cost`,
      `iterations`, `converged = False`, and `history[i]` the weighted cost of iteration `i`.
    """
    lower, upper = _check("mppi", x0, U0, lower, upper, noise_std, need_finite=noise_std is None,
                          std_name="noise_std")
    check_int(population, "population", where="mppi", minimum=2)
    check_int(iterations, "iterations", where="mppi", minimum=1)
    if isinstance(lambda_, (int, float)) and not lambda_ > 0:
        raise ForethoughtError(f"mppi: lambda_ must be > 0, got {lambda_}")
    knobs = dict(population=population, iterations=iterations, lambda_=lambda_,
                 noise_beta=noise_beta, noise_std=_default_std(noise_std, lower, upper))
    return _plan(mppi_search, cost, dynamics, x0, U0, key, lower, upper, terminal_cost, knobs)


def _plan(search, cost, dynamics, x0, U0, key, lower, upper, terminal_cost, knobs) -> Solution:
    where = {shooting_search: "random_shooting", cem_search: "cem", mppi_search: "mppi"}[search]
    check_model(where, cost, dynamics, x0, U0)
    return _plan_jit(search, cost, dynamics, x0, U0, key, lower, upper, terminal_cost, knobs)


def check_model(where: str, cost, dynamics, x0, U0) -> None:
    """Raise a `ForethoughtError` unless `dynamics(x0, U0[0], 0)` has `x0`'s shape and
    `cost(x0, U0[0], 0)` is a scalar (checked on shapes only: nothing is computed)."""
    x0, u0 = jnp.asarray(x0), jnp.asarray(U0)[0]
    try:
        x_next = jax.eval_shape(dynamics, x0, u0, 0)
        c = jax.eval_shape(cost, x0, u0, 0)
    except Exception as error:  # the usual cause: U0's action size is not the dynamics'
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ForethoughtError(f"{where}: dynamics(x, u, t) and cost(x, u, t) must accept x0 of shape "
                               f"{tuple(x0.shape)} and a row of U0 of shape {tuple(u0.shape)}; calling them "
                               f"failed ({type(error).__name__}: {detail})") from None
    if getattr(x_next, "shape", None) != x0.shape:
        raise ForethoughtError(f"{where}: dynamics must return the next state with x0's shape {tuple(x0.shape)}, "
                               f"got {getattr(x_next, 'shape', type(x_next).__name__)}")
    if getattr(c, "shape", None) != ():
        raise ForethoughtError(f"{where}: cost must return a scalar, got shape {getattr(c, 'shape', None)}")


@eqx.filter_jit
def _plan_jit(search, cost, dynamics, x0, U0, key, lower, upper, terminal_cost, knobs) -> Solution:
    """Run `search` on the rollout objective and wrap its plan in a `Solution`.

    `eqx.filter_jit` traces every array (also those inside `cost` and `dynamics`, such as a
    system's or a model's parameters) and keeps Python values static, so a new model or system
    with the same shapes reuses the compiled program.
    """
    def evaluate(U_batch, key):
        return rollout_costs(cost, dynamics, x0, U_batch, terminal_cost)

    U, history = search(evaluate, U0, key, lower, upper, **knobs)
    X = rollout(dynamics, x0, U)
    return Solution(x=X, u=U, cost=trajax_objective(cost, X, U, terminal_cost),
                    iterations=jnp.asarray(history.shape[0], jnp.int32),
                    converged=jnp.zeros((), bool), history=history)


def _default_std(std, lower, upper):
    """A quarter of the action range (mbrl-lib's CEM default) unless given."""
    return (upper - lower) / 4 if std is None else jnp.asarray(std, lower.dtype)


# ----- argument checks (at the boundary, before tracing) ------------------------------------

def _is_concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


def check_bounds(lower, upper, m: int, *, where: str, need_finite: bool = False):
    """`lower, upper` as arrays of shape `[m]` (scalars are broadcast); raise a
    `ForethoughtError` naming the argument if a shape is wrong or, where the values are known
    (not traced), if `lower > upper` or a needed bound is infinite."""
    out = []
    for name, value in (("lower", lower), ("upper", upper)):
        shape = tuple(np.shape(value))
        if shape not in ((), (m,)):
            raise ForethoughtError(f"{where}: {name} must be a scalar or have shape ({m},) "
                                   f"(the action dimension), got shape {shape}")
        value = jnp.broadcast_to(jnp.asarray(value), (m,))
        if not jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(jnp.result_type(float))
        out.append(value)
    lower, upper = out
    if _is_concrete(lower) and _is_concrete(upper):
        lo, hi = np.asarray(lower), np.asarray(upper)
        if np.any(np.isnan(lo)) or np.any(np.isnan(hi)):
            raise ForethoughtError(f"{where}: lower and upper must not be NaN, got "
                                   f"lower={lo.tolist()}, upper={hi.tolist()}")
        if np.any(lo > hi):
            raise ForethoughtError(f"{where}: lower must be <= upper elementwise, got "
                                   f"lower={lo.tolist()}, upper={hi.tolist()}")
        if need_finite and not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            raise ForethoughtError(f"{where}: lower and upper must be finite to sample between "
                                   f"them (or pass a sampling std), got lower={lo.tolist()}, "
                                   f"upper={hi.tolist()}")
    return lower, upper


def _check(where, x0, U0, lower, upper, std, *, need_finite, std_name="init_std"):
    if np.ndim(x0) != 1:
        raise ForethoughtError(f"{where}: x0 must have shape (n,), got {tuple(np.shape(x0))}")
    if np.ndim(U0) != 2:
        raise ForethoughtError(f"{where}: U0 must have shape (T, m), got {tuple(np.shape(U0))}")
    if not jnp.issubdtype(jnp.result_type(U0), jnp.floating):
        raise ForethoughtError(f"{where}: U0 must be a floating-point array, got dtype "
                               f"{jnp.result_type(U0)}")
    T, m = np.shape(U0)
    if std is not None and tuple(np.shape(std)) not in ((), (m,), (T, m)):
        raise ForethoughtError(f"{where}: {std_name} must be a scalar or have shape ({m},) or "
                               f"({T}, {m}), got shape {tuple(np.shape(std))}")
    lower, upper = check_bounds(lower, upper, m, where=where, need_finite=need_finite)
    dtype = jnp.result_type(U0)
    return lower.astype(dtype), upper.astype(dtype)


