"""Guided policy search: local LQR-FLM controllers teach one neural policy (seed 000, "Global
Policy"; Levine and Koltun 2013, Levine et al. 2016; the mirror-descent form of Montgomery and
Levine 2016).

    forethought run gps --env pendulum        # 4 training starts, 4 new ones to test on

The note's three steps, once per iteration:

    1. optimise each local policy p_i(u_t | x_t) from its start x_{0,i} w.r.t. the cost
       c̃_i(x, u) = c(x, u) - lambda_i log pi_theta(u | x)
    2. use the samples of step 1 to train pi_theta(u_t | x_t) to mimic each p_i
    3. update the local costs with the new pi_theta (and lambda_i)

Step 1 is LQR-FLM (`agents/lqr_flm.py`, `control/kl_lqr.py`): run `rollouts` episodes of each
local linear-Gaussian controller from its start, fit its local dynamics (Bayesian linear regression
with one GMM prior shared by all starts), and solve the KL-bounded LQR problem with the *global
policy's* linearization as the reference distribution, `D_KL(p_i || pi̅_theta,i) <= epsilon_i`.
For a fixed dual variable that problem is exactly the max-entropy LQR of the note's `c̃_i` with
`lambda_i = eta_i`, and the bisection on `eta_i` is step 3's update of `lambda_i`. (In the first
iteration there is no trained policy yet, and the reference is the previous local controller.)
`pi̅_theta,i` is the policy's first-order expansion about each step's mean state,
`N(J_t x + mu_theta(x̄_t) - J_t x̄_t, Sigma_pi)`, with the policy's state-independent covariance
`Sigma_pi` the inverse of the local precisions' mean (as GPS sets it).

Step 2 minimises `sum_i,t,n (mu_theta(x) - mu_i,t(x))' Sigma_i,t^-1 (mu_theta(x) - mu_i,t(x))`
over the sampled states (the mean term of `D_KL(pi_theta || p_i)`, which is what the network's
weights change), by Adam in one jitted `lax.scan`.

The policy is an MLP of the state features (sin and cos of angles), time-invariant, acting in the
same unbounded `v` as the local controllers (`u = u_max tanh(v / u_max)`). Each row logs the mean
cost of the local controllers' and of the global policy's deterministic runs from the training
starts and from the test starts (midpoints of the training square's edges), against iLQR's
cost with the true model from each start (the best of `reference_starts` runs,
`lqr_flm.reference_solution`); `return` is minus the global policy's test cost.
`FIGURES` declares `gps_costs.png`: the local and global costs per iteration, with iLQR's.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import equinox as eqx
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import optax

from forethought.agents.base import EpisodeClock, MemoryRun, RunLike, episode_key, episode_seed
from forethought.agents import lqr_flm
from forethought.agents.lqr_flm import Problem, _mean_cost, _rollout
from forethought.control.kl_lqr import (LinearGaussianController, expected_cost, initial_distribution,
                                        kl_update, marginals, neg_log_prob_quadratic, quadratize_cost,
                                        step_multiplier)
from forethought.errors import ForethoughtError
from forethought.models.ensemble import state_features
from forethought.models.linear_gaussian import fit_dynamics_gmm, fit_linear_gaussian, gmm_prior


@dataclasses.dataclass(frozen=True)
class Config:
    """Guided policy search: LQR-FLM local controllers from several starts distilled into one MLP policy."""

    episodes: int = 12
    """Iterations (each runs `rollouts` episodes per start)."""
    rollouts: int = 5
    """Episodes per start and iteration."""
    spread: tuple[float, float] = (0.6, 1.5)
    """Training starts: the start state plus the four corners (+-a, +-b) in its first two
    coordinates (the pendulum's angle and velocity); tests: the midpoints of the square's edges."""
    kl_step: float = 0.2
    """KL bound per iteration in nats per time step (times T and an adaptive multiplier)."""
    init_std: float = 0.2
    """Action noise of the first local controllers, as a fraction of the action bound."""
    hidden: int = 64
    """Units per hidden layer of the policy."""
    layers: int = 2
    """Hidden layers of the policy."""
    policy_steps: int = 1500
    """Adam steps of the supervised policy update per iteration (full batch)."""
    learning_rate: float = 3e-3
    """Adam step size of the policy update."""
    replay: int = 1
    """Iterations of sampled states the policy is trained on (relabelled by the current local
    controllers: 1, the current samples only, as GPS does; the linear controllers extrapolate
    poorly to states far from their own rollouts)."""
    start_std: float = 0.1
    """Each rollout starts from its training start plus this much Gaussian noise (state units)."""
    policy_std: float = 0.2
    """The global policy's action noise, as a fraction of the action bound (sets the scale of
    `-log pi_theta`)."""
    lambda_init: float = 0.1
    """Weight `lambda` of `-log pi_theta` in the local costs at the second iteration."""
    lambda_growth: float = 2.0
    """Factor `lambda` grows by each iteration after that (the agreement is enforced ever more)."""
    lambda_max: float = 10.0
    """Largest `lambda`."""
    init: str = "noise"
    """First local controllers: "noise" (zero mean, `init_std` noise, as LQR-FLM starts) or "ilqr"
    (iLQR's feedback solution on the true model from each training start, best of `reference_starts`,
    with `init_std` noise: the guiding trajectories of Levine and Koltun 2013)."""
    reference_starts: int = 16
    """iLQR runs per start for the reference (and "ilqr" init): zero controls and random ones."""

    def __post_init__(self):
        for name, minimum in {"episodes": 1, "rollouts": 2, "replay": 1, "hidden": 1, "layers": 1, "policy_steps": 1}.items():
            if getattr(self, name) < minimum:
                raise ForethoughtError(f"{name} must be >= {minimum}, got {getattr(self, name)}")
        for name in ("kl_step", "init_std", "learning_rate", "policy_std", "lambda_init", "lambda_max"):
            if not getattr(self, name) > 0:
                raise ForethoughtError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.lambda_growth >= 1:
            raise ForethoughtError(f"lambda_growth must be >= 1, got {self.lambda_growth}")
        if self.init not in ("noise", "ilqr"):
            raise ForethoughtError(f"init must be 'noise' or 'ilqr', got {self.init!r}")
        if self.reference_starts < 1:
            raise ForethoughtError(f"reference_starts must be >= 1, got {self.reference_starts}")
        if len(self.spread) != 2 or not all(s > 0 for s in self.spread):
            raise ForethoughtError(f"spread must be two positive numbers, got {self.spread}")


class Policy(eqx.Module):
    """`v = u_max * MLP(features(x))`: the global policy's mean, in the controllers' `v`."""

    mlp: eqx.nn.MLP
    scale: jax.Array
    angles: tuple[int, ...] = eqx.field(static=True)

    def __call__(self, x):
        return self.scale * self.mlp(state_features(x, self.angles))


@dataclasses.dataclass(frozen=True)
class Result:
    returns: list[float]
    env_steps: int
    policy_module: Policy
    local: list[LinearGaussianController]
    train_costs: list[float]
    """The global policy's cost from each training start, after the last iteration."""
    test_costs: list[float]
    """... and from each test start."""
    reference_train: list[float]
    reference_test: list[float]
    """iLQR's costs with the true model from the same starts."""
    test_at_goal: int
    """Test starts from which the global policy ends near upright."""
    policy: Callable[[np.ndarray, int], np.ndarray]


