"""Model-based value expansion (MVE), SVG/MAAC actor gradients and policy backprop (BPTT).

Pure, jit-friendly building blocks for three ways of using a differentiable model inside the
learner rather than only for data (seed 002 sections 5.3-5.4; seed 000 "Model-Based Policy
Learning"; seed 001 "Policy Backprop"; seed 003 "Solution 2: use value function for tail return").

* `mve_target`: the critic target of MVE (seed 002 sec 5.3). From a real transition
  `(s, a, r, s')`, roll the model H steps from `s'` under the current policy and bootstrap with
  the target soft value at the end:
  `y = r + sum_{h=1..H} gamma^h r_h + gamma^{H+1} V'(s_{H+1})`. With `horizon=0` it is exactly
  `sac.td_target` (it calls it, with the same key).
* `svg_objective`: the SVG(H)/MAAC actor objective (seed 002 sec 5.4.2, seed 003 Solution 2):
  `J = sum_{h<H} gamma^h (r(s_h, a_h) - alpha log pi(a_h|s_h)) + gamma^H V(s_H)`, actions
  reparameterised `a_h = pi(s_h, eps_h)`, states `s_{h+1} = f(s_h, a_h)`, gradient by backprop
  through the model (`lax.scan` over the horizon, batched over start states).
* `bptt_objective`: policy backprop (seed 000, seed 001): a deterministic policy, the summed model
  reward over the whole horizon, no critic; the gradient is the backprop-through-time one whose
  norm explodes with the horizon on unstable/chaotic dynamics (the motivation for the value tail).
* `clipped_bptt_step`: one Adam step on `-bptt_objective` with global-norm gradient clipping.

Agents: `MVEConfig`/`train_mve` (`mve`, registered through `agents/mve.py`) and
`SVGConfig`/`train_svg` (`svg`, through `agents/svg.py`) share MBPO's loop with the model used
inside the SAC update (the critic target for MVE, the actor loss for SVG) instead of for data;
the `bptt` agent is `agents/bptt.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from forethought.errors import ForethoughtError
from forethought.rl import sac

Dynamics = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
"""`f(X [B, n], U [B, m], t) -> X_next [B, n]`."""
Reward = Callable[[jax.Array, jax.Array], jax.Array]
"""`r(X [B, n], U [B, m]) -> [B]`."""


@dataclasses.dataclass(frozen=True)
class HorizonConfig:
    """Shared settings of the model-gradient learners."""

    horizon: int = 5
    """H: model steps in the MVE target / SVG objective / BPTT return (MVE allows 0 = plain SAC)."""
    max_grad_norm: float = 10.0
    """Global-norm clip of the BPTT policy gradient (seed 001: exploding gradients)."""
    min_horizon: int = 0
    """Smallest allowed `horizon` (0 for MVE, 1 for SVG and BPTT)."""

    def __post_init__(self):
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, int) or self.horizon < self.min_horizon:
            raise ForethoughtError(f"horizon must be an integer >= {self.min_horizon}, got {self.horizon!r}")
        if not (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0):
            raise ForethoughtError(f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")


def mve_target(spec: sac.SACSpec, state: sac.SACState, batch: sac.Batch, key: jax.Array,
               aux: Any, dynamics: Dynamics, reward: Reward, horizon: int) -> jax.Array:
    """MVE critic target (seed 002 sec 5.3) for each transition of `batch` -> `[B]`.

    `horizon == 0` returns `sac.td_target(spec, state, batch, key)` itself. Otherwise rolls
    `dynamics` H steps from `batch.next_obs` with `a_h ~ pi_phi`, sums discounted model rewards
    and bootstraps with the target critic's soft value. A real `done` zeroes everything after r."""
    if horizon == 0:
        return sac.td_target(spec, state, batch, key, aux)
    alive0 = 1.0 - batch.done.astype(batch.reward.dtype)

    def step(carry, h):
        x, ret, disc = carry
        a, _ = sac.policy(spec, state.actor, x, jax.random.fold_in(key, h))
        r = reward(x, a)
        return (dynamics(x, a, h), ret + disc * r, disc * spec.gamma), None

    init = (batch.next_obs, jnp.zeros_like(batch.reward), jnp.full_like(batch.reward, spec.gamma))
    (x_end, ret, disc), _ = jax.lax.scan(step, init, jnp.arange(horizon))
    tail, _ = sac.soft_value(spec, state.actor, state.target_critic, state.log_alpha, x_end,
                             jax.random.fold_in(key, horizon))
    return batch.reward + alive0 * (ret + disc * tail)


