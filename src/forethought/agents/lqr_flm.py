"""LQR-FLM: LQR with fitted local models (seed 000, "Local Models"; Levine and Abbeel 2014).

    forethought run lqr-flm --env pendulum
    forethought run lqr-flm --env cartpole            # swing-up from the resting start
    forethought run lqr-flm --env pendulum --prior none   # plain linear regression

Each iteration:

    1. run `rollouts` episodes of the linear-Gaussian controller
       `p(u_t | x_t) = N(K_t x_t + k_t, Sigma_t)` from the system's start state
    2. fit time-varying linear-Gaussian dynamics `N(A_t x_t + B_t u_t + c_t, N_t)` to the last
       `fit_rollouts` rollouts, these among them (`models/linear_gaussian.py`): Bayesian linear
       regression with a GMM prior fit to the last `prior_rollouts` rollouts (GPS's
       `DynamicsPriorGMM`), its dynamics placed on the data's own spread (`local_prior`), or
       plain linear regression
    3. expand the (known) cost to second order about the rollouts and solve for the controller
       that minimises the expected cost under the fitted dynamics subject to
       `D_KL(p(tau) || p_old(tau)) <= epsilon` (`control/kl_lqr.py`); the new covariance is
       `Sigma_t = Q_uu^-1`
    4. adapt `epsilon = kl_step * T * multiplier` by comparing the improvement the update
       predicted with the one the new rollouts show (GPS's step-size rule).

Why the fit uses the recent window and the local prior (measured on the cart-pole swing-up,
`bench lqr_flm`): with the dynamics replaced by the true Jacobians at the rollouts, the same
update, step rule and noise reach iLQR's cost on 5 of 5 seeds; with GPS's fit (this iteration's 5
rollouts, GMM prior as it is) 2 of 5 stall 10-33% above it. The fit was the fault. Five rollouts
cannot identify `[A_t B_t]` (`n + m + 1 = 6` unknowns per row), and the GMM prior that fills in
is a cluster's secant over a region far wider than the rollouts, whose covariance outweighs
theirs once the controller's noise has shrunk: by iteration 20 the fitted `[A_t B_t]` is off by a
median 53% (relative Frobenius error against the true Jacobians, seed 1). The last 20 rollouts
(the KL bound keeps recent controllers close) with the prior on their own spread are off by 8%.
The defaults fit the last two iterations (`fit_rollouts = prior_rollouts = 10`).

The cost is the system's own, known to the agent, as in GPS (only the dynamics are learned).
With `cost="quadratic"` a system that has a quadratic variant uses it (the cart-pole's
`cost_kind="quadratic"`: the saturating cost has no curvature to start an LQR from the hanging
pole), and the env's system is switched to it so that returns and costs agree.

Torque limits: with `squash=True` the controller acts in an unbounded `v` and the env receives
`u = u_max tanh(v / u_max)`, which is `v` near zero and never exceeds the bounds; dynamics are fit
and the cost expanded in `v`. The reference, logged as `ilqr_cost` on every row, is iLQR on the
true model of the same squashed problem from the same start, from zero controls: what a perfect
model would give the same local method. iLQR is local too, and `ilqr_best_cost` is the cheapest of
`reference_starts` iLQR runs (zero controls and random ones, `reference_solution`): on the
pendulum and the cart-pole swing-up it is 27% and 14% cheaper (258 and 146 against 355 and 169),
a better local optimum that LQR-FLM, started from zero-mean noise as iLQR is from zero controls,
does not find.

Every row logs the cost of the controller's mean run on the true system from the start state
(`cost`, what is compared with iLQR), and the mean return of the noisy rollouts (`return`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Literal

import equinox as eqx
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np

from forethought.agents.base import EpisodeClock, MemoryRun, RunLike, episode_key, episode_seed
from forethought.control.ilqr import ilqr
from forethought.control.kl_lqr import (LinearGaussianController, initial_distribution, kl_update,
                                        marginals, expected_cost, quadratize_cost, step_multiplier)
from forethought.errors import ForethoughtError
from forethought.models.linear_gaussian import fit_dynamics_gmm, fit_linear_gaussian, gmm_prior, local_prior
from forethought.systems.base import System
from forethought.systems.gym import system_of


FIGURES = [{
    "name": "cost_vs_ilqr.png", "title": "LQR-FLM against iLQR with the true model", "ylabel": "cost",
    "lines": [("cost", "LQR-FLM (mean of the iteration's rollouts)", "C0-"),
              ("ilqr_cost", "iLQR, true model, from zero controls", "k--"),
              ("ilqr_best_cost", "iLQR, true model, best of several starts", "k:")]}]
"""The run folder's own figures (drawn by the CLI with `experiment.plot.metric_figure`)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """LQR-FLM: linear-Gaussian controllers improved by LQR on fitted local models under a KL bound."""

    episodes: int = 20
    """Iterations (each runs `rollouts` episodes, fits the dynamics and updates the controller)."""
    rollouts: int = 5
    """Episodes per iteration."""
    kl_step: float = 0.1
    """KL bound per iteration in nats per time step (times T and the adaptive multiplier). GPS
    uses 0.2; on the cart-pole swing-up 0.1 kept 9 of 10 seeds (0-9) within 5% of iLQR after 20
    iterations against 6 of 10 at 0.2 (`bench lqr_flm`): the smaller first steps keep the early
    controllers where the fitted models hold, and the multiplier grows the step when they do."""
    min_multiplier: float = 0.1
    """Smallest KL step multiplier."""
    max_multiplier: float = 20.0
    """Largest KL step multiplier (GPS: 10; with the recent-window fit the predictions hold and 10
    bound the cart-pole's late steps)."""
    prior: Literal["gmm", "none"] = "gmm"
    """Dynamics fit: Bayesian linear regression with a GMM prior, or plain linear regression."""
    prior_rollouts: int = 10
    """Most recent rollouts the GMM prior is fit to (GPS: 20)."""
    fit_rollouts: int = 10
    """Most recent rollouts the dynamics are fit to, this iteration's among them (`rollouts`: the
    new ones alone, as GPS does)."""
    prior_strength: float = 1.0
    """Weight of the prior, in rollouts."""
    local_prior: bool = True
    """Place the GMM prior's dynamics on the fitted rollouts' own spread
    (`models.linear_gaussian.local_prior`); False: GPS's prior as it is."""
    prior_spread: float = 0.1
    """`local_prior`'s `spread`: fraction of the step-averaged spread added at each step."""
    init_std: float = 0.2
    """Action noise of the first controller, as a fraction of the action bound."""
    squash: bool = True
    """Act through `u = u_max tanh(v / u_max)` so actions stay within bounds."""
    cost: Literal["quadratic", "system"] = "quadratic"
    """The system's quadratic cost variant where it has one (cart-pole), or its cost as it is."""
    reference: bool = True
    """Solve the true-model problem with iLQR and log its costs beside the agent's."""
    reference_starts: int = 16
    """iLQR runs for `ilqr_best_cost` (zero controls and random ones; the first is `ilqr_cost`)."""

    def __post_init__(self):
        for name, minimum in {"episodes": 1, "rollouts": 1, "prior_rollouts": 1, "fit_rollouts": 1,
                              "reference_starts": 1}.items():
            if getattr(self, name) < minimum:
                raise ForethoughtError(f"{name} must be >= {minimum}, got {getattr(self, name)}")
        for name in ("kl_step", "min_multiplier", "max_multiplier", "prior_strength", "init_std"):
            if not getattr(self, name) > 0:
                raise ForethoughtError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (np.isfinite(self.prior_spread) and self.prior_spread >= 0):
            raise ForethoughtError(f"prior_spread must be >= 0, got {self.prior_spread}")
        if self.min_multiplier > self.max_multiplier:
            raise ForethoughtError(f"min_multiplier ({self.min_multiplier}) must be <= max_multiplier "
                                   f"({self.max_multiplier})")
        if self.prior not in ("gmm", "none"):
            raise ForethoughtError(f"prior must be 'gmm' or 'none', got {self.prior!r}")
        if self.prior == "none" and self.rollouts < 2:
            raise ForethoughtError(f"prior='none' (linear regression) needs rollouts >= 2, got {self.rollouts}")
        if self.cost not in ("quadratic", "system"):
            raise ForethoughtError(f"cost must be 'quadratic' or 'system', got {self.cost!r}")


