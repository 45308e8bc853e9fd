"""Model-Based Policy Optimization (Janner et al. 2019): SAC on short rollouts of a learned model.

Seed 001, Algorithm 2 ("environment data augmentation"; seed 002 section 5.2 files it under data
augmentation, the modern Dyna), with this module's names:

    1: initialise pi_phi (SAC, `forethought.rl.sac`), the ensemble p_theta, D_env, D_model
    2: for each episode:
    3:   every `model_train_every` (F) env steps: fit p_theta on all of D_env by maximum
         likelihood (`models.train.fit`: a probabilistic ensemble, elites by held-out loss)
    4:   for the E steps of the episode:
    5:     act with pi_phi in the env; add to D_env
    6:     M = `rollouts_per_step` model rollouts: start states s_t drawn uniformly from D_env,
    7:     k steps each under pi_phi through the ensemble, a random elite per rollout and step
           (TS1), added to D_model (a FIFO that keeps `model_retain_steps` env steps' worth)
    9:     G = `updates_per_step` SAC updates on minibatches with a fraction `real_ratio` from
   10:     D_env and the rest from D_model

Lines 6-10 are batched: after each episode, every `update_every` env steps' worth of work runs
as one jitted call, which draws `M * update_every` start states, rolls them out `k` steps
(`vmap` over start states, `lax.scan` over the k steps), writes them into D_model and does
`G * update_every` SAC updates in a `lax.scan`. So the policy acts one episode behind the
per-step loop, as in the `sac` agent. The rollout length k grows linearly from
`rollout_length_start` at episode `rollout_schedule_start` to `rollout_length_end` at episode
`rollout_schedule_end` (MBPO's `[a, b, k_a, k_b]` schedule, in episodes).

On a built-in system, rewards of model rollouts come from the system's true cost,
`r = -cost(s, a, 0)` (the built-in costs do not depend on time), and rollouts end where
`system.is_terminal` says the task ends; only the dynamics are learned.

A Gymnasium env (`--env gym:InvertedPendulum-v5`, flat Box spaces, bounded actions) has no known
cost: MBPO then also learns the task, as the MPC agents do (`models.reward.LearnedTask`): a reward
MLP `r_hat(s, a)` and an end classifier `p_hat(done | s')`, refit on all of D_env (warm-started)
whenever the dynamics are (line 3). A model rollout step earns `r_hat(s, a)` and ends with
probability `p_hat(done | s')`: `done` is drawn from that Bernoulli, not thresholded at 0.5. The
rollouts are then samples of the learned MDP, ends included, as their states are samples of the
learned dynamics (TS1 and the predicted noise), and SAC's soft TD target `r + gamma (1 - done) V(s')`
is right in expectation over the draw, `r + gamma (1 - p_hat) V(s')`; a threshold would instead
bootstrap fully through every state the classifier puts just under 0.5 and never through those
just over it (the MPC agents' `learned_ends="expected"` default weighs costs by the same
probability). The classifier weighs its two classes equally (`LearnedTask.fit`), so where they
overlap `p_hat` leans towards ending; where the end is a function of s', as in InvertedPendulum,
they barely do. Until an episode in D_env has ended by termination, no rollout ends. The task is an
argument of the jitted rollout-and-update call (a pytree of arrays, not a closure), so a refit
does not recompile it. MVE, SVG and BPTT reuse this module's env check and still refuse such envs:
their loop does not fit a reward model yet.

A rollout step whose prediction (state or reward) is not finite is dropped, with the rest of its
rollout.

    forethought run mbpo --env pendulum
    forethought run mbpo --env gym:InvertedPendulum-v5
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import equinox as eqx
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np

from forethought.agents import sac as sac_agent
from forethought.agents.base import (EpisodeClock, MemoryRun, RunLike, episode_key, episode_seed, evaluate,
                                     evaluation_env, restore_buffer, run_episode, save_buffer)
from forethought.errors import ForethoughtError
from forethought.models.ensemble import Ensemble, EnsembleSpec
from forethought.models.reward import LearnedTask, RewardTrainConfig
from forethought.models.train import TrainConfig, fit
from forethought.rl import sac
from forethought.rl.buffer import ReplayBuffer
from forethought.systems.gym import system_of


@dataclasses.dataclass(frozen=True)
class Config(sac_agent.Config):
    """MBPO: SAC on short branched rollouts of a probabilistic ensemble (seed 001 Algorithm 2)."""

    episodes: int = 30
    """Episodes in all, the random warm-up included."""
    random_steps: int = 100
    """Env steps of uniformly random actions before the first model fit."""
    updates_per_step: int = 20
    """G: SAC updates per env step."""
    update_every: int = 25
    """Env steps' worth of rollouts and updates done in one jitted call (after an episode)."""
    real_ratio: float = 0.05
    """Fraction of each SAC minibatch drawn from real transitions (the rest from model rollouts)."""
    rollouts_per_step: int = 100
    """M: model rollouts branched from real states per env step."""
    rollout_length_start: int = 1
    """k at episode `rollout_schedule_start` and before."""
    rollout_length_end: int = 1
    """k at episode `rollout_schedule_end` and after (linear in between)."""
    rollout_schedule_start: int = 0
    """Episode where the rollout length starts to change."""
    rollout_schedule_end: int = 1
    """Episode where the rollout length reaches `rollout_length_end`."""
    model_retain_steps: int = 500
    """Env steps' worth of rollouts the model buffer keeps (FIFO: M * max k * this many)."""
    model_train_every: int = 250
    """F: env steps between model fits (a fit happens after the episode that reaches F)."""
    members: int = 7
    """Ensemble members."""
    elites: int = 5
    """Members (best on held-out data) that rollouts draw from."""
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
    reward_hidden: int = 200
    """Gymnasium envs: units per hidden layer of the learned reward and end networks."""
    reward_layers: int = 2
    """Gymnasium envs: hidden layers of the learned reward and end networks."""
    reward_steps: int = 1000
    """Gymnasium envs: Adam steps per fit of the learned reward and end networks."""

    def __post_init__(self):
        super().__post_init__()
        checks = {"rollouts_per_step": 1, "rollout_length_start": 1, "rollout_length_end": 1,
                  "rollout_schedule_start": 0, "rollout_schedule_end": 0, "model_retain_steps": 1,
                  "model_train_every": 1, "members": 1, "elites": 1, "model_hidden": 1, "model_layers": 1,
                  "model_batch_size": 1, "model_max_epochs": 1, "model_patience": 1,
                  "reward_hidden": 1, "reward_layers": 1, "reward_steps": 1}
        for name, minimum in checks.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ForethoughtError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not 0 <= self.real_ratio <= 1:
            raise ForethoughtError(f"real_ratio must be in [0, 1], got {self.real_ratio}")
        if self.elites > self.members:
            raise ForethoughtError(f"elites must be <= members ({self.members}), got {self.elites}")
        if self.rollout_schedule_end < self.rollout_schedule_start:
            raise ForethoughtError(f"rollout_schedule_end ({self.rollout_schedule_end}) must be >= "
                                   f"rollout_schedule_start ({self.rollout_schedule_start})")
        if self.model_retain_steps < self.update_every:
            raise ForethoughtError(f"model_retain_steps must be >= update_every ({self.update_every}) so one "
                                   f"call's rollouts fit in the model buffer, got {self.model_retain_steps}")
        for name in ("model_learning_rate",):
            if not getattr(self, name) > 0:
                raise ForethoughtError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.model_weight_decay < 0:
            raise ForethoughtError(f"model_weight_decay must be >= 0, got {self.model_weight_decay}")

    def rollout_length(self, episode: int) -> int:
        """k for the work after episode `episode` (the linear schedule, rounded down)."""
        a, b = self.rollout_schedule_start, self.rollout_schedule_end
        frac = 1.0 if b == a else min(max((episode - a) / (b - a), 0.0), 1.0)
        if episode < a:
            frac = 0.0
        return int(self.rollout_length_start + frac * (self.rollout_length_end - self.rollout_length_start))

    def batch_counts(self) -> tuple[int, int]:
        """Minibatch transitions from (D_env, D_model)."""
        real = int(round(self.real_ratio * self.batch_size))
        return real, self.batch_size - real