def svg_objective(policy: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]], params: Any,
                  dynamics: Dynamics, reward: Reward, value: Callable[[jax.Array, jax.Array], jax.Array] | None,
                  starts: jax.Array, key: jax.Array, horizon: int, gamma: float, alpha: float = 0.0) -> jax.Array:
    """Mean over `starts [B, n]` of the SVG(H)/MAAC objective (seed 002 sec 5.4.2, seed 003 Sol. 2).

    `policy(params, X, key) -> (U, log_prob)` reparameterised; `value(X, key) -> [B]` the tail
    (None: zero tail, i.e. plain H-step return). Differentiate w.r.t. `params` for the actor
    gradient by backprop through `dynamics`."""

    def step(carry, h):
        x, ret, disc = carry
        a, log_prob = policy(params, x, jax.random.fold_in(key, h))
        r = reward(x, a) - alpha * log_prob
        return (dynamics(x, a, h), ret + disc * r, disc * gamma), None

    B = starts.shape[0]
    init = (starts, jnp.zeros((B,), starts.dtype), jnp.ones((B,), starts.dtype))
    (x_end, ret, disc), _ = jax.lax.scan(step, init, jnp.arange(horizon))
    if value is not None:
        ret = ret + disc * value(x_end, jax.random.fold_in(key, horizon))
    return jnp.mean(ret)


def sac_svg_loss(actor: sac.Actor, spec: sac.SACSpec, critic: sac.Critic, log_alpha: jax.Array,
                 obs: jax.Array, key: jax.Array, dynamics: Dynamics, reward: Reward, horizon: int) -> jax.Array:
    """`-svg_objective` for a SAC actor: entropy terms as SAC, tail `V = min Q - alpha log pi`
    with critic and temperature held fixed (stop-gradient)."""
    critic = jax.tree.map(lambda a: jax.lax.stop_gradient(a) if eqx.is_array(a) else a, critic)
    log_alpha = jax.lax.stop_gradient(log_alpha)
    alpha = jnp.exp(log_alpha)

    def pol(a, x, k):
        return sac.policy(spec, a, x, k)

    def value(x, k):
        return sac.soft_value(spec, actor, critic, log_alpha, x, k)[0]

    return -svg_objective(pol, actor, dynamics, reward, value, obs, key, horizon, spec.gamma, alpha)


def bptt_objective(policy: Callable[[Any, jax.Array], jax.Array], params: Any, dynamics: Dynamics,
                   reward: Reward, starts: jax.Array, horizon: int, gamma: float = 1.0) -> jax.Array:
    """Mean over `starts` of the summed (discounted) model reward of a deterministic policy over
    the whole horizon, no critic (seed 000 "Model-Based Policy Learning", seed 001 "Policy Backprop")."""
    return svg_objective(lambda p, x, k: (policy(p, x), jnp.zeros(x.shape[:1], x.dtype)), params, dynamics,
                         reward, None, starts, jax.random.PRNGKey(0), horizon, gamma)


def clipped_bptt_step(policy, params, opt_state, optimizer: optax.GradientTransformation, dynamics: Dynamics,
                      reward: Reward, starts: jax.Array, horizon: int, gamma: float = 1.0):
    """One step on `-bptt_objective`; `optimizer` should chain `optax.clip_by_global_norm`.
    Returns `(params, opt_state, objective, grad_norm)` (norm before clipping)."""
    value, grads = jax.value_and_grad(lambda p: bptt_objective(policy, p, dynamics, reward, starts, horizon, gamma))(
        params)
    grads = jax.tree.map(lambda g: -g, grads)
    norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value, norm