def starts(problem: Problem, spread: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Training starts (corners) and test starts (edge midpoints), `[4, n]` each."""
    if problem.n < 2:
        raise ForethoughtError(f"GPS spreads its starts over two state coordinates; {problem.system.name} has {problem.n}")
    a, b = spread
    corners = [(-a, -b), (a, -b), (a, b), (-a, b)]
    edges = [(0.0, -b), (a, 0.0), (0.0, b), (-a, 0.0)]

    def place(offsets):
        out = np.tile(problem.x0, (4, 1))
        out[:, :2] += np.asarray(offsets)
        return out

    return place(corners), place(edges)


def _policy_cost(problem: Problem, policy: Policy, x0):
    def step(x, t):
        v = policy(x)
        return problem.dynamics(x, v, t), (problem.cost(x, v, t), x)

    x_T, (costs, _) = jax.lax.scan(step, x0, jnp.arange(problem.T))
    return jnp.sum(costs) + problem.terminal_cost(x_T), x_T


def _at_goal(problem: Problem, x_T) -> bool:
    """Near the goal at the end: every angle within 0.3 rad of upright, velocities below 1."""
    goal = problem.system.error(x_T) if hasattr(problem.system, "error") else None
    if goal is None:
        return False
    return bool(jnp.all(jnp.abs(goal) < jnp.asarray([0.3] + [1.0] * (goal.shape[0] - 1))))


def train(config: Config, env: gymnasium.Env, key: jax.Array, run: RunLike | None = None) -> Result:
    with jax.enable_x64(True):
        return _train(config, env, key, run or MemoryRun())


def _linearize(policy: Policy, X, cov):
    """The policy's linear-Gaussian expansion about each step's mean state of rollouts `X`."""
    x_bar = X[:, :-1].mean(0)                                        # [T, n]
    J = jax.vmap(jax.jacfwd(policy))(x_bar)                          # [T, m, n]
    k = jax.vmap(policy)(x_bar) - jnp.einsum("tmn,tn->tm", J, x_bar)
    return LinearGaussianController(K=J, k=k, cov=cov)


@eqx.filter_jit
def _fit_policy(policy: Policy, states, targets, precisions, steps: int, learning_rate: float):
    """Step 2: weighted least squares of the policy mean on the local controllers' means."""
    optimizer = optax.adam(learning_rate)
    params, static = eqx.partition(policy, eqx.is_inexact_array)

    def loss(p):
        mu = jax.vmap(eqx.combine(p, static))(states)
        r = mu - targets
        return 0.5 * jnp.mean(jnp.einsum("bi,bij,bj->b", r, precisions, r))

    def step(carry, _):
        p, opt = carry
        value, grad = jax.value_and_grad(loss)(p)
        updates, opt = optimizer.update(grad, opt, p)
        return (optax.apply_updates(p, updates), opt), value

    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return eqx.combine(params, static), losses[-1]


def _train(config: Config, env: gymnasium.Env, key: jax.Array, run: RunLike) -> Result:
    problem = Problem(lqr_flm.Config(cost="quadratic", squash=True), env, agent="GPS")
    T, n, m = problem.T, problem.n, problem.m
    train_starts, test_starts = starts(problem, config.spread)
    C = len(train_starts)
    features = state_features(jnp.zeros(n), problem.system.angles).shape[0]
    mlp = eqx.nn.MLP(features, m, config.hidden, config.layers, activation=jnp.tanh,
                     key=jax.random.fold_in(key, 7))
    mlp = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, mlp)
    policy = Policy(mlp, jnp.asarray(problem.u_max), tuple(problem.system.angles))
    first = LinearGaussianController.constant(T, n, jnp.zeros(m), config.init_std * problem.u_max, jnp.float64)
    solutions = [lqr_flm.reference_solution(problem, x0, config.reference_starts, jax.random.fold_in(key, 11 + i))[0]
                 for i, x0 in enumerate(np.concatenate([train_starts, test_starts]))]
    if config.init == "ilqr":
        first = [lqr_flm.tracking_controller(problem, s, config.init_std * problem.u_max) for s in solutions[:C]]
    else:
        first = [first] * C
    local = jax.tree.map(lambda *a: jnp.stack(a), *first)
    state = {"iteration": np.int64(0), "env_steps": np.int64(0), "elapsed": np.float64(0.0),
             "multiplier": np.ones(C), "previous_cost": np.full(C, np.inf), "predicted_cost": np.full(C, np.inf),
             # every iteration's sampled states, relabelled by the current local controllers in step 2
             "X": np.zeros((config.episodes, C, config.rollouts, T + 1, n))}
    returns: list[float] = []
    restored = run.load_checkpoint({"state": state, "policy": policy, "local": local})
    if restored is not None:
        saved, meta = restored
        state, policy, local = saved["state"], saved["policy"], saved["local"]
        returns = list(meta.get("returns", []))
    state = {k: np.array(v) for k, v in state.items()}
    policy_cov = jnp.tile(jnp.diag((config.policy_std * problem.u_max) ** 2), (T, 1, 1))
    reference_train = [float(s.cost) for s in solutions[:C]]
    reference_test = [float(s.cost) for s in solutions[C:]]
    clock = EpisodeClock(float(state["elapsed"]))
    evaluate_policy = eqx.filter_jit(jax.vmap(lambda p, x0: _policy_cost(problem, p, x0), in_axes=(None, 0)))
    evaluate_local = eqx.filter_jit(jax.vmap(lambda c, x0: _mean_cost(problem, c, x0)))

    run.progress(config.episodes, start=int(state["iteration"]))
    try:
        for iteration in range(int(state["iteration"]), config.episodes):
            it_key = episode_key(key, iteration)
            controllers = [jax.tree.map(lambda a: a[i], local) for i in range(C)]
            rollouts = []
            for i, x0 in enumerate(train_starts):
                seeds = [episode_seed(key, (iteration * C + i) * config.rollouts + r) for r in range(config.rollouts)]
                samples = [_rollout(env, problem, controllers[i], s, x0 + config.start_std
                                    * np.random.default_rng(s).standard_normal(n)) for s in seeds]
                rollouts.append((np.stack([s[0] for s in samples]), np.stack([s[1] for s in samples])))
            state["env_steps"] = np.int64(int(state["env_steps"]) + C * config.rollouts * T)
            t0 = time.perf_counter()
            # one GMM prior over every start's rollouts of this iteration
            all_X = np.concatenate([X for X, _ in rollouts])
            all_V = np.concatenate([V for _, V in rollouts])
            gmm = fit_dynamics_gmm(all_X[:, :-1].reshape(-1, n), all_V.reshape(-1, m),
                                   all_X[:, 1:].reshape(-1, n), jax.random.fold_in(it_key, 1))
            lam = 0.0 if iteration == 0 else min(config.lambda_max,
                                                  config.lambda_init * config.lambda_growth ** (iteration - 1))
            new_local, kls = [], []
            for i, (X, V) in enumerate(rollouts):
                dynamics = fit_linear_gaussian(X, V, prior=gmm_prior(gmm, X, V))
                quad = quadratize_cost(problem.cost, problem.terminal_cost, jnp.asarray(X), jnp.asarray(V))
                if lam > 0:  # the note's c̃ = c - lambda log pi_theta, pi_theta linearized about the rollouts
                    C_pi, c_pi = neg_log_prob_quadratic(_linearize(policy, jnp.asarray(X), policy_cov))
                    quad = quad._replace(C=quad.C + lam * C_pi, c=quad.c + lam * c_pi)
                x0_mean, x0_cov = initial_distribution(X)
                actual = float(expected_cost(quad, marginals(controllers[i], dynamics, x0_mean, x0_cov)))
                if np.isfinite(state["previous_cost"][i]):
                    state["multiplier"][i] = step_multiplier(state["previous_cost"][i], state["predicted_cost"][i],
                                                             actual, state["multiplier"][i])
                update = kl_update(dynamics, quad, controllers[i], x0_mean, x0_cov,
                                   config.kl_step * T * state["multiplier"][i])
                state["previous_cost"][i], state["predicted_cost"][i] = actual, float(update.expected_cost)
                new_local.append(update.controller)
                kls.append(float(update.kl))
            local = jax.tree.map(lambda *a: jnp.stack(a), *new_local)
            # step 2: the policy mimics the new local controllers on the states they were sampled at
            state["X"][iteration] = np.stack([X for X, _ in rollouts])
            recent = slice(max(0, iteration + 1 - config.replay), iteration + 1)
            states, targets, precisions = _supervision(local, state["X"][recent])
            policy, policy_loss = _fit_policy(policy, states, targets, precisions, config.policy_steps,
                                              config.learning_rate)
            update_seconds = time.perf_counter() - t0

            local_costs = np.asarray(evaluate_local(local, jnp.asarray(train_starts)))
            train_costs, _ = evaluate_policy(policy, jnp.asarray(train_starts))
            test_costs, test_final = evaluate_policy(policy, jnp.asarray(test_starts))
            at_goal = sum(_at_goal(problem, x) for x in test_final)
            returns.append(-float(np.mean(test_costs)))
            state["iteration"] = np.int64(iteration + 1)
            state["elapsed"] = np.float64(clock.elapsed)
            run.log(episode=iteration, env_steps=int(state["env_steps"]), **{"return": returns[-1]},
                    local_cost=float(np.mean(local_costs)), global_train_cost=float(np.mean(train_costs)),
                    global_test_cost=float(np.mean(test_costs)), ilqr_train_cost=float(np.mean(reference_train)),
                    ilqr_test_cost=float(np.mean(reference_test)), test_at_goal=int(at_goal),
                    kl=float(np.mean(kls)), lam=lam, policy_loss=float(policy_loss),
                    update_seconds=round(update_seconds, 3), wall_seconds=round(clock.elapsed, 3))
            run.save_checkpoint({"state": state, "policy": policy, "local": local}, episode=iteration + 1,
                                returns=returns)
    finally:
        run.close_progress()
    train_costs, _ = evaluate_policy(policy, jnp.asarray(train_starts))
    test_costs, test_final = evaluate_policy(policy, jnp.asarray(test_starts))
    return Result(returns, int(state["env_steps"]), policy, [jax.tree.map(lambda a: a[i], local) for i in range(C)],
                  [float(c) for c in train_costs], [float(c) for c in test_costs], reference_train, reference_test,
                  sum(_at_goal(problem, x) for x in test_final), _act(problem, policy))