@dataclasses.dataclass(frozen=True)
class Result:
    returns: list[float]
    env_steps: int
    state: sac.SACState
    model: Ensemble
    policy: Callable[[np.ndarray, int], np.ndarray]
    """`policy(observation, t) -> action`: the final actor's deterministic action."""
    task: LearnedTask | None = None
    """The learned reward and end (Gymnasium envs), as last fit; None on a built-in system."""
    model_pool: sac.Pool | None = None
    """D_model at the end."""


def model_rollouts(spec: sac.SACSpec, system, model: Ensemble, actor: sac.Actor, starts: jax.Array,
                   key: jax.Array, k: int) -> tuple[sac.Batch, jax.Array]:
    """k-step rollouts of `pi_phi` through `model` from `starts [B, n]` (lines 7-8 of Algorithm 2).

    Each step samples `a ~ pi_phi(. | s)`, moves every rollout with a random elite member and its
    predicted noise (TS1: `model.as_dynamics(..., propagation="ts1")`) and takes the task's reward
    and end: for a built-in `system`, `-system.cost(s, a, 0)` and `system.is_terminal(s')`; for a
    `LearnedTask`, `system.reward(s, a)` and an end drawn with probability
    `system.end_probability(s')` (the module docstring). Returns the transitions `[k * B]`
    (step-major) and `valid [k * B]`: false after a rollout has ended or when a prediction is not
    finite."""
    B = starts.shape[0]
    dynamics = model.as_dynamics(jax.random.fold_in(key, 0), particles=B, propagation="ts1")
    action_key, end_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
    if isinstance(system, LearnedTask):
        reward_of = jax.vmap(system.reward)
        end_probability = jax.vmap(system.end_probability)

        def ends(x_next, t):
            return jax.random.uniform(jax.random.fold_in(end_key, t), (B,)) < end_probability(x_next)
    else:
        cost = jax.vmap(system.cost, in_axes=(0, 0, None))
        reward_of = lambda x, a: -cost(x, a, 0)  # noqa: E731

        def ends(x_next, t):
            return jax.vmap(system.is_terminal)(x_next) if system.terminates else jnp.zeros((B,), bool)

    def step(carry, t):
        x, alive = carry
        action, _ = sac.policy(spec, actor, x, jax.random.fold_in(action_key, t))
        x_next = dynamics(x, action, t)
        reward = reward_of(x, action)
        finite = jnp.all(jnp.isfinite(x_next), axis=-1) & jnp.isfinite(reward)
        x_next = jnp.where(finite[:, None], x_next, x)
        reward = jnp.where(finite, reward, 0.0)
        done = ends(x_next, t)
        valid = alive & finite
        return (x_next, valid & ~done), (sac.Batch(x, action, reward, x_next, done), valid)

    _, (batch, valid) = jax.lax.scan(step, (starts, jnp.ones((B,), bool)), jnp.arange(k))
    return jax.tree.map(lambda a: a.reshape(k * B, *a.shape[2:]), batch), valid.reshape(k * B)