def bptt_optimizer(config: HorizonConfig, learning_rate: float = 1e-3) -> optax.GradientTransformation:
    """Adam behind global-norm clipping at `config.max_grad_norm`."""
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(learning_rate))


# ----- the MVE agent (forethought run mve) -----------------------------------------------------
from forethought.agents import mbpo as _mbpo  # noqa: E402


@dataclasses.dataclass(frozen=True)
class MVEConfig(_mbpo.Config):
    """MVE: SAC on real data with H-step model-expanded critic targets (seed 002 sec 5.3)."""

    horizon: int = 3
    """H: model steps in the critic target (0 gives plain SAC's one-step target)."""

    def __post_init__(self):
        super().__post_init__()
        HorizonConfig(horizon=self.horizon, min_horizon=0)


@dataclasses.dataclass(frozen=True)
class SVGConfig(_mbpo.Config):
    """SVG(H)/MAAC: SAC whose actor gradient runs through H steps of the learned model plus the Q tail."""

    horizon: int = 3
    """H: model steps the actor's gradient goes through before the soft-value tail (>= 1)."""

    def __post_init__(self):
        super().__post_init__()
        HorizonConfig(horizon=self.horizon, min_horizon=1)


_CACHE: dict = {}


def _cached(kind: str, system, horizon: int, build):
    """One function object per (kind, system, horizon), so `sac.update` compiles once per run."""
    cache_key = (kind, id(system), horizon)
    if cache_key not in _CACHE:
        _CACHE[cache_key] = (system, build())
    return _CACHE[cache_key][1]


def _model_steps(system, model, key, batch_size):
    """The ensemble as `f(X, U, t)` (TS1 particles) and the system's reward `r(X, U)`."""
    cost = jax.vmap(system.cost, in_axes=(0, 0, None))
    dynamics = model.as_dynamics(jax.random.fold_in(key, 1_000_003), particles=batch_size, propagation="ts1")
    return dynamics, lambda x, a: -cost(x, a, 0)


def _mve_target_for(system, horizon: int):
    """A `sac.TargetFn` whose `aux` is the ensemble."""
    def build():
        def target(spec, state, batch, key, aux):
            dynamics, reward = _model_steps(system, aux, key, batch.obs.shape[0])
            return mve_target(spec, state, batch, key, None, dynamics, reward, horizon)
        return target
    return _cached("mve", system, horizon, build)


def _svg_actor_for(system, horizon: int):
    """A `sac.ActorLossFn` whose `aux` is the ensemble: `sac_svg_loss` through the model, and the
    log-probabilities of the first step's actions for the temperature."""
    def build():
        def actor_objective(actor, spec, critic, log_alpha, obs, key, aux):
            dynamics, reward = _model_steps(system, aux, key, obs.shape[0])
            loss = sac_svg_loss(actor, spec, critic, log_alpha, obs, key, dynamics, reward, horizon)
            _, log_prob = sac.policy(spec, actor, obs, jax.random.fold_in(key, 0))  # the objective's h = 0 draw
            return loss, jax.lax.stop_gradient(log_prob)
        return actor_objective
    return _cached("svg", system, horizon, build)


def train_mve(config: MVEConfig, env, key: jax.Array, run=None):
    """MBPO's loop (model fits, per-episode keys, checkpoint + resume) with the model used only in
    the critic target: `real_ratio` is ignored, every minibatch is real data."""
    system = _mbpo._check_env(env)
    return _train_with_model(config, env, key, run, system, _mve_target_for(system, config.horizon), sac.actor_loss)


def train_svg(config: SVGConfig, env, key: jax.Array, run=None):
    """MBPO's loop with the model used only in the actor's gradient (SVG(H)/MAAC): critics learn
    one-step soft TD targets on real data; `real_ratio` is ignored."""
    system = _mbpo._check_env(env)
    return _train_with_model(config, env, key, run, system, sac.td_target, _svg_actor_for(system, config.horizon))