@dataclasses.dataclass(frozen=True)
class Result:
    returns: list[float]
    costs: list[float]
    """Cost of the controller's mean run on the true system after each iteration."""
    reference_cost: float | None
    """iLQR's cost on the true model from zero controls (None with `reference=False`)."""
    best_reference_cost: float | None
    """The cheapest of `reference_starts` iLQR runs (None with `reference=False`)."""
    env_steps: int
    controller: LinearGaussianController
    policy: Callable[[np.ndarray, int], np.ndarray]
    """`policy(observation, t) -> action`: the controller's mean, squashed to the bounds."""


class Problem:
    """The system, its start state, and the cost and dynamics in the controller's action `v`."""

    def __init__(self, config: Config, env: gymnasium.Env, agent: str = "LQR-FLM"):
        system = system_of(env)
        if system is None or not isinstance(system, System):
            name = env.spec.id if env.spec else type(env.unwrapped).__name__
            raise ForethoughtError(f"{agent} needs a built-in continuous system (its known cost and "
                                   f"start state); env {name} is not one")
        if config.cost == "quadratic" and getattr(system, "cost_kind", "quadratic") != "quadratic":
            system = dataclasses.replace(system, cost_kind="quadratic")
            env.unwrapped.system = system
        self.system = system
        self.T, self.n, self.m = system.horizon, system.state_dim, system.action_dim
        self.x0 = np.asarray(system.initial_state(), np.float64)
        self.u_max = jnp.asarray(system.action_high, jnp.float64)
        self.squash_actions = config.squash

    def squash(self, v):
        return self.u_max * jnp.tanh(v / self.u_max) if self.squash_actions else v

    def cost(self, x, v, t):
        return self.system.cost(x, self.squash(v), t)

    def dynamics(self, x, v, t):
        return self.system.dynamics(x, self.squash(v), t)

    def terminal_cost(self, x):
        return self.system.terminal_cost(x)