@eqx.filter_jit
def _segment(spec, system, model, learner, real, fake, key, rollouts, k, steps, counts):
    """One batch of lines 6-10: `rollouts` branched k-step rollouts into D_model, then `steps`
    SAC updates on mixed minibatches. `system` is the built-in system (static) or the current
    `LearnedTask` (its arrays traced, like the model's: a refit task reuses the compiled call)."""
    start_key, rollout_key, update_key = jax.random.split(key, 3)
    index = jax.random.randint(start_key, (rollouts,), 0, jnp.maximum(real.size, 1))
    batch, valid = model_rollouts(spec, system, model, learner.actor, real.data.obs[index], rollout_key, k)
    fake = sac.fifo_add(fake, batch, valid)
    learner, metrics = sac.train_steps(spec, learner, (real, fake), counts, update_key, steps)
    weights = valid.astype(jnp.float32)
    metrics["rollout_reward"] = jnp.sum(batch.reward * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    metrics["rollout_valid"] = jnp.mean(weights)
    return learner, fake, metrics


def _env_name(env: gymnasium.Env) -> str:
    return env.spec.id if env.spec else type(env.unwrapped).__name__


def _check_env(env: gymnasium.Env):
    """The built-in system behind `env` (its cost gives the model's rewards); other envs are
    refused. MVE, SVG and BPTT use this: their loops learn no reward. MBPO uses `_task_for`."""
    system = system_of(env)
    if system is None:
        raise ForethoughtError("this agent needs a built-in system's cost for the rewards of its model (env "
                               f"{_env_name(env)} has none); of the agents that learn from model rollouts, only "
                               "mbpo learns a reward model for Gymnasium envs so far")
    return system


def _task_for(env: gymnasium.Env, config: Config, key: jax.Array):
    """What model rollouts take rewards and ends from: the built-in system behind `env`, or a
    fresh `LearnedTask` for a Gymnasium env with flat Box spaces and bounded actions."""
    system = system_of(env)
    if system is not None:
        return system
    name = _env_name(env)
    for what, space in (("observation", env.observation_space), ("action", env.action_space)):
        if not isinstance(space, gymnasium.spaces.Box) or len(space.shape) != 1:
            raise ForethoughtError(f"env {name}: MBPO supports flat Box observation and action spaces; its "
                                   f"{what} space is {space}")
    if not (np.all(np.isfinite(env.action_space.low)) and np.all(np.isfinite(env.action_space.high))):
        raise ForethoughtError(f"env {name}: the action space must be bounded, got {env.action_space}")
    return LearnedTask.create(env.observation_space.shape[0], env.action_space.low, env.action_space.high, key,
                              hidden=config.reward_hidden, layers=config.reward_layers)


def train(config: Config, env: gymnasium.Env, key: jax.Array, run: RunLike | None = None) -> Result:
    run = run or MemoryRun()
    system = _task_for(env, config, jax.random.fold_in(key, 9))
    learned = isinstance(system, LearnedTask)
    reward_config = RewardTrainConfig(steps=config.reward_steps)
    spec = sac_agent.spec_for(config, env)
    n, m = spec.obs_dim, spec.action_dim
    model_spec = EnsembleSpec(n, m, members=config.members, hidden=config.model_hidden, layers=config.model_layers,
                              angles=tuple(system.angles), probabilistic=True, elites=config.elites)
    train_config = TrainConfig(learning_rate=config.model_learning_rate, weight_decay=config.model_weight_decay,
                               batch_size=config.model_batch_size, max_epochs=config.model_max_epochs,
                               patience=config.model_patience)
    learner = sac.init(spec, jax.random.fold_in(key, 7))
    model = Ensemble.create(model_spec, jax.random.fold_in(key, 8))
    k_max = max(config.rollout_length_start, config.rollout_length_end)
    fake = sac.empty_pool(n, m, config.rollouts_per_step * k_max * config.model_retain_steps)
    buffer = ReplayBuffer(n, m, capacity=config.buffer_size)
    counts = config.batch_counts()

    counters = {"episode": np.int64(0), "env_steps": np.int64(0), "elapsed": np.float64(0.0),
                "pending": np.int64(0), "updates": np.int64(0), "last_fit": np.int64(-1)}
    like = {"state": counters, "sac": learner, "model": model, "model_pool": fake}
    if learned:  # a built-in system's checkpoints keep their old contents
        like["task"] = system
    returns: list[float] = []
    restored = run.load_checkpoint(like)
    if restored is not None:
        saved, meta = restored
        counters, learner, model, fake = saved["state"], saved["sac"], saved["model"], saved["model_pool"]
        system = saved.get("task", system)
        returns = list(meta.get("returns", []))
        buffer = restore_buffer(run, meta, buffer)
    start, env_steps = int(counters["episode"]), int(counters["env_steps"])
    pending, updates, last_fit = int(counters["pending"]), int(counters["updates"]), int(counters["last_fit"])
    clock = EpisodeClock(float(counters["elapsed"]))
    eval_env = evaluation_env(env) if config.eval_episodes else None

    run.progress(config.episodes, start=start)
    try:
        for episode in range(start, config.episodes):
            ep_key = episode_key(key, episode)
            policy = sac_agent.behaviour_policy(spec, learner.actor, jax.random.fold_in(ep_key, 1), env_steps,
                                                config.random_steps,
                                                episode_seed(jax.random.fold_in(key, 1), episode))
            result = run_episode(env, policy, episode_seed(key, episode))
            buffer.add_episode(result.observations, result.actions, result.rewards, result.terminated)
            pending += sac_agent.owed_steps(env_steps, result.length, config.random_steps)
            env_steps += result.length
            returns.append(result.total_reward)
            row = {"episode": episode, "env_steps": env_steps, "return": result.total_reward,
                   "length": result.length, "wall_seconds": float("nan")}

            # line 3: refit the model every F env steps, once the warm-up is over
            model_epochs, holdout = 0, float("nan")
            if env_steps >= config.random_steps and (last_fit < 0 or env_steps - last_fit >= config.model_train_every):
                data = buffer.all()
                model, report = fit(model, data.obs, data.action, data.next_obs, jax.random.fold_in(ep_key, 3),
                                    train_config)
                model_epochs, holdout, last_fit = report.epochs, report.holdout_loss[-1], env_steps
                if learned:
                    system = system.fit(data.obs, data.action, data.reward, data.next_obs, data.terminated,
                                        jax.random.fold_in(ep_key, 4), reward_config)

            # lines 6-10, batched
            k = config.rollout_length(episode)
            metrics = []
            real = sac_agent.real_pool(buffer) if pending >= config.update_every and last_fit >= 0 else None
            chunk = 0
            while real is not None and pending >= config.update_every:
                steps = config.update_every * config.updates_per_step
                learner, fake, m_ = _segment(spec, system, model, learner, real, fake,
                                             jax.random.fold_in(jax.random.fold_in(ep_key, 2), chunk),
                                             config.rollouts_per_step * config.update_every, k, steps, counts)
                sac.check_skipped(learner, m_)
                metrics.append(m_)
                pending -= config.update_every
                updates += steps
                chunk += 1
            row["wall_seconds"] = round(clock.elapsed, 3)
            row.update(updates=updates, **sac_agent.metric_row(metrics), model_epochs=model_epochs,
                       model_holdout_loss=holdout, rollout_length=k, model_pool=int(fake.size),
                       rollout_reward=(round(float(np.mean([float(x["rollout_reward"]) for x in metrics])), 6)
                                       if metrics else float("nan")))
            if config.eval_episodes:
                row["eval_return"] = evaluate(eval_env, sac_agent.greedy_policy(spec, learner.actor),
                                              config.eval_episodes, jax.random.fold_in(key, 5), episode)
            run.log(**row)
            counters = {"episode": np.int64(episode + 1), "env_steps": np.int64(env_steps),
                        "elapsed": np.float64(clock.elapsed), "pending": np.int64(pending),
                        "updates": np.int64(updates), "last_fit": np.int64(last_fit)}
            save_buffer(run, buffer)
            saved = {"state": counters, "sac": learner, "model": model, "model_pool": fake}
            if learned:
                saved["task"] = system
            run.save_checkpoint(saved, episode=episode + 1, returns=returns, buffer_transitions=len(buffer))
    finally:
        run.close_progress()
    return Result(returns, env_steps, learner, model, sac_agent.greedy_policy(spec, learner.actor),
                  system if learned else None, fake)