def _supervision(local: LinearGaussianController, X: np.ndarray):
    """Step 2's data: every state `x_t` of start `i` in `X [iterations, C, N, T+1, n]`, its target
    `K_i,t x_t + k_i,t` under the current local controller and that controller's precision,
    scaled to mean trace 1 per action dimension (only relative weights matter)."""
    X = jnp.asarray(X[:, :, :, :-1])                                   # [I, C, N, T, n]
    targets = jnp.einsum("ctmn,icrtn->icrtm", local.K, X) + local.k[None, :, None]
    P = jnp.linalg.inv(local.cov)                                      # [C, T, m, m]
    P = P / jnp.mean(jnp.trace(P, axis1=2, axis2=3) / P.shape[-1])
    precisions = jnp.broadcast_to(P[None, :, None], X.shape[:4] + P.shape[-2:])
    n, m = X.shape[-1], P.shape[-1]
    return X.reshape(-1, n), targets.reshape(-1, m), precisions.reshape(-1, m, m)


def _act(problem: Problem, policy: Policy) -> Callable[[np.ndarray, int], np.ndarray]:
    mean = jax.jit(policy)
    u_max = np.asarray(problem.u_max)

    def act(obs, t):
        with jax.enable_x64(True):
            v = np.asarray(mean(jnp.asarray(obs, jnp.float64)))
        return np.clip(u_max * np.tanh(v / u_max), -u_max, u_max).astype(np.float32)

    return act


FIGURES = [{
    "name": "gps_costs.png", "title": "guided policy search", "ylabel": "cost (mean over starts)", "log": True,
    "lines": [("local_cost", "local controllers (training starts)", "C0-"),
              ("global_train_cost", "global policy, training starts", "C1-"),
              ("global_test_cost", "global policy, test starts", "C2-"),
              ("ilqr_train_cost", "iLQR, true model, training starts", "C1:"),
              ("ilqr_test_cost", "iLQR, true model, test starts", "C2:")]}]
"""The run folder's own figures (drawn by the CLI with `experiment.plot.metric_figure`)."""