def _mean_cost(problem: Problem, controller: LinearGaussianController, x0) -> jax.Array:
    """The cost of the controller's mean run on the true system from `x0`."""
    def step(x, t):
        v = controller.mean(x, t)
        return problem.dynamics(x, v, t), problem.cost(x, v, t)

    x_T, costs = jax.lax.scan(step, jnp.asarray(x0), jnp.arange(problem.T))
    return jnp.sum(costs) + problem.terminal_cost(x_T)


def sampled_cost(problem: Problem, controller: LinearGaussianController, key: jax.Array,
                 samples: int = 256, x0=None) -> float:
    """The expected cost of the noisy controller (actions drawn from `N(K_t x + k_t, Sigma_t)`) on
    the true system from `x0` (default: the start state), by Monte Carlo over `samples` runs:
    the cost of what LQR-FLM actually optimises, beside `_mean_cost`'s deterministic run."""
    if samples < 1:
        raise ForethoughtError(f"sampled_cost: samples must be >= 1, got {samples}")
    x0 = problem.x0 if x0 is None else x0
    with jax.enable_x64(True):
        return float(jnp.mean(_sampled_costs(problem, controller, jnp.asarray(x0, jnp.float64),
                                             jax.random.split(key, samples))))


@eqx.filter_jit
def _sampled_costs(problem, controller, x0, keys):
    def one(key):
        def step(x, inputs):
            t, k = inputs
            v = controller.sample(x, t, k)
            return problem.dynamics(x, v, t), problem.cost(x, v, t)

        x_T, costs = jax.lax.scan(step, x0, (jnp.arange(problem.T), jax.random.split(key, problem.T)))
        return jnp.sum(costs) + problem.terminal_cost(x_T)

    return jax.vmap(one)(keys)


def reference_solution(problem: Problem, x0, starts: int = 16, key: jax.Array | None = None):
    """iLQR on the true model of the same squashed problem from `x0`, the cheapest of `starts`
    runs: one from zero controls (the usual start, trajax's), the others from random controls
    `v_t ~ N(0, u_max^2)` (`key`, default `jax.random.key(0)`). iLQR is a local method: on the
    pendulum and the cart-pole swing-up the run from zero controls ends in a slow-pumping local
    optimum (pendulum from rest: cost 355 against 270 for the best of 16; cart-pole 169 against
    138). Returns `(best Solution, cost from zero controls)`."""
    if starts < 1:
        raise ForethoughtError(f"reference_solution: starts must be >= 1, got {starts}")
    key = jax.random.key(0) if key is None else key
    U0 = jax.random.normal(key, (starts, problem.T, problem.m), jnp.float64) * problem.u_max
    U0 = U0.at[0].set(0.0)
    solve = jax.vmap(lambda U: ilqr(problem.cost, problem.dynamics, jnp.asarray(x0, jnp.float64), U,
                                    terminal_cost=problem.terminal_cost, maxiter=300))
    solutions = solve(U0)
    best = int(jnp.argmin(jnp.where(jnp.isfinite(solutions.cost), solutions.cost, jnp.inf)))
    return jax.tree.map(lambda a: a[best], solutions), float(solutions.cost[0])


