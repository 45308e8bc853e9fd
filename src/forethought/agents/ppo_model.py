"""PPO on a learned ensemble, ME-TRPO style (Kurutach et al. 2018, with PPO in place of TRPO).

Seed 003, "Solution 1: use policy gradient from model-free RL": backpropagating through a long
model rollout multiplies many Jacobians and the gradients explode, so instead train a
likelihood-ratio policy-gradient learner (A2C, TRPO, PPO, ...) on trajectories *sampled* from
the model (the seed's example is Kaiser et al.'s video model + PPO for Atari). ME-TRPO adds an
ensemble: imagined rollouts each follow one randomly chosen member, so the policy cannot exploit
one member's errors, and the members also decide when to stop improving on the model.

    forethought run ppo-model --env pendulum

The loop, one iteration per real episode:

    1. act in the real env with the current policy (uniformly random actions for the first
       `random_episodes` episodes); add the episode to D_env
    2. refit the probabilistic ensemble on all of D_env (`models.train.fit`, the fitting code of
       `mbpo` and `pets`: held-out early stopping, elites by held-out loss)
    3. repeat, at most `max_rounds` times:
         `iterations_per_round` PPO iterations (`forethought.rl.ppo`), each on `rollouts`
         imagined rollouts of `horizon` steps from real start states (the first states of the
         real episodes) through the ensemble, rewards `-system.cost(s, a, t)` of the true
         built-in system;
         then validate: each elite's imagined return of the deterministic policy from
         `validation_starts` real start states (member mean predictions, no noise; the same
         starts for every round of the episode)
       a round *passes* when the policy's validation return improved on more than
       `improve_fraction` of the elites (the default 0.5 is a majority; ME-TRPO used 0.7);
       after `patience` failures in a row, stop and go back to the policy of the last round
       that passed (or the episode's starting policy if none did)

The real data thus fit the model and, through their start states and the members fitted on
them, decide when the policy stops improving on the model. Each round is one jitted call:
`lax.scan` over the PPO iterations, each `vmap`-free batched rollouts (the ensemble steps all
rollouts at once, `lax.scan` over time) and `lax.scan` over PPO epochs and minibatches.

Rollouts use TS-infinity propagation (`Ensemble.as_dynamics(..., "ts_inf")`): rollout `p` keeps
elite `p % elites` for its whole length, adding that member's predicted noise at every step;
starts and policy noise are drawn independently per rollout, so this is a random, evenly spread
choice of member per rollout. A step whose prediction is not finite ends its rollout (it and
the steps after it are masked out). Only built-in systems are accepted: the reward is their true
cost, and only the dynamics are learned (`mbpo` learns a reward and an end for Gymnasium envs;
this agent does not yet).

Measured on the pendulum (`forethought bench mbpo --agents ppo-model --episodes ppo-model=20
--seeds 0,1`, default settings, shared 2-core CPU): the training return's trailing 3-episode mean
passed -250 after 500 env steps on both seeds (SAC: about 7,000, MBPO: about 1,300 in
`benchmarks/results/mbpo.json`), and the mean of the last five episodes was -204.8 and -214.8
(SAC -216, MBPO -214 there), in 291 and 224 s per run.

Episode `i` draws its reset from `episode_seed(key, i)`, its uniform actions from
`episode_seed(fold_in(key, 1), i)`, its policy noise from `fold_in(episode_key(key, i), 1)`
(step `t` folds in `t`), its PPO rounds from `fold_in(fold_in(episode_key(key, i), 2), round)`
and its model fit from `fold_in(episode_key(key, i), 3)`; the checkpoint (policy, critic, Adam
state, ensemble, counters) and `buffer.npz` let a resumed run repeat the uninterrupted one bit
for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import equinox as eqx
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np

from forethought.agents.base import (EpisodeClock, MemoryRun, RunLike, episode_key, episode_seed, restore_buffer,
                                     run_episode, save_buffer)
from forethought.errors import ForethoughtError
from forethought.models.ensemble import Ensemble, EnsembleSpec
from forethought.models.train import TrainConfig, fit
from forethought.rl import ppo
from forethought.rl.buffer import ReplayBuffer
from forethought.systems.gym import system_of


@dataclasses.dataclass(frozen=True)
class Config:
    """PPO on imagined rollouts of a learned ensemble, ME-TRPO style (seed 003, Solution 1)."""

    episodes: int = 20
    """Real episodes in all, the random ones included."""
    random_episodes: int = 1
    """Episodes of uniformly random actions before the policy acts."""
    rollouts: int = 200
    """Imagined rollouts per PPO iteration (a multiple of `elites`)."""
    horizon: int | None = None
    """Steps per imagined rollout; None: the system's horizon (the real episode length)."""
    iterations_per_round: int = 5
    """PPO iterations (a fresh batch of rollouts and an update each) between validations."""
    max_rounds: int = 20
    """Most validation rounds per episode."""
    improve_fraction: float = 0.5
    """A round passes when the validation return improved on more than this fraction of the elites."""
    patience: int = 2
    """Failed rounds in a row that end the episode's policy improvement."""
    validation_starts: int = 20
    """Real start states each elite's validation rollouts begin from (drawn with replacement)."""
    gamma: float = 0.99
    """Discount factor."""
    lam: float = 0.95
    """GAE's lambda."""
    clip: float = 0.2
    """PPO's clip range of the probability ratio."""
    learning_rate: float = 1e-3
    """Adam learning rate of policy and critic."""
    epochs: int = 5
    """PPO passes over each batch of rollouts."""
    minibatches: int = 4
    """Minibatches per pass."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    init_std: float = 0.5
    """Initial policy standard deviation, in units of the action box's half-width."""
    hidden: int = 64
    """Units per hidden layer of policy and critic."""
    layers: int = 2
    """Hidden layers of policy and critic."""
    members: int = 5
    """Ensemble members."""
    elites: int = 5
    """Members (best on held-out data) that rollouts and validation use."""
    model_hidden: int = 200
    """Units per hidden layer of each member."""
    model_layers: int = 3
    """Hidden layers per member."""
    model_learning_rate: float = 1e-3
    """AdamW learning rate of the model fit."""
    model_weight_decay: float = 5e-5
    """Decoupled weight decay of the model fit."""
    model_batch_size: int = 256
    """Minibatch size per member of the model fit."""
    model_max_epochs: int = 100
    """Most epochs per model fit (early stopping usually ends sooner)."""
    model_patience: int = 5
    """Epochs without a 1% held-out improvement before a model fit stops."""

    def __post_init__(self):
        checks = {"episodes": 1, "random_episodes": 0, "rollouts": 1, "iterations_per_round": 1, "max_rounds": 1,
                  "patience": 1, "validation_starts": 1, "epochs": 1, "minibatches": 1, "hidden": 1, "layers": 1,
                  "members": 1, "elites": 1, "model_hidden": 1, "model_layers": 1, "model_batch_size": 1,
                  "model_max_epochs": 1, "model_patience": 1}
        for name, minimum in checks.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ForethoughtError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if self.horizon is not None and (isinstance(self.horizon, bool) or not isinstance(self.horizon, int)
                                         or self.horizon < 1):
            raise ForethoughtError(f"horizon must be None or an integer >= 1, got {self.horizon!r}")
        if self.elites > self.members:
            raise ForethoughtError(f"elites must be <= members ({self.members}), got {self.elites}")
        if self.rollouts % self.elites:
            raise ForethoughtError(f"rollouts ({self.rollouts}) must be a multiple of elites ({self.elites}) "
                                   "so the members share the rollouts evenly")
        if self.rollouts < self.minibatches:
            raise ForethoughtError(f"rollouts ({self.rollouts}) must be >= minibatches ({self.minibatches})")
        if not 0 <= self.improve_fraction < 1:
            raise ForethoughtError(f"improve_fraction must be in [0, 1), got {self.improve_fraction}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ForethoughtError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("clip", "learning_rate", "init_std", "model_learning_rate"):
            if not getattr(self, name) > 0:
                raise ForethoughtError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("entropy_coef", "model_weight_decay"):
            if not getattr(self, name) >= 0:
                raise ForethoughtError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Result:
    returns: list[float]
    env_steps: int
    state: ppo.PPOState
    model: Ensemble
    policy: Callable[[np.ndarray, int], np.ndarray]
    """`policy(observation, t) -> action`: the final policy's deterministic action `c + h clip(mu(s))`."""


def check_env(env: gymnasium.Env):
    """The built-in system behind `env`, or a `ForethoughtError` saying why it is needed."""
    system = system_of(env)
    if system is None:
        name = env.spec.id if env.spec else type(env.unwrapped).__name__
        raise ForethoughtError(f"ppo-model needs a built-in system's cost for its imagined rollouts (env {name} has "
                               "none; only the dynamics are learned); use a built-in env such as 'pendulum'")
    if not isinstance(env.action_space, gymnasium.spaces.Box) or len(env.action_space.shape) != 1:
        raise ForethoughtError(f"ppo-model needs a 1-D Box action space, got {env.action_space}")
    return system


def spec_for(config: Config, env: gymnasium.Env) -> ppo.PPOSpec:
    system = check_env(env)
    space = env.action_space
    return ppo.PPOSpec(env.observation_space.shape[0], space.shape[0], tuple(float(v) for v in space.low),
                       tuple(float(v) for v in space.high), angles=tuple(system.angles), hidden=config.hidden,
                       layers=config.layers, gamma=config.gamma, lam=config.lam, clip=config.clip,
                       learning_rate=config.learning_rate, epochs=config.epochs, minibatches=config.minibatches,
                       entropy_coef=config.entropy_coef, init_std=config.init_std)


def imagine(spec: ppo.PPOSpec, system, model: Ensemble, policy: ppo.Policy, starts: jax.Array, key: jax.Array,
            horizon: int) -> ppo.Trajectories:
    """`starts.shape[0]` rollouts of `horizon` steps of `pi` through `model` (TS-infinity: rollout
    `p` keeps elite `p % elites`), rewards `-system.cost(s, a, t)` with `a` the clipped action.
    Returns time-major `ppo.Trajectories`; the true system's dynamics are never called."""
    N = starts.shape[0]
    dynamics = model.as_dynamics(jax.random.fold_in(key, 0), particles=N, propagation="ts_inf")
    action_key = jax.random.fold_in(key, 1)
    cost = jax.vmap(system.cost, in_axes=(0, 0, None))

    def step(carry, t):
        x, alive = carry
        z, lp = ppo.sample(spec, policy, x, jax.random.fold_in(action_key, t))
        action = ppo.to_action(spec, z)
        x_next = dynamics(x, action, t)
        finite = jnp.all(jnp.isfinite(x_next), axis=-1)
        x_next = jnp.where(finite[:, None], x_next, x)
        reward = -cost(x, action, t)
        done = jax.vmap(system.is_terminal)(x_next) if system.terminates else jnp.zeros((N,), bool)
        valid = alive & finite
        return (x_next, valid & ~done), (x, z, lp, reward, done, valid)

    (last, _), (obs, z, lp, reward, done, valid) = jax.lax.scan(step, (starts, jnp.ones((N,), bool)),
                                                                jnp.arange(horizon))
    return ppo.Trajectories(obs, z, lp, jnp.where(valid, reward, 0.0), done, valid, last)


def validation_returns(spec: ppo.PPOSpec, system, model: Ensemble, policy: ppo.Policy, starts: jax.Array,
                       horizon: int) -> jax.Array:
    """Each elite's mean return `[elites]` of the deterministic policy from `starts [V, n]` (the
    member's mean prediction, no noise, so policies are compared on equal terms)."""
    E, V = model.spec.members, starts.shape[0]
    cost = jax.vmap(jax.vmap(system.cost, in_axes=(0, 0, None)), in_axes=(0, 0, None))

    def step(carry, t):
        x, alive = carry  # [E, V, n], [E, V]
        action = ppo.mode(spec, policy, x)
        mean, _ = model.predict(x, action)
        finite = jnp.all(jnp.isfinite(mean), axis=-1)
        reward = jnp.where(alive & finite, -cost(x, action, t), 0.0)
        done = jax.vmap(jax.vmap(system.is_terminal))(mean) if system.terminates else jnp.zeros((E, V), bool)
        return (jnp.where(finite[..., None], mean, x), alive & finite & ~done), reward

    x0 = jnp.broadcast_to(starts, (E, *starts.shape))
    _, rewards = jax.lax.scan(step, (x0, jnp.ones((E, V), bool)), jnp.arange(horizon))
    return jnp.mean(jnp.sum(rewards, axis=0), axis=1)[model.elite_index]


@eqx.filter_jit
def _validate(spec, system, model, policy, starts, horizon):
    return validation_returns(spec, system, model, policy, starts, horizon)


@eqx.filter_jit
def _round(spec, system, model, state, starts, n_starts, validation_starts, key, iterations, rollouts, horizon):
    """`iterations` PPO iterations on fresh imagined rollouts, then the validation returns from
    `validation_starts [V, n]`.

    `starts [C, n]` holds the real start states in its first `n_starts` rows (padded so a new
    episode does not recompile)."""
    params, static = eqx.partition(state, eqx.is_array)

    def iteration(params, k):
        state = eqx.combine(params, static)
        index = jax.random.randint(jax.random.fold_in(k, 0), (rollouts,), 0, n_starts)
        batch = imagine(spec, system, model, state.policy, starts[index], jax.random.fold_in(k, 1), horizon)
        state, metrics = ppo.update_fn(spec, state, batch, jax.random.fold_in(k, 2))
        metrics["valid"] = jnp.mean(batch.valid.astype(jnp.float32))
        return eqx.filter(state, eqx.is_array), metrics

    params, metrics = jax.lax.scan(iteration, params, jax.random.split(key, iterations))
    state = eqx.combine(params, static)
    returns = validation_returns(spec, system, model, state.policy, validation_starts, horizon)
    return state, {k: v[-1] for k, v in metrics.items()}, returns


@eqx.filter_jit
def _sample_action(spec, policy, obs, key, t):
    z, _ = ppo.sample(spec, policy, obs, jax.random.fold_in(key, t))
    return ppo.to_action(spec, z)


@eqx.filter_jit
def _mode_action(spec, policy, obs):
    return ppo.mode(spec, policy, obs)


def greedy_policy(spec: ppo.PPOSpec, policy: ppo.Policy) -> Callable[[np.ndarray, int], np.ndarray]:
    return lambda obs, t: np.asarray(_mode_action(spec, policy, jnp.asarray(obs, jnp.float32)))


def behaviour_policy(spec: ppo.PPOSpec, policy: ppo.Policy, key: jax.Array, random: bool,
                     seed: int) -> Callable[[np.ndarray, int], np.ndarray]:
    rng = np.random.default_rng(seed)
    low, high = np.asarray(spec.action_low, np.float32), np.asarray(spec.action_high, np.float32)
    if random:
        return lambda obs, t: rng.uniform(low, high).astype(np.float32)
    return lambda obs, t: np.asarray(_sample_action(spec, policy, jnp.asarray(obs, jnp.float32), key,
                                                    np.asarray(t, np.int32)))


def _starts(buffer: ReplayBuffer, capacity: int) -> tuple[jax.Array, int]:
    obs = buffer.all().obs[buffer.episode_starts]
    padded = np.zeros((max(capacity, len(obs)), obs.shape[1]), np.float32)
    padded[: len(obs)] = obs
    return jnp.asarray(padded), len(obs)


def improve_on_model(config: Config, spec: ppo.PPOSpec, system, model: Ensemble, state: ppo.PPOState,
                     starts: jax.Array, n_starts: int, key: jax.Array, horizon: int) -> tuple[ppo.PPOState, dict]:
    """Step 3 of the module docstring: PPO rounds until the elites stop agreeing that the policy
    improves. Returns the policy of the last passing round and a summary for the metrics row."""
    # the same validation starts for the episode's starting policy and every round's
    index = jax.random.randint(jax.random.fold_in(key, 0x7A11D), (config.validation_starts,), 0, n_starts)
    validation_starts = starts[index]
    best = np.asarray(_validate(spec, system, model, state.policy, validation_starts, horizon))
    accepted, fails, rounds, passed, metrics, fraction = state, 0, 0, 0, {}, float("nan")
    for r in range(config.max_rounds):
        state, metrics, returns = _round(spec, system, model, state, starts, jnp.int32(n_starts), validation_starts,
                                         jax.random.fold_in(key, r), config.iterations_per_round, config.rollouts,
                                         horizon)
        returns = np.asarray(returns)
        rounds += 1
        fraction = float(np.mean(returns > best))
        if fraction > config.improve_fraction:
            accepted, best, fails, passed = state, returns, 0, passed + 1
        else:
            fails += 1
            if fails >= config.patience:
                break
    summary = {"ppo_rounds": rounds, "ppo_rounds_passed": passed,
               "ppo_iterations": rounds * config.iterations_per_round,
               "improved_fraction": fraction, "validation_return": round(float(np.mean(best)), 3),
               "policy_std": round(float(np.exp(accepted.policy.log_std).mean()), 4)}
    for name in ("return", "policy_loss", "value_loss", "clip_fraction", "valid"):
        summary["imagined_return" if name == "return" else name] = (round(float(metrics[name]), 6) if metrics
                                                                   else float("nan"))
    return accepted, summary


def train(config: Config, env: gymnasium.Env, key: jax.Array, run: RunLike | None = None) -> Result:
    run = run or MemoryRun()
    system = check_env(env)
    spec = spec_for(config, env)
    horizon = config.horizon or int(system.horizon)
    n, m = spec.obs_dim, spec.action_dim
    model_spec = EnsembleSpec(n, m, members=config.members, hidden=config.model_hidden, layers=config.model_layers,
                              angles=tuple(system.angles), probabilistic=True, elites=config.elites)
    train_config = TrainConfig(learning_rate=config.model_learning_rate, weight_decay=config.model_weight_decay,
                               batch_size=config.model_batch_size, max_epochs=config.model_max_epochs,
                               patience=config.model_patience)
    state = ppo.init(spec, jax.random.fold_in(key, 7))
    model = Ensemble.create(model_spec, jax.random.fold_in(key, 8))
    buffer = ReplayBuffer(n, m)

    counters = {"episode": np.int64(0), "env_steps": np.int64(0), "elapsed": np.float64(0.0)}
    returns: list[float] = []
    restored = run.load_checkpoint({"state": counters, "ppo": state, "model": model})
    if restored is not None:
        saved, meta = restored
        counters, state, model = saved["state"], saved["ppo"], saved["model"]
        returns = list(meta.get("returns", []))
        buffer = restore_buffer(run, meta, buffer)
    start, env_steps = int(counters["episode"]), int(counters["env_steps"])
    clock = EpisodeClock(float(counters["elapsed"]))

    run.progress(config.episodes, start=start)
    try:
        for episode in range(start, config.episodes):
            ep_key = episode_key(key, episode)
            policy = behaviour_policy(spec, state.policy, jax.random.fold_in(ep_key, 1),
                                      episode < config.random_episodes,
                                      episode_seed(jax.random.fold_in(key, 1), episode))
            result = run_episode(env, policy, episode_seed(key, episode))
            buffer.add_episode(result.observations, result.actions, result.rewards, result.terminated)
            env_steps += result.length
            returns.append(result.total_reward)

            data = buffer.all()
            model, report = fit(model, data.obs, data.action, data.next_obs, jax.random.fold_in(ep_key, 3),
                                train_config)
            starts, n_starts = _starts(buffer, config.episodes)
            state, summary = improve_on_model(config, spec, system, model, state, starts, n_starts,
                                              jax.random.fold_in(ep_key, 2), horizon)
            run.log(episode=episode, env_steps=env_steps, **{"return": result.total_reward}, length=result.length,
                    wall_seconds=round(clock.elapsed, 3), **summary, model_epochs=report.epochs,
                    model_holdout_loss=report.holdout_loss[-1])
            counters = {"episode": np.int64(episode + 1), "env_steps": np.int64(env_steps),
                        "elapsed": np.float64(clock.elapsed)}
            save_buffer(run, buffer)
            run.save_checkpoint({"state": counters, "ppo": state, "model": model}, episode=episode + 1,
                                returns=returns, buffer_transitions=len(buffer))
    finally:
        run.close_progress()
    return Result(returns, env_steps, state, model, greedy_policy(spec, state.policy))
