"""Soft Actor-Critic (Haarnoja et al. 2018): the model-free learner the model-based agents feed.

Seed 002 section 5 sorts "model-augmented" model-free methods by what the model improves: the
data (5.2, MBPO feeds SAC model rollouts), the critic target (5.3, MVE) or the actor update (5.4,
SVG / MAAC). SAC is the learner underneath all three, so its pieces are separate functions that
those agents replace or reuse:

- policy `pi_phi(a | s)`: a tanh-squashed Gaussian scaled to the action bounds,
  `a = c + h tanh(u)`, `u ~ N(mu_phi(s), sigma_phi(s)^2)` with `c, h` the centre and half-width
  of the box; sampled with the reparameterisation trick of seed 002 section 5.4.1
  (`u = mu + sigma eps`), with the change-of-variables log-density
  `log pi(a | s) = log N(u; mu, sigma) - sum_i log(h_i (1 - tanh(u_i)^2))` (`squashed_sample`);
- twin critics `Q_theta1, Q_theta2` with Polyak-averaged targets `Q_theta'`;
- `td_target`: the critic's regression target, the one-step soft TD target
  `y = r + gamma (1 - d) (min_j Q_theta'j(s', a') - alpha log pi(a' | s'))`, `a' ~ pi(. | s')`.
  MVE (section 5.3) replaces it with an n-step model rollout whose n = 0 case is this function;
- `soft_value` / `actor_loss`: the actor maximises `E_{a ~ pi}[min_j Q_thetaj(s, a) - alpha
  log pi(a | s)]` through the reparameterised sample (section 5.4.2's first objective); SVG /
  MAAC use the same value as the tail of a model rollout;
- a learned temperature `alpha = exp(log_alpha)` driven towards the target entropy `-dim(A)`.

Everything is a pure function over a `SACState` pytree (networks, targets, temperature and the
three Adam states), so it checkpoints with `forethought.checkpoint` and vmaps over seeds.
`train_steps` runs many gradient steps in one `lax.scan`, drawing each minibatch inside the scan
from fixed-size arrays (`Pool`s) with a valid-size count, so a growing buffer recompiles nothing
until its padded size changes; `update` is the same function jitted.

    spec = SACSpec(obs_dim=3, action_dim=1, action_low=(-2.0,), action_high=(2.0,))
    state = init(spec, key)
    state, metrics = update(spec, state, (pool,), (spec.batch_size,), key, 1000)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from forethought import faults
from forethought.errors import ForethoughtError
from forethought.faults import all_finite, keep_finite
from forethought.models.ensemble import state_features

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


@dataclasses.dataclass(frozen=True)
class SACSpec:
    """The shapes and hyperparameters of one SAC learner (hashable: jitted code takes it static)."""

    obs_dim: int
    action_dim: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    angles: tuple[int, ...] = ()
    """Observation dimensions that are angles: the networks see their (sin, cos)."""
    hidden: int = 256
    """Units per hidden layer of actor and critics."""
    layers: int = 2
    """Hidden layers of actor and critics."""
    gamma: float = 0.99
    tau: float = 0.005
    """Polyak rate of the target critics: `theta' <- tau theta + (1 - tau) theta'`."""
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 3e-4
    init_alpha: float = 1.0
    target_entropy: float | None = None
    """None: `-action_dim` (Haarnoja et al.'s heuristic)."""
    batch_size: int = 256

    def __post_init__(self):
        for name in ("obs_dim", "action_dim", "hidden", "layers", "batch_size"):
            if getattr(self, name) < 1:
                raise ForethoughtError(f"SAC {name} must be >= 1, got {getattr(self, name)}")
        if len(self.action_low) != self.action_dim or len(self.action_high) != self.action_dim:
            raise ForethoughtError(f"SAC action_low/high must have {self.action_dim} entries, "
                                   f"got {self.action_low} and {self.action_high}")
        if not all(math.isfinite(lo) and math.isfinite(hi) and lo < hi
                   for lo, hi in zip(self.action_low, self.action_high)):
            raise ForethoughtError(f"SAC needs finite action bounds with low < high, got "
                                   f"{self.action_low} and {self.action_high}")
        if any(not 0 <= i < self.obs_dim for i in self.angles):
            raise ForethoughtError(f"SAC angles must index the observation (0..{self.obs_dim - 1}), got {self.angles}")
        if not 0 <= self.gamma <= 1:
            raise ForethoughtError(f"SAC gamma must be in [0, 1], got {self.gamma}")
        if not 0 < self.tau <= 1:
            raise ForethoughtError(f"SAC tau must be in (0, 1], got {self.tau}")
        for name in ("actor_lr", "critic_lr", "alpha_lr", "init_alpha"):
            if not getattr(self, name) > 0:
                raise ForethoughtError(f"SAC {name} must be > 0, got {getattr(self, name)}")

    @property
    def feature_dim(self) -> int:
        return self.obs_dim + len(self.angles)

    @property
    def entropy_target(self) -> float:
        return -float(self.action_dim) if self.target_entropy is None else float(self.target_entropy)

    def centre_and_half_width(self) -> tuple[jax.Array, jax.Array]:
        low, high = jnp.asarray(self.action_low, jnp.float32), jnp.asarray(self.action_high, jnp.float32)
        return (high + low) / 2, (high - low) / 2


# ----- data ------------------------------------------------------------------------------------
class Batch(NamedTuple):
    """Transitions: `obs [B, n]`, `action [B, m]`, `reward [B]`, `next_obs [B, n]`, `done [B]`
    (`done` is a real end of the task, not a time limit: the target does not bootstrap past it)."""

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    next_obs: jax.Array
    done: jax.Array


class Pool(NamedTuple):
    """Transitions in fixed-size arrays (`data`, capacity `C`) of which the first `size` are valid;
    `ptr` is where a FIFO writes next (`fifo_add`)."""

    data: Batch
    size: jax.Array
    ptr: jax.Array

    @property
    def capacity(self) -> int:
        return self.data.reward.shape[0]


def empty_pool(obs_dim: int, action_dim: int, capacity: int) -> Pool:
    if capacity < 1:
        raise ForethoughtError(f"pool capacity must be >= 1, got {capacity}")
    data = Batch(jnp.zeros((capacity, obs_dim), jnp.float32), jnp.zeros((capacity, action_dim), jnp.float32),
                 jnp.zeros((capacity,), jnp.float32), jnp.zeros((capacity, obs_dim), jnp.float32),
                 jnp.zeros((capacity,), bool))
    return Pool(data, jnp.int32(0), jnp.int32(0))


def padded_pool(obs, action, reward, next_obs, done, minimum: int = 1024) -> Pool:
    """A pool from NumPy arrays of `N` transitions, zero-padded to a power of two >= `minimum`
    (so a growing replay buffer changes the jitted update's shapes only at powers of two)."""
    N = len(reward)
    capacity = max(minimum, 1 << max(N - 1, 0).bit_length())

    def pad(a, dtype):
        a = np.asarray(a, dtype)
        out = np.zeros((capacity, *a.shape[1:]), dtype)
        out[:N] = a
        return jnp.asarray(out)

    data = Batch(pad(obs, np.float32), pad(np.asarray(action).reshape(N, -1), np.float32), pad(reward, np.float32),
                 pad(next_obs, np.float32), pad(done, bool))
    return Pool(data, jnp.int32(N), jnp.int32(N % capacity))


def sample(pool: Pool, key: jax.Array, n: int) -> Batch:
    """`n` transitions drawn uniformly (with replacement) from the valid part of `pool`."""
    index = jax.random.randint(key, (n,), 0, jnp.maximum(pool.size, 1))
    return jax.tree.map(lambda a: a[index], pool.data)


def fifo_add(pool: Pool, batch: Batch, valid: jax.Array | None = None) -> Pool:
    """Write the transitions of `batch` whose `valid [B]` is true into `pool`, oldest out first.

    The valid ones are packed in order from `ptr` (wrapping around); the others are dropped, so
    rollouts that ended early or diverged leave no holes."""
    B = batch.reward.shape[0]
    C = pool.capacity
    valid = jnp.ones((B,), bool) if valid is None else valid
    rank = jnp.cumsum(valid) - 1
    index = jnp.where(valid, (pool.ptr + rank) % C, C)  # index C is out of bounds: dropped
    if B > C:  # only the last C valid ones survive a wrap-around; drop the earlier duplicates
        index = jnp.where(rank >= jnp.sum(valid) - C, index, C)
    data = jax.tree.map(lambda old, new: old.at[index].set(new.astype(old.dtype), mode="drop"), pool.data, batch)
    count = jnp.sum(valid).astype(jnp.int32)
    return Pool(data, jnp.minimum(pool.size + count, C).astype(jnp.int32), ((pool.ptr + count) % C).astype(jnp.int32))


# ----- networks ------------------------------------------------------------------------------
class Actor(eqx.Module):
    """`s -> (mu_phi(s), log sigma_phi(s))`, the pre-squash Gaussian; `log sigma` is kept in
    `[LOG_STD_MIN, LOG_STD_MAX]` smoothly (tanh), as CleanRL and most SAC implementations do."""

    mlp: eqx.nn.MLP

    def __call__(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = self.mlp(features)
        m = out.shape[-1] // 2
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (jnp.tanh(out[m:]) + 1)
        return out[:m], log_std


class Critic(eqx.Module):
    """Twin Q-networks `Q_theta1, Q_theta2` as one module with a leading axis of 2."""

    mlps: eqx.nn.MLP

    def __call__(self, features: jax.Array, action: jax.Array) -> jax.Array:
        """`features [B, f]`, `action [B, m]` (scaled to [-1, 1]) -> `[2, B]`."""
        z = jnp.concatenate([features, action], axis=-1)
        return eqx.filter_vmap(lambda mlp: jax.vmap(mlp)(z)[:, 0])(self.mlps)


class SACState(eqx.Module):
    """Everything SAC learns and the optimiser moments: the whole state of the learner."""

    actor: Actor
    critic: Critic
    target_critic: Critic
    log_alpha: jax.Array
    actor_opt: Any
    critic_opt: Any
    alpha_opt: Any


def _params(module):
    return eqx.filter(module, eqx.is_array)


def init(spec: SACSpec, key: jax.Array) -> SACState:
    """A fresh learner: random networks, targets equal to the critics, `alpha = init_alpha`."""
    actor_key, critic_key = jax.random.split(key)
    actor = Actor(eqx.nn.MLP(spec.feature_dim, 2 * spec.action_dim, spec.hidden, spec.layers,
                             activation=jax.nn.relu, key=actor_key))
    mlps = eqx.filter_vmap(lambda k: eqx.nn.MLP(spec.feature_dim + spec.action_dim, 1, spec.hidden, spec.layers,
                                                activation=jax.nn.relu, key=k))(jax.random.split(critic_key, 2))
    critic = Critic(mlps)
    log_alpha = jnp.asarray(math.log(spec.init_alpha), jnp.float32)
    return SACState(actor, critic, critic, log_alpha,
                    optax.adam(spec.actor_lr).init(_params(actor)),
                    optax.adam(spec.critic_lr).init(_params(critic)),
                    optax.adam(spec.alpha_lr).init(log_alpha))


def features(spec: SACSpec, obs: jax.Array) -> jax.Array:
    """What the networks see of `obs [..., n]`: angles as (sin, cos)."""
    return state_features(obs, spec.angles)


# ----- the squashed Gaussian -------------------------------------------------------------------
def _log1m_tanh2(u):
    """`log(1 - tanh(u)^2)`, stable for large |u|."""
    return 2.0 * (math.log(2.0) - u - jax.nn.softplus(-2.0 * u))


def _gaussian_log_prob(u, mean, log_std):
    return jnp.sum(-0.5 * ((u - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi), axis=-1)


def squashed_sample(mean: jax.Array, log_std: jax.Array, eps: jax.Array, low, high) -> tuple[jax.Array, jax.Array]:
    """`a = c + h tanh(mu + sigma eps)` and `log pi(a)` by the change of variables; shapes `[..., m]`
    in, `([..., m], [...])` out. Differentiable in `mean`, `log_std` (reparameterisation)."""
    low, high = jnp.asarray(low, mean.dtype), jnp.asarray(high, mean.dtype)
    centre, half = (high + low) / 2, (high - low) / 2
    u = mean + jnp.exp(log_std) * eps
    log_prob = _gaussian_log_prob(u, mean, log_std) - jnp.sum(jnp.log(half) + _log1m_tanh2(u), axis=-1)
    return centre + half * jnp.tanh(u), log_prob


def squashed_log_prob(mean: jax.Array, log_std: jax.Array, action: jax.Array, low, high) -> jax.Array:
    """`log pi(a)` of a given action `a [..., m]` strictly inside the bounds (inverts the squash)."""
    low, high = jnp.asarray(low, mean.dtype), jnp.asarray(high, mean.dtype)
    centre, half = (high + low) / 2, (high - low) / 2
    y = jnp.clip((action - centre) / half, -1 + 1e-6, 1 - 1e-6)
    u = jnp.arctanh(y)
    return _gaussian_log_prob(u, mean, log_std) - jnp.sum(jnp.log(half) + _log1m_tanh2(u), axis=-1)


def policy(spec: SACSpec, actor: Actor, obs: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sample `a ~ pi_phi(. | s)` for `obs [B, n]` -> `(action [B, m], log_prob [B])`."""
    mean, log_std = jax.vmap(actor)(features(spec, obs))
    eps = jax.random.normal(key, mean.shape, mean.dtype)
    return squashed_sample(mean, log_std, eps, spec.action_low, spec.action_high)


def policy_mode(spec: SACSpec, actor: Actor, obs: jax.Array) -> jax.Array:
    """The deterministic action `c + h tanh(mu_phi(s))` for `obs [B, n]` -> `[B, m]`."""
    mean, _ = jax.vmap(actor)(features(spec, obs))
    centre, half = spec.centre_and_half_width()
    return centre + half * jnp.tanh(mean)


def q_values(spec: SACSpec, critic: Critic, obs: jax.Array, action: jax.Array) -> jax.Array:
    """Both critics at `obs [B, n]`, `action [B, m]` -> `[2, B]` (actions fed scaled to [-1, 1])."""
    centre, half = spec.centre_and_half_width()
    return critic(features(spec, obs), (action - centre) / half)


# ----- the losses ----------------------------------------------------------------------------
def soft_value(spec: SACSpec, actor: Actor, critic: Critic, log_alpha: jax.Array, obs: jax.Array,
               key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`V(s) = min_j Q_j(s, a) - alpha log pi(a | s)` with `a ~ pi(. | s)` reparameterised, for
    `obs [B, n]` -> `(V [B], log_prob [B])`; differentiable in the actor's parameters."""
    action, log_prob = policy(spec, actor, obs, key)
    q = jnp.min(q_values(spec, critic, obs, action), axis=0)
    return q - jnp.exp(log_alpha) * log_prob, log_prob


def td_target(spec: SACSpec, state: SACState, batch: Batch, key: jax.Array, aux: Any = None) -> jax.Array:
    """The soft one-step TD target `y = r + gamma (1 - d) V'(s')` for every transition `[B]`,
    with `V'(s') = min_j Q_theta'j(s', a') - alpha log pi(a' | s')`, `a' ~ pi_phi(. | s')`.

    This is the function MVE replaces (`aux` carries what its replacement needs, e.g. a model);
    its horizon-0 case must equal this one."""
    next_value, _ = soft_value(spec, state.actor, state.target_critic, state.log_alpha, batch.next_obs, key)
    return batch.reward + spec.gamma * (1.0 - batch.done.astype(batch.reward.dtype)) * next_value


def critic_loss(critic: Critic, spec: SACSpec, batch: Batch, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`sum_j 0.5 mean_B (Q_thetaj(s, a) - y)^2` and the mean Q (for logging)."""
    q = q_values(spec, critic, batch.obs, batch.action)
    return jnp.sum(0.5 * jnp.mean((q - y[None]) ** 2, axis=1)), jnp.mean(q)


def actor_loss(actor: Actor, spec: SACSpec, critic: Critic, log_alpha: jax.Array, obs: jax.Array,
               key: jax.Array, aux: Any = None) -> tuple[jax.Array, jax.Array]:
    """`-mean_B V(s)` (see `soft_value`), minimised over the actor; returns `(loss, log_prob [B])`.

    This is the function SVG/MAAC replaces (`aux` carries its model); the replacement returns the
    log-probabilities of its actions at `obs`, which the temperature update uses."""
    value, log_prob = soft_value(spec, actor, _stop_gradient(critic), jax.lax.stop_gradient(log_alpha), obs, key)
    return -jnp.mean(value), log_prob


def _stop_gradient(tree):
    return jax.tree.map(lambda a: jax.lax.stop_gradient(a) if eqx.is_array(a) else a, tree)


TargetFn = Callable[[SACSpec, SACState, Batch, jax.Array, Any], jax.Array]
ActorLossFn = Callable[[Actor, SACSpec, Critic, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, jax.Array]]


def update_step(spec: SACSpec, state: SACState, batch: Batch, key: jax.Array,
                target: TargetFn = td_target, aux: Any = None,
                actor_objective: ActorLossFn = actor_loss) -> tuple[SACState, dict[str, jax.Array]]:
    """One SAC step on `batch`: critics towards `target(...)`, then the actor against the updated
    critics (minimising `actor_objective`), then the temperature, then the Polyak average of the
    targets."""
    target_key, actor_key = jax.random.split(key)
    y = jax.lax.stop_gradient(target(spec, state, batch, target_key, aux))
    (c_loss, q_mean), grads = eqx.filter_value_and_grad(critic_loss, has_aux=True)(state.critic, spec, batch, y)
    updates, critic_opt = optax.adam(spec.critic_lr).update(grads, state.critic_opt, _params(state.critic))
    critic = eqx.apply_updates(state.critic, updates)

    (a_loss, log_prob), grads = eqx.filter_value_and_grad(actor_objective, has_aux=True)(
        state.actor, spec, critic, state.log_alpha, batch.obs, actor_key, aux)
    updates, actor_opt = optax.adam(spec.actor_lr).update(grads, state.actor_opt, _params(state.actor))
    actor = eqx.apply_updates(state.actor, updates)

    # d/d(log alpha) of -log_alpha * mean(log pi + target entropy)
    entropy_gap = jax.lax.stop_gradient(jnp.mean(log_prob) + spec.entropy_target)
    updates, alpha_opt = optax.adam(spec.alpha_lr).update(-entropy_gap, state.alpha_opt, state.log_alpha)
    log_alpha = optax.apply_updates(state.log_alpha, updates)

    target_critic = jax.tree.map(lambda new, old: spec.tau * new + (1 - spec.tau) * old if eqx.is_array(new) else old,
                                 critic, state.target_critic)
    metrics = {"critic_loss": c_loss, "actor_loss": a_loss, "alpha": jnp.exp(log_alpha),
               "entropy": -jnp.mean(log_prob), "q": q_mean}
    return SACState(actor, critic, target_critic, log_alpha, actor_opt, critic_opt, alpha_opt), metrics


def train_steps(spec: SACSpec, state: SACState, pools: tuple[Pool, ...], counts: tuple[int, ...],
                key: jax.Array, steps: int, target: TargetFn = td_target,
                aux: Any = None, actor_objective: ActorLossFn = actor_loss) -> tuple[SACState, dict[str, jax.Array]]:
    """`steps` SAC updates in one `lax.scan`; each minibatch takes `counts[i]` transitions from
    `pools[i]` (MBPO mixes real and model data this way), drawn inside the scan. Returns the new
    state and each metric's mean over the steps."""
    if len(pools) != len(counts) or sum(counts) < 1 or min(counts) < 0:
        raise ForethoughtError(f"train_steps: counts must give a non-negative batch size per pool "
                               f"({len(pools)} pools), summing to >= 1; got {counts}")
    if steps < 1:
        raise ForethoughtError(f"train_steps: steps must be >= 1, got {steps}")
    params, static = eqx.partition(state, eqx.is_array)

    def body(params, step_key):
        keys = jax.random.split(step_key, len(pools) + 1)
        parts = [sample(pool, k, n) for pool, k, n in zip(pools, keys[1:], counts) if n > 0]
        batch = jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
        new_state, metrics = update_step(spec, eqx.combine(params, static), batch, keys[0], target, aux,
                                         actor_objective)
        # a step whose losses or new parameters hold NaN or inf is thrown away (faults.py)
        new_params, ok = keep_finite(eqx.filter(new_state, eqx.is_array), params, all_finite(metrics))
        return new_params, (metrics, ~ok)

    params, (metrics, bad) = jax.lax.scan(body, params, jax.random.split(key, steps))
    finite_mean = lambda m: jnp.sum(jnp.where(bad, 0.0, m)) / jnp.maximum(jnp.sum(~bad), 1)  # noqa: E731
    metrics = jax.tree.map(finite_mean, metrics)
    metrics["skipped_updates"] = jnp.sum(bad)
    return eqx.combine(params, static), metrics


_update = eqx.filter_jit(train_steps)


def update(spec: SACSpec, state: SACState, pools: tuple[Pool, ...], counts: tuple[int, ...],
           key: jax.Array, steps: int, target: TargetFn = td_target,
           aux: Any = None, actor_objective: ActorLossFn = actor_loss) -> tuple[SACState, dict[str, jax.Array]]:
    """`train_steps` jitted (`spec`, `counts`, `steps`, `target` and `actor_objective` are
    static), with skipped updates reported (`check_skipped`)."""
    state, metrics = _update(spec, state, pools, counts, key, steps, target, aux, actor_objective)
    check_skipped(state, metrics)
    return state, metrics


def check_skipped(state: SACState, metrics: dict[str, jax.Array]) -> None:
    """Report (`faults.report`) the updates of a `train_steps` call that produced NaN or inf."""
    skipped = int(metrics["skipped_updates"])
    if skipped:
        done = int(jax.tree_util.tree_leaves(state.critic_opt)[0])  # Adam's count of good updates
        faults.report("SAC update", f"update {done}", f"{skipped} update(s) gave NaN or inf losses or "
                      "parameters (critic, actor or temperature) and were skipped")