def tracking_controller(problem: Problem, solution, std) -> LinearGaussianController:
    """The linear-Gaussian controller `v_t = v̂_t + K_t (x - x̂_t) + N(0, std^2)` about an iLQR
    `solution` `(x̂, v̂, K)` of the problem (in its squashed `v`)."""
    X, V, K = jnp.asarray(solution.x), jnp.asarray(solution.u), jnp.asarray(solution.K)
    if not bool(jnp.all(jnp.isfinite(K))):
        raise ForethoughtError("tracking_controller: the solution's gains are not finite (no positive "
                               "definite backward pass about its trajectory)")
    std = jnp.broadcast_to(jnp.asarray(std, X.dtype), (problem.m,))
    return LinearGaussianController(K=K, k=V - jnp.einsum("tmn,tn->tm", K, X[:-1]),
                                    cov=jnp.tile(jnp.diag(std**2), (problem.T, 1, 1)))


def _rollout(env, problem: Problem, controller: LinearGaussianController, seed: int, x0=None):
    """One noisy episode from `x0` (default: the system's start state): states `[T+1, n]`,
    actions `v [T, m]`, return."""
    rng = np.random.default_rng(seed)
    K, k = np.asarray(controller.K), np.asarray(controller.k)
    L = np.linalg.cholesky(np.asarray(controller.cov))
    noise = np.einsum("tij,tj->ti", L, rng.standard_normal((problem.T, problem.m)))
    u_max = np.asarray(problem.u_max)
    obs, _ = env.reset(seed=seed, options={"state": problem.x0 if x0 is None else x0})
    X, V, total = [np.asarray(obs, np.float64)], [], 0.0
    for t in range(problem.T):
        v = K[t] @ X[-1] + k[t] + noise[t]
        u = u_max * np.tanh(v / u_max) if problem.squash_actions else v
        obs, reward, terminated, truncated, _ = env.step(u.astype(np.float32))
        X.append(np.asarray(obs, np.float64))
        V.append(v)
        total += float(reward)
        if terminated or truncated:
            break
    if len(V) != problem.T:
        raise ForethoughtError(f"LQR-FLM needs episodes of the system's full horizon ({problem.T} steps); "
                               f"one ended after {len(V)}")
    return np.asarray(X), np.asarray(V), total


def train(config: Config, env: gymnasium.Env, key: jax.Array, run: RunLike | None = None) -> Result:
    with jax.enable_x64(True):
        return _train(config, env, key, run or MemoryRun())


