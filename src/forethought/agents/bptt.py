"""Policy backprop through time through a learned model (seed 000 "Model-Based Policy Learning",
seed 001 "Policy Backprop").

    forethought run bptt --env pendulum --horizon 30

The loop:

    1. run an episode with the deterministic policy `a = pi_theta(s)` plus Gaussian exploration
       noise (uniformly random actions for the first `random_steps` env steps); add it to the buffer
    2. refit the probabilistic ensemble on the whole buffer (`models.train.fit`)
    3. `policy_steps` Adam steps on `-J(theta)`, `J = mean_s0 sum_{h<H} gamma^h r(s_h, pi(s_h))`
       with `s_{h+1}` the model's mean prediction (elites averaged), from `batch_size` start states
       drawn from the buffer; the gradient is backpropagated through all H model steps and clipped
       to global norm `max_grad_norm` (one `lax.scan` in one jitted call)

No critic: the return is the model's H-step sum, so the gradient's norm grows with H on the
pendulum's unstable dynamics (the exploding gradients of the notes, measured by
`forethought bench gradient_horizon`); clipping keeps the steps bounded, SVG/MAAC's value tail
(`forethought run svg`) is the notes' cure. Each row logs the pre-clip gradient norm.

Episode `i` draws its exploration noise and start states from `episode_key(key, i)` only, so a
resumed run (policy, Adam moments, model and `buffer.npz` from the checkpoint) is bit-identical.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import equinox as eqx
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import optax

from forethought.agents import mbpo as _mbpo
from forethought.agents.base import (EpisodeClock, MemoryRun, RunLike, episode_key, episode_seed, restore_buffer,
                                     run_episode, save_buffer)
from forethought.agents.model_value import HorizonConfig, bptt_objective
from forethought import faults
from forethought.errors import ForethoughtError
from forethought.faults import keep_finite
from forethought.models.ensemble import Ensemble, EnsembleSpec, state_features
from forethought.models.train import TrainConfig, fit
from forethought.rl.buffer import ReplayBuffer


FIGURES = [{
    "name": "gradient_norm.png", "title": "policy backprop: gradient norm before clipping (median per episode)",
    "ylabel": "||grad J||", "log": True, "lines": [("grad_norm", "BPTT through the learned model", "C0-")]}]
"""The run folder's own figures (drawn by the CLI with `experiment.plot.metric_figure`)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Policy backprop: a deterministic policy trained by backprop through H steps of the learned model (no critic)."""

    episodes: int = 30
    """Episodes in all, the random warm-up included."""
    random_steps: int = 100
    """Env steps of uniformly random actions before the policy acts."""
    horizon: int = 30
    """H: model steps the return (and its gradient) runs through."""
    gamma: float = 0.99
    """Discount of the H-step return."""
    policy_steps: int = 200
    """Adam steps on the policy after each model fit."""
    batch_size: int = 256
    """Start states (from the buffer) per policy step."""
    learning_rate: float = 1e-3
    """Adam learning rate of the policy."""
    max_grad_norm: float = 10.0
    """Global-norm clip of the policy gradient."""
    exploration_std: float = 0.2
    """Std of the Gaussian action noise while acting, as a fraction of the action range's half-width."""
    hidden: int = 64
    """Units per hidden layer of the policy."""
    layers: int = 2
    """Hidden layers of the policy."""
    members: int = 5
    """Ensemble members."""
    elites: int = 5
    """Members (best on held-out data) whose mean prediction the return runs through."""
    model_hidden: int = 200
    """Units per hidden layer of each member."""
    model_layers: int = 3
    """Hidden layers per member."""
    model_learning_rate: float = 1e-3
    """AdamW learning rate of the model fit."""
    model_batch_size: int = 256
    """Minibatch size per member of the model fit."""
    model_max_epochs: int = 100
    """Most epochs per model fit (early stopping usually ends sooner)."""
    buffer_size: int = 1_000_000
    """Replay buffer capacity (transitions)."""

    def __post_init__(self):
        for name in ("episodes", "policy_steps", "batch_size", "hidden", "layers", "members", "elites",
                     "model_hidden", "model_layers", "model_batch_size", "model_max_epochs", "buffer_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ForethoughtError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.random_steps, bool) or not isinstance(self.random_steps, int) or self.random_steps < 0:
            raise ForethoughtError(f"random_steps must be an integer >= 0, got {self.random_steps!r}")
        HorizonConfig(horizon=self.horizon, max_grad_norm=self.max_grad_norm, min_horizon=1)
        if not 0 < self.gamma <= 1:
            raise ForethoughtError(f"gamma must be in (0, 1], got {self.gamma}")
        for name in ("learning_rate", "model_learning_rate"):
            if not getattr(self, name) > 0:
                raise ForethoughtError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.exploration_std < 0:
            raise ForethoughtError(f"exploration_std must be >= 0, got {self.exploration_std}")
        if self.elites > self.members:
            raise ForethoughtError(f"elites must be <= members ({self.members}), got {self.elites}")


class Policy(eqx.Module):
    """`a = centre + half_width * tanh(MLP(features(s)))`: deterministic, inside the action bounds."""

    net: eqx.nn.MLP
    centre: tuple[float, ...] = eqx.field(static=True)
    half_width: tuple[float, ...] = eqx.field(static=True)
    angles: tuple[int, ...] = eqx.field(static=True)

    def __call__(self, obs: jax.Array) -> jax.Array:
        z = state_features(obs, self.angles)
        out = jax.vmap(self.net)(z) if z.ndim == 2 else self.net(z)
        return jnp.asarray(self.centre, out.dtype) + jnp.asarray(self.half_width, out.dtype) * jnp.tanh(out)


@dataclasses.dataclass
class Result:
    returns: list[float]
    env_steps: int
    policy_module: Policy
    model: Ensemble
    policy: Callable[[np.ndarray, int], np.ndarray]


def _optimizer(config: Config) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(config.learning_rate))