def _train_with_model(config, env, key: jax.Array, run, system, target, actor_objective):
    """The shared loop of MVE and SVG: SAC updates on real minibatches with `target` and
    `actor_objective` given the current ensemble, refit every `model_train_every` env steps."""
    import numpy as np
    from forethought.agents import sac as sac_agent
    from forethought.agents.base import (EpisodeClock, MemoryRun, episode_key, episode_seed, restore_buffer,
                                         run_episode, save_buffer)
    from forethought.models.ensemble import Ensemble, EnsembleSpec
    from forethought.models.train import TrainConfig, fit
    from forethought.rl.buffer import ReplayBuffer

    run = run or MemoryRun()
    spec = sac_agent.spec_for(config, env)
    n, m = spec.obs_dim, spec.action_dim
    model_spec = EnsembleSpec(n, m, members=config.members, hidden=config.model_hidden, layers=config.model_layers,
                              angles=tuple(system.angles), probabilistic=True, elites=config.elites)
    train_config = TrainConfig(learning_rate=config.model_learning_rate, weight_decay=config.model_weight_decay,
                               batch_size=config.model_batch_size, max_epochs=config.model_max_epochs,
                               patience=config.model_patience)
    learner = sac.init(spec, jax.random.fold_in(key, 7))
    model = Ensemble.create(model_spec, jax.random.fold_in(key, 8))
    buffer = ReplayBuffer(n, m, capacity=config.buffer_size)
    counters = {"episode": np.int64(0), "env_steps": np.int64(0), "elapsed": np.float64(0.0),
                "pending": np.int64(0), "updates": np.int64(0), "last_fit": np.int64(-1)}
    returns: list[float] = []
    restored = run.load_checkpoint({"state": counters, "sac": learner, "model": model})
    if restored is not None:
        saved, meta = restored
        counters, learner, model = saved["state"], saved["sac"], saved["model"]
        returns = list(meta.get("returns", []))
        buffer = restore_buffer(run, meta, buffer)
    start, env_steps = int(counters["episode"]), int(counters["env_steps"])
    pending, updates, last_fit = int(counters["pending"]), int(counters["updates"]), int(counters["last_fit"])
    clock = EpisodeClock(float(counters["elapsed"]))
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
            if env_steps >= config.random_steps and (last_fit < 0 or env_steps - last_fit >= config.model_train_every):
                data = buffer.all()
                model, _ = fit(model, data.obs, data.action, data.next_obs, jax.random.fold_in(ep_key, 3),
                               train_config)
                last_fit = env_steps
            metrics = []
            real = sac_agent.real_pool(buffer) if pending >= config.update_every and last_fit >= 0 else None
            chunk = 0
            while real is not None and pending >= config.update_every:
                steps = config.update_every * config.updates_per_step
                ck = jax.random.fold_in(jax.random.fold_in(ep_key, 2), chunk)
                learner, m_ = sac.update(spec, learner, (real,), (config.batch_size,), ck, steps, target, model,
                                         actor_objective)
                metrics.append(m_)
                pending -= config.update_every
                updates += steps
                chunk += 1
            run.log(episode=episode, env_steps=env_steps, **{"return": result.total_reward}, length=result.length,
                    wall_seconds=round(clock.elapsed, 3), updates=updates, **sac_agent.metric_row(metrics))
            counters = {"episode": np.int64(episode + 1), "env_steps": np.int64(env_steps),
                        "elapsed": np.float64(clock.elapsed), "pending": np.int64(pending),
                        "updates": np.int64(updates), "last_fit": np.int64(last_fit)}
            save_buffer(run, buffer)
            run.save_checkpoint({"state": counters, "sac": learner, "model": model},
                                episode=episode + 1, returns=returns, buffer_transitions=len(buffer))
    finally:
        run.close_progress()
    return _mbpo.Result(returns, env_steps, learner, model, sac_agent.greedy_policy(spec, learner.actor))