def _train(config: Config, env: gymnasium.Env, key: jax.Array, run: RunLike) -> Result:
    problem = Problem(config, env)
    T, n, m = problem.T, problem.n, problem.m
    window = max(config.prior_rollouts, config.fit_rollouts, config.rollouts)
    controller = LinearGaussianController.constant(T, n, jnp.zeros(m), config.init_std * problem.u_max,
                                                   jnp.float64)
    state = {"iteration": np.int64(0), "env_steps": np.int64(0), "elapsed": np.float64(0.0),
             "multiplier": np.float64(1.0), "previous_cost": np.float64(np.inf),  # inf: none yet
             "predicted_cost": np.float64(np.inf),
             "X": np.zeros((window, T + 1, n)), "V": np.zeros((window, T, m))}
    returns: list[float] = []
    costs: list[float] = []
    restored = run.load_checkpoint({"state": state, "controller": controller})
    if restored is not None:
        saved, meta = restored
        state, controller = saved["state"], saved["controller"]
        returns, costs = list(meta.get("returns", [])), list(meta.get("costs", []))
    state = {k: np.asarray(v) for k, v in state.items()}
    reference = best_reference = None
    if config.reference:
        best, reference = reference_solution(problem, problem.x0, config.reference_starts)
        best_reference = float(best.cost)
    mean_cost = eqx.filter_jit(_mean_cost)
    clock = EpisodeClock(float(state["elapsed"]))
    epsilon_per_iteration = config.kl_step * T

    run.progress(config.episodes, start=int(state["iteration"]))
    try:
        for iteration in range(int(state["iteration"]), config.episodes):
            it_key = episode_key(key, iteration)
            samples = [_rollout(env, problem, controller, episode_seed(key, iteration * config.rollouts + r))
                       for r in range(config.rollouts)]
            X = np.stack([s[0] for s in samples])
            V = np.stack([s[1] for s in samples])
            sample_return = float(np.mean([s[2] for s in samples]))
            state["env_steps"] = np.int64(int(state["env_steps"]) + config.rollouts * T)
            # the rolling window of recent rollouts for the fit and the prior (newest last)
            state["X"] = np.concatenate([state["X"], X])[-window:]
            state["V"] = np.concatenate([state["V"], V])[-window:]

            t0 = time.perf_counter()
            stored = min(window, (iteration + 1) * config.rollouts)
            dynamics = _fit(config, state["X"][-stored:], state["V"][-stored:],
                            jax.random.fold_in(it_key, 1))
            quad = quadratize_cost(problem.cost, problem.terminal_cost, jnp.asarray(X), jnp.asarray(V))
            x0_mean, x0_cov = initial_distribution(X)
            actual = float(expected_cost(quad, marginals(controller, dynamics, x0_mean, x0_cov)))
            if np.isfinite(float(state["previous_cost"])):
                state["multiplier"] = np.float64(step_multiplier(
                    float(state["previous_cost"]), float(state["predicted_cost"]), actual,
                    float(state["multiplier"]), lower=config.min_multiplier, upper=config.max_multiplier))
            epsilon = epsilon_per_iteration * float(state["multiplier"])
            update = kl_update(dynamics, quad, controller, x0_mean, x0_cov, epsilon)
            controller = update.controller
            state["previous_cost"] = np.float64(actual)
            state["predicted_cost"] = np.float64(update.expected_cost)
            update_seconds = time.perf_counter() - t0

            cost = float(mean_cost(problem, controller, problem.x0))
            returns.append(sample_return)
            costs.append(cost)
            row = {"episode": iteration, "env_steps": int(state["env_steps"]), "return": sample_return,
                   "cost": cost, "ilqr_cost": reference if reference is not None else float("nan"),
                   "ilqr_best_cost": best_reference if best_reference is not None else float("nan"),
                   "kl": float(update.kl), "epsilon": epsilon, "eta": float(update.eta),
                   "multiplier": float(state["multiplier"]), "predicted_cost": float(update.expected_cost),
                   "update_seconds": round(update_seconds, 3)}
            state["iteration"] = np.int64(iteration + 1)
            state["elapsed"] = np.float64(clock.elapsed)
            row["wall_seconds"] = round(clock.elapsed, 3)
            run.log(**row)
            run.save_checkpoint({"state": state, "controller": controller}, episode=iteration + 1,
                                returns=returns, costs=costs)
    finally:
        run.close_progress()
    return Result(returns, costs, reference, best_reference, int(state["env_steps"]), controller,
                  _policy(problem, controller))


def _fit(config: Config, stored_X: np.ndarray, stored_V: np.ndarray, key: jax.Array):
    """The linear-Gaussian dynamics of the last `fit_rollouts` of the stored rollouts (module
    docstring, step 2; newest last, this iteration's included), with a GMM prior fit to the last
    `prior_rollouts`."""
    X, V = stored_X[-config.fit_rollouts:], stored_V[-config.fit_rollouts:]
    if config.prior == "none":
        return fit_linear_gaussian(X, V)
    past_X, past_V = stored_X[-config.prior_rollouts:], stored_V[-config.prior_rollouts:]
    n, m = X.shape[2], V.shape[2]
    gmm = fit_dynamics_gmm(past_X[:, :-1].reshape(-1, n), past_V.reshape(-1, m),
                           past_X[:, 1:].reshape(-1, n), key)
    prior = gmm_prior(gmm, X, V, strength=config.prior_strength)
    if config.local_prior:
        prior = local_prior(prior, X, V, spread=config.prior_spread)
    return fit_linear_gaussian(X, V, prior=prior)


def _policy(problem: Problem, controller: LinearGaussianController) -> Callable[[np.ndarray, int], np.ndarray]:
    K, k = np.asarray(controller.K), np.asarray(controller.k)
    u_max = np.asarray(problem.u_max)

    def act(obs, t):
        t = min(int(t), problem.T - 1)
        v = K[t] @ np.asarray(obs, np.float64) + k[t]
        u = u_max * np.tanh(v / u_max) if problem.squash_actions else v
        return np.clip(u, -u_max, u_max).astype(np.float32)

    return act