def _policy_steps(config: Config, system, policy: Policy, opt_state, model: Ensemble, starts_pool: jax.Array,
                  count: jax.Array, key: jax.Array):
    """`config.policy_steps` clipped Adam steps on `-bptt_objective` from buffer states, one scan."""
    optimizer = _optimizer(config)
    params, static = eqx.partition(policy, eqx.is_array)
    cost = jax.vmap(system.cost, in_axes=(0, 0, None))
    dynamics = model.as_dynamics(jax.random.key(0), particles=config.batch_size, propagation="expectation")

    def objective(p, starts):
        return bptt_objective(lambda q, x: eqx.combine(q, static)(x), p, dynamics, lambda x, a: -cost(x, a, 0),
                              starts, config.horizon, config.gamma)

    def step(carry, step_key):
        params, opt_state = carry
        index = jax.random.randint(step_key, (config.batch_size,), 0, jnp.maximum(count, 1))
        value, grads = jax.value_and_grad(objective)(params, starts_pool[index])
        grads = jax.tree.map(jnp.negative, grads)
        norm = optax.tree.norm(grads)
        updates, new_opt = optimizer.update(grads, opt_state, params)
        (params, opt_state), ok = keep_finite((optax.apply_updates(params, updates), new_opt), (params, opt_state),
                                              jnp.isfinite(value) & jnp.isfinite(norm))
        return (params, opt_state), (value, norm, ~ok)

    (params, opt_state), (values, norms, bad) = jax.lax.scan(step, (params, opt_state),
                                                             jax.random.split(key, config.policy_steps))
    return eqx.combine(params, static), opt_state, values, norms, jnp.sum(bad)


_policy_steps_jit = eqx.filter_jit(_policy_steps)


