"""Soft Actor-Critic as an agent: the model-free baseline the model-based agents are measured against.

    forethought run sac --env pendulum

The loop (Haarnoja et al. 2018, with the learner of `forethought.rl.sac`):

    1. act with uniformly random actions for the first `random_steps` env steps, then sample
       `a ~ pi_phi(. | s)` (one jitted call per step), adding every transition to the buffer
    2. after each episode, run the updates its steps are owed, `updates_per_step` per env step
       past the warm-up, in jitted chunks of `update_every` env steps' worth (one `lax.scan`
       each); leftover steps carry over to the next episode

Updating after the episode rather than after every step keeps Python out of the inner loop; on a
100-step pendulum episode the policy is one episode staler than in the per-step loop. Works on
any env with a Box action space; built-in systems tell it which observations are angles.

Episode `i` draws its action noise from `fold_in(episode_key(key, i), 1)` (step `t` folds in `t`),
its update chunks from `fold_in(episode_key(key, i), 2)` and its reset and warm-up actions from
`episode_seed`, so a run resumed from the checkpoint (learner, optimiser moments, counters) and
`buffer.npz` repeats the uninterrupted one bit for bit. The learning rates default to 1e-3 (the
RL-Zoo's pendulum setting): on the pendulum (one seed, 128 units) that reached returns of about
-225 within 8,000 env steps, where the paper's 3e-4 was still near -285.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import equinox as eqx
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np

from forethought.agents.base import (EpisodeClock, MemoryRun, RunLike, episode_key, episode_seed, evaluate,
                                     evaluation_env, restore_buffer, run_episode, save_buffer)
from forethought.errors import ForethoughtError
from forethought.rl import sac
from forethought.rl.buffer import ReplayBuffer
from forethought.systems.gym import system_of


@dataclasses.dataclass(frozen=True)
class Config:
    """Soft Actor-Critic: twin critics, tanh-Gaussian actor, learned temperature (Haarnoja et al. 2018)."""

    episodes: int = 150
    """Episodes in all, the random warm-up included."""
    random_steps: int = 1000
    """Env steps of uniformly random actions before the policy acts (and updates start)."""
    updates_per_step: int = 1
    """Gradient updates per env step (the update-to-data ratio)."""
    update_every: int = 100
    """Env steps' worth of updates run in one jitted call (after an episode; the rest carries over)."""
    batch_size: int = 256
    """Minibatch size of each update."""
    actor_lr: float = 1e-3
    """Adam learning rate of the actor."""
    critic_lr: float = 1e-3
    """Adam learning rate of the critics."""
    alpha_lr: float = 1e-3
    """Adam learning rate of the temperature's logarithm."""
    init_alpha: float = 1.0
    """Initial temperature alpha."""
    target_entropy: float | None = None
    """Entropy the temperature steers towards; None: -dim(A)."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Polyak rate of the target critics."""
    hidden: int = 256
    """Units per hidden layer of actor and critics."""
    layers: int = 2
    """Hidden layers of actor and critics."""
    buffer_size: int = 1_000_000
    """Most transitions the replay buffer keeps (oldest dropped first)."""
    eval_episodes: int = 0
    """Episodes of the deterministic policy after each training episode, on a separate instance
    of the env and not counted as env steps; their mean return is logged as `eval_return` (the
    return that papers plot; `return` is the training episode's, with the policy's noise)."""

    def __post_init__(self):
        checks = {"episodes": 1, "random_steps": 0, "updates_per_step": 1, "update_every": 1, "batch_size": 1,
                  "hidden": 1, "layers": 1, "buffer_size": 1, "eval_episodes": 0}
        for name, minimum in checks.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ForethoughtError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("actor_lr", "critic_lr", "alpha_lr", "init_alpha"):
            if not getattr(self, name) > 0:
                raise ForethoughtError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.gamma <= 1:
            raise ForethoughtError(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0 < self.tau <= 1:
            raise ForethoughtError(f"tau must be in (0, 1], got {self.tau}")


@dataclasses.dataclass(frozen=True)
class Result:
    returns: list[float]
    env_steps: int
    state: sac.SACState
    policy: Callable[[np.ndarray, int], np.ndarray]
    """`policy(observation, t) -> action`: the final actor's deterministic action `c + h tanh(mu(s))`."""


def spec_for(config: Config, env: gymnasium.Env) -> sac.SACSpec:
    """The learner's shapes from the env's spaces (angles from the built-in system, if any)."""
    obs_space, action_space = env.observation_space, env.action_space
    if not isinstance(action_space, gymnasium.spaces.Box) or len(action_space.shape) != 1:
        raise ForethoughtError(f"SAC needs a 1-D Box action space, got {action_space}")
    if not isinstance(obs_space, gymnasium.spaces.Box) or len(obs_space.shape) != 1:
        raise ForethoughtError(f"SAC needs a 1-D Box observation space, got {obs_space}")
    system = system_of(env)
    return sac.SACSpec(obs_space.shape[0], action_space.shape[0],
                       tuple(float(v) for v in action_space.low), tuple(float(v) for v in action_space.high),
                       angles=tuple(system.angles) if system is not None else (),
                       hidden=config.hidden, layers=config.layers, gamma=config.gamma, tau=config.tau,
                       actor_lr=config.actor_lr, critic_lr=config.critic_lr, alpha_lr=config.alpha_lr,
                       init_alpha=config.init_alpha, target_entropy=config.target_entropy,
                       batch_size=config.batch_size)


@eqx.filter_jit
def _sample_action(spec, actor, obs, key, t):
    action, _ = sac.policy(spec, actor, obs[None], jax.random.fold_in(key, t))
    return action[0]


@eqx.filter_jit
def _mode_action(spec, actor, obs):
    return sac.policy_mode(spec, actor, obs[None])[0]


def behaviour_policy(spec: sac.SACSpec, actor: sac.Actor, key: jax.Array, env_steps: int, random_steps: int,
                     seed: int) -> Callable[[np.ndarray, int], np.ndarray]:
    """`policy(obs, t)` for one episode that starts after `env_steps` steps: uniform random
    actions while `env_steps + t < random_steps`, then samples of `pi_phi` (step key
    `fold_in(key, t)`)."""
    rng = np.random.default_rng(seed)
    low, high = np.asarray(spec.action_low, np.float32), np.asarray(spec.action_high, np.float32)

    def policy(obs, t):
        if env_steps + t < random_steps:
            return rng.uniform(low, high).astype(np.float32)
        return np.asarray(_sample_action(spec, actor, jnp.asarray(obs, jnp.float32), key, np.asarray(t, np.int32)))

    return policy


def greedy_policy(spec: sac.SACSpec, actor: sac.Actor) -> Callable[[np.ndarray, int], np.ndarray]:
    return lambda obs, t: np.asarray(_mode_action(spec, actor, jnp.asarray(obs, jnp.float32)))


def real_pool(buffer: ReplayBuffer) -> sac.Pool:
    data = buffer.all()
    return sac.padded_pool(data.obs, data.action, data.reward, data.next_obs, data.terminated)


def owed_steps(env_steps_before: int, length: int, start: int) -> int:
    """Steps of an episode (env steps `env_steps_before` to `+ length`) at or past step `start`."""
    return max(0, env_steps_before + length - max(env_steps_before, start))


def metric_row(metrics: dict | None) -> dict[str, float]:
    names = ("critic_loss", "actor_loss", "alpha", "entropy", "q")
    if not metrics:
        return {name: float("nan") for name in names}
    return {name: round(float(np.mean([float(m[name]) for m in metrics])), 6) for name in names}


def train(config: Config, env: gymnasium.Env, key: jax.Array, run: RunLike | None = None) -> Result:
    run = run or MemoryRun()
    spec = spec_for(config, env)
    learner = sac.init(spec, jax.random.fold_in(key, 7))
    buffer = ReplayBuffer(spec.obs_dim, spec.action_dim, capacity=config.buffer_size)

    counters = {"episode": np.int64(0), "env_steps": np.int64(0), "elapsed": np.float64(0.0),
                "pending": np.int64(0), "updates": np.int64(0)}
    returns: list[float] = []
    restored = run.load_checkpoint({"state": counters, "sac": learner})
    if restored is not None:
        saved, meta = restored
        counters, learner = saved["state"], saved["sac"]
        returns = list(meta.get("returns", []))
        buffer = restore_buffer(run, meta, buffer)
    start, env_steps = int(counters["episode"]), int(counters["env_steps"])
    pending, updates = int(counters["pending"]), int(counters["updates"])
    clock = EpisodeClock(float(counters["elapsed"]))
    eval_env = evaluation_env(env) if config.eval_episodes else None

    run.progress(config.episodes, start=start)
    try:
        for episode in range(start, config.episodes):
            ep_key = episode_key(key, episode)
            policy = behaviour_policy(spec, learner.actor, jax.random.fold_in(ep_key, 1), env_steps,
                                      config.random_steps, episode_seed(jax.random.fold_in(key, 1), episode))
            result = run_episode(env, policy, episode_seed(key, episode))
            buffer.add_episode(result.observations, result.actions, result.rewards, result.terminated)
            pending += owed_steps(env_steps, result.length, config.random_steps)
            env_steps += result.length
            returns.append(result.total_reward)

            metrics = []
            pool = real_pool(buffer) if pending >= config.update_every else None
            chunk = 0
            while pending >= config.update_every:
                steps = config.update_every * config.updates_per_step
                learner, m = sac.update(spec, learner, (pool,), (spec.batch_size,),
                                        jax.random.fold_in(jax.random.fold_in(ep_key, 2), chunk), steps)
                metrics.append(m)
                pending -= config.update_every
                updates += steps
                chunk += 1
            row = {"episode": episode, "env_steps": env_steps, "return": result.total_reward,
                   "length": result.length, "wall_seconds": round(clock.elapsed, 3), "updates": updates,
                   **metric_row(metrics)}
            if config.eval_episodes:
                row["eval_return"] = evaluate(eval_env, greedy_policy(spec, learner.actor), config.eval_episodes,
                                              jax.random.fold_in(key, 5), episode)
            run.log(**row)
            counters = {"episode": np.int64(episode + 1), "env_steps": np.int64(env_steps),
                        "elapsed": np.float64(clock.elapsed), "pending": np.int64(pending),
                        "updates": np.int64(updates)}
            save_buffer(run, buffer)
            run.save_checkpoint({"state": counters, "sac": learner}, episode=episode + 1, returns=returns,
                                buffer_transitions=len(buffer))
    finally:
        run.close_progress()
    return Result(returns, env_steps, learner, greedy_policy(spec, learner.actor))