@eqx.filter_jit
def _act(policy: Policy, obs: jax.Array, noise: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
    return jnp.clip(policy(obs) + noise, low, high)


def train(config: Config, env: gymnasium.Env, key: jax.Array, run: RunLike | None = None) -> Result:
    run = run or MemoryRun()
    system = _mbpo._check_env(env)
    if not isinstance(env.action_space, gymnasium.spaces.Box) or len(env.action_space.shape) != 1:
        raise ForethoughtError(f"BPTT needs a 1-D Box action space, got {env.action_space}")
    n, m = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = (jnp.asarray(b, jnp.float32) for b in (env.action_space.low, env.action_space.high))
    angles = tuple(system.angles)
    feature_dim = n + len(angles)
    policy = Policy(eqx.nn.MLP(feature_dim, m, config.hidden, config.layers, key=jax.random.fold_in(key, 7)),
                    tuple(float(v) for v in (low + high) / 2), tuple(float(v) for v in (high - low) / 2), angles)
    opt_state = _optimizer(config).init(eqx.filter(policy, eqx.is_array))
    model_spec = EnsembleSpec(n, m, members=config.members, hidden=config.model_hidden, layers=config.model_layers,
                              angles=angles, probabilistic=True, elites=config.elites)
    model = Ensemble.create(model_spec, jax.random.fold_in(key, 8))
    train_config = TrainConfig(learning_rate=config.model_learning_rate, batch_size=config.model_batch_size,
                               max_epochs=config.model_max_epochs)
    buffer = ReplayBuffer(n, m, capacity=config.buffer_size)
    counters = {"episode": np.int64(0), "env_steps": np.int64(0), "elapsed": np.float64(0.0)}
    returns: list[float] = []
    restored = run.load_checkpoint({"state": counters, "policy": policy, "opt": opt_state, "model": model})
    if restored is not None:
        saved, meta = restored
        counters, policy, opt_state, model = saved["state"], saved["policy"], saved["opt"], saved["model"]
        returns = list(meta.get("returns", []))
        buffer = restore_buffer(run, meta, buffer)
    start, env_steps = int(counters["episode"]), int(counters["env_steps"])
    clock = EpisodeClock(float(counters["elapsed"]))
    noise_scale = np.asarray(config.exploration_std * (high - low) / 2)

    run.progress(config.episodes, start=start)
    try:
        for episode in range(start, config.episodes):
            ep_key = episode_key(key, episode)
            rng = np.random.default_rng(episode_seed(jax.random.fold_in(key, 1), episode))

            def act(obs, t, steps_before=env_steps, rng=rng):
                if steps_before + t < config.random_steps:
                    return rng.uniform(np.asarray(low), np.asarray(high)).astype(np.float32)
                noise = (noise_scale * rng.standard_normal(m)).astype(np.float32)
                return np.asarray(_act(policy, jnp.asarray(obs, jnp.float32), noise, low, high))

            result = run_episode(env, act, episode_seed(key, episode))
            buffer.add_episode(result.observations, result.actions, result.rewards, result.terminated)
            env_steps += result.length
            returns.append(result.total_reward)
            row = {"episode": episode, "env_steps": env_steps, "return": result.total_reward,
                   "length": result.length, "model_epochs": 0, "model_return": float("nan"),
                   "grad_norm": float("nan"), "skipped_steps": 0}
            if env_steps >= config.random_steps and episode + 1 < config.episodes:
                data = buffer.all()
                model, report = fit(model, data.obs, data.action, data.next_obs, jax.random.fold_in(ep_key, 3),
                                    train_config)
                pool = jnp.asarray(np.concatenate([data.obs, np.zeros((_bucket(len(data.obs)) - len(data.obs), n),
                                                                       np.float32)]))
                policy, opt_state, values, norms, bad = _policy_steps_jit(
                    config, system, policy, opt_state, model, pool, jnp.int32(len(data.obs)),
                    jax.random.fold_in(ep_key, 4))
                if int(bad):
                    faults.report("BPTT policy step", f"episode {episode}",
                                  f"{int(bad)} of {config.policy_steps} steps gave a NaN or inf return or gradient "
                                  "and were skipped")
                row.update(model_epochs=report.epochs, model_return=round(float(values[-1]), 4),
                           grad_norm=round(float(jnp.median(norms)), 4), skipped_steps=int(bad))
            row["wall_seconds"] = round(clock.elapsed, 3)
            run.log(**row)
            counters = {"episode": np.int64(episode + 1), "env_steps": np.int64(env_steps),
                        "elapsed": np.float64(clock.elapsed)}
            save_buffer(run, buffer)
            run.save_checkpoint({"state": counters, "policy": policy, "opt": opt_state, "model": model},
                                episode=episode + 1, returns=returns, buffer_transitions=len(buffer))
    finally:
        run.close_progress()
    final = policy
    return Result(returns, env_steps, final, model,
                  lambda obs, t: np.asarray(_act(final, jnp.asarray(obs, jnp.float32), jnp.zeros(m), low, high)))


def _bucket(n: int) -> int:
    """Start-state pools are padded to a power of two so the policy steps recompile rarely."""
    return max(256, 1 << (n - 1).bit_length())
