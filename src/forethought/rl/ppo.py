"""Proximal Policy Optimization (Schulman et al. 2017), small: the policy-gradient learner of seed
003's "Solution 1: use policy gradient from model-free RL" (A2C, TRPO, PPO, ...), which does not
multiply Jacobians along a rollout and so does not suffer the exploding gradients of
backpropagation through a long model rollout. `forethought.agents.ppo_model` feeds it imagined
rollouts of a learned ensemble (ME-TRPO style); nothing here knows where the data come from.

- policy `pi_phi(a | s)`: a Gaussian in normalised action units `z` (the box `[low, high]` maps
  to `[-1, 1]`) with a state-dependent mean `mu_phi(s)` and a state-independent log standard
  deviation (one learned number per action dimension). The env gets `c + h clip(z, -1, 1)` with
  `c, h` the box's centre and half-width (`to_action`); the log-density is that of the unclipped
  `z`, as in the usual clipped-Gaussian PPO.
- critic `V_psi(s) = loc + scale v_psi(s)`: the network predicts returns in normalised units;
  before every update `loc, scale` are set to the mean and standard deviation of the batch's
  returns and the last layer is rescaled so that `V` does not change ("preserving outputs" of
  PopArt, van Hasselt et al. 2016), which keeps the value loss well scaled whatever the reward
  units.
- advantages: generalised advantage estimation (GAE, Schulman et al. 2016),
  `delta_t = r_t + gamma (1 - d_t) V(s_{t+1}) - V(s_t)`,
  `A_t = delta_t + gamma lambda (1 - d_t) A_{t+1}`, bootstrapping from `V(s_T)` at the end of the
  batch (a time limit, not an end of the task); returns `A_t + V(s_t)` are the critic's targets.
- the clipped surrogate `L = -E[min(rho A, clip(rho, 1 - eps, 1 + eps) A)]`,
  `rho = pi_new(a | s) / pi_old(a | s)`, whose gradient is zero once `rho` has left the clip range
  in the direction the advantage favours; plus `value_coef` times the value MSE (normalised
  units) less `entropy_coef` times the entropy.

`update` is one jitted call: values and GAE for a batch of trajectories, then `epochs` passes of
`minibatches` shuffled minibatches in a `lax.scan`, Adam with global-norm gradient clipping.
Everything is a pure function of a `PPOState` pytree, so it checkpoints with
`forethought.checkpoint`.

    spec = PPOSpec(obs_dim=2, action_dim=1, action_low=(-4.0,), action_high=(4.0,), angles=(0,))
    state = init(spec, key)
    state, metrics = update(spec, state, trajectories, key)
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from forethought.errors import ForethoughtError
from forethought.models.ensemble import state_features

LOG_STD_MIN, LOG_STD_MAX = -5.0, 1.0


@dataclasses.dataclass(frozen=True)
class PPOSpec:
    """Shapes and hyperparameters of one PPO learner (hashable: jitted code takes it static)."""

    obs_dim: int
    action_dim: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    angles: tuple[int, ...] = ()
    """Observation dimensions that are angles: the networks see their (sin, cos)."""
    hidden: int = 64
    """Units per hidden layer of policy and critic."""
    layers: int = 2
    """Hidden layers of policy and critic."""
    gamma: float = 0.99
    lam: float = 0.95
    """GAE's lambda."""
    clip: float = 0.2
    """The clip range eps of the probability ratio."""
    learning_rate: float = 1e-3
    epochs: int = 5
    """Passes over each batch."""
    minibatches: int = 4
    """Minibatches per pass."""
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    max_grad_norm: float = 0.5
    init_std: float = 0.5
    """Initial policy standard deviation in normalised action units (the box is [-1, 1])."""

    def __post_init__(self):
        for name in ("obs_dim", "action_dim", "hidden", "layers", "epochs", "minibatches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ForethoughtError(f"PPO {name} must be an integer >= 1, got {value!r}")
        if len(self.action_low) != self.action_dim or len(self.action_high) != self.action_dim:
            raise ForethoughtError(f"PPO action_low/high must have {self.action_dim} entries, "
                                   f"got {self.action_low} and {self.action_high}")
        if not all(math.isfinite(lo) and math.isfinite(hi) and lo < hi
                   for lo, hi in zip(self.action_low, self.action_high)):
            raise ForethoughtError(f"PPO needs finite action bounds with low < high, got "
                                   f"{self.action_low} and {self.action_high}")
        if any(not 0 <= i < self.obs_dim for i in self.angles):
            raise ForethoughtError(f"PPO angles must index the observation (0..{self.obs_dim - 1}), got {self.angles}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ForethoughtError(f"PPO {name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("clip", "learning_rate", "max_grad_norm", "init_std"):
            if not getattr(self, name) > 0:
                raise ForethoughtError(f"PPO {name} must be > 0, got {getattr(self, name)}")
        for name in ("value_coef", "entropy_coef"):
            if not getattr(self, name) >= 0:
                raise ForethoughtError(f"PPO {name} must be >= 0, got {getattr(self, name)}")

    @property
    def feature_dim(self) -> int:
        return self.obs_dim + len(self.angles)

    def centre_and_half_width(self) -> tuple[jax.Array, jax.Array]:
        low, high = jnp.asarray(self.action_low, jnp.float32), jnp.asarray(self.action_high, jnp.float32)
        return (high + low) / 2, (high - low) / 2

    def optimizer(self) -> optax.GradientTransformation:
        return optax.chain(optax.clip_by_global_norm(self.max_grad_norm), optax.adam(self.learning_rate))


class Trajectories(NamedTuple):
    """A batch of `N` trajectories of `T` steps, time-major: `obs [T, N, n]`, `z [T, N, m]` (the
    normalised, unclipped action), `log_prob [T, N]` (under the policy that acted), `reward
    [T, N]`, `done [T, N]` (a real end of the task: no bootstrapping past it), `valid [T, N]`
    (false after the end or for dropped steps) and `last_obs [N, n]` (bootstrapped from)."""

    obs: jax.Array
    z: jax.Array
    log_prob: jax.Array
    reward: jax.Array
    done: jax.Array
    valid: jax.Array
    last_obs: jax.Array


class Policy(eqx.Module):
    mlp: eqx.nn.MLP
    log_std: jax.Array


class Critic(eqx.Module):
    mlp: eqx.nn.MLP
    loc: jax.Array
    scale: jax.Array


class PPOState(eqx.Module):
    policy: Policy
    critic: Critic
    opt_state: optax.OptState


def _params(policy_and_critic):
    return eqx.filter(policy_and_critic, eqx.is_inexact_array)


def init(spec: PPOSpec, key: jax.Array) -> PPOState:
    """A fresh learner: small final-layer weights so the first policy is centred with `init_std`."""
    k1, k2 = jax.random.split(key)
    mlp = eqx.nn.MLP(spec.feature_dim, spec.action_dim, spec.hidden, spec.layers, activation=jnp.tanh, key=k1)
    last = lambda m: m.layers[-1].weight  # noqa: E731
    mlp = eqx.tree_at(last, mlp, 0.01 * last(mlp))
    policy = Policy(mlp, jnp.full((spec.action_dim,), math.log(spec.init_std), jnp.float32))
    critic = Critic(eqx.nn.MLP(spec.feature_dim, "scalar", spec.hidden, spec.layers, activation=jnp.tanh, key=k2),
                    jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32))
    return PPOState(policy, critic, spec.optimizer().init(_params((policy, critic))))


def features(spec: PPOSpec, obs: jax.Array) -> jax.Array:
    return state_features(obs, spec.angles)


def distribution(spec: PPOSpec, policy: Policy, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean `[..., m]` and log-std `[..., m]` of `z` at observations `[..., n]`."""
    f = features(spec, obs)
    mean = jnp.vectorize(policy.mlp, signature="(k)->(m)")(f)
    log_std = jnp.clip(policy.log_std, LOG_STD_MIN, LOG_STD_MAX)
    return mean, jnp.broadcast_to(log_std, mean.shape)


def log_prob(mean: jax.Array, log_std: jax.Array, z: jax.Array) -> jax.Array:
    """`log N(z; mean, exp(log_std)^2)`, summed over the last axis."""
    return jnp.sum(-0.5 * ((z - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi), axis=-1)


def sample(spec: PPOSpec, policy: Policy, obs: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`z ~ pi(. | obs)` and its log-density; the env action is `to_action(spec, z)`."""
    mean, log_std = distribution(spec, policy, obs)
    z = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape, mean.dtype)
    return z, log_prob(mean, log_std, z)


def to_action(spec: PPOSpec, z: jax.Array) -> jax.Array:
    """Normalised `z` to the action box: `c + h clip(z, -1, 1)`."""
    centre, half = spec.centre_and_half_width()
    return centre + half * jnp.clip(z, -1.0, 1.0)


def mode(spec: PPOSpec, policy: Policy, obs: jax.Array) -> jax.Array:
    """The deterministic action `c + h clip(mu(s), -1, 1)`."""
    return to_action(spec, distribution(spec, policy, obs)[0])


def value(spec: PPOSpec, critic: Critic, obs: jax.Array) -> jax.Array:
    """`V(s)` in reward units, `[...]`."""
    v = jnp.vectorize(critic.mlp, signature="(k)->()")(features(spec, obs))
    return critic.loc + critic.scale * v


def gae(reward: jax.Array, values: jax.Array, done: jax.Array, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """Advantages and returns `[T, ...]` from `reward [T, ...]`, `values [T + 1, ...]` (the last
    row bootstraps) and `done [T, ...]`, by the backward recursion of the module docstring."""
    notdone = 1.0 - done.astype(reward.dtype)
    delta = reward + gamma * notdone * values[1:] - values[:-1]

    def back(carry, x):
        d, nd = x
        a = d + gamma * lam * nd * carry
        return a, a

    _, adv = jax.lax.scan(back, jnp.zeros_like(reward[0]), (delta, notdone), reverse=True)
    return adv, adv + values[:-1]


def clipped_surrogate(new_log_prob: jax.Array, old_log_prob: jax.Array, advantage: jax.Array, clip: float,
                      weights: jax.Array | None = None) -> jax.Array:
    """`-mean(min(rho A, clip(rho, 1 - eps, 1 + eps) A))`, `rho = exp(new - old)` (weighted mean)."""
    ratio = jnp.exp(new_log_prob - old_log_prob)
    per = jnp.minimum(ratio * advantage, jnp.clip(ratio, 1 - clip, 1 + clip) * advantage)
    if weights is None:
        return -jnp.mean(per)
    return -jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _rescale(critic: Critic, loc: jax.Array, scale: jax.Array) -> Critic:
    """New normalisation `(loc, scale)` with the last layer adjusted so `V` is unchanged (PopArt)."""
    last = critic.mlp.layers[-1]
    weight = last.weight * critic.scale / scale
    bias = (critic.scale * last.bias + critic.loc - loc) / scale
    mlp = eqx.tree_at(lambda m: (m.layers[-1].weight, m.layers[-1].bias), critic.mlp, (weight, bias))
    return Critic(mlp, loc, scale)


def _loss(params, static, spec: PPOSpec, obs, z, old_log_prob, adv, target, weights):
    policy, critic = eqx.combine(params, static)
    mean, log_std = distribution(spec, policy, obs)
    new_log_prob = log_prob(mean, log_std, z)
    adv = (adv - jnp.sum(adv * weights) / jnp.maximum(jnp.sum(weights), 1.0))
    adv = adv / (jnp.sqrt(jnp.sum(adv**2 * weights) / jnp.maximum(jnp.sum(weights), 1.0)) + 1e-8)
    pg = clipped_surrogate(new_log_prob, old_log_prob, adv, spec.clip, weights)
    v_norm = jnp.vectorize(critic.mlp, signature="(k)->()")(features(spec, obs))
    target_norm = (target - critic.loc) / critic.scale
    v_loss = 0.5 * jnp.sum((v_norm - target_norm) ** 2 * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    entropy = jnp.sum(log_std[0] + 0.5 * math.log(2 * math.pi * math.e))
    ratio = jnp.exp(new_log_prob - old_log_prob)
    clipped = jnp.sum((jnp.abs(ratio - 1) > spec.clip) * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    loss = pg + spec.value_coef * v_loss - spec.entropy_coef * entropy
    return loss, {"policy_loss": pg, "value_loss": v_loss, "entropy": entropy, "clip_fraction": clipped}


def update_fn(spec: PPOSpec, state: PPOState, batch: Trajectories, key: jax.Array) -> tuple[PPOState, dict]:
    """One PPO update on `batch` (traceable; `update` is it jitted). Returns the new state and
    mean metrics (`policy_loss`, `value_loss`, `entropy`, `clip_fraction`, `return`)."""
    T, N = batch.reward.shape
    all_obs = jnp.concatenate([batch.obs, batch.last_obs[None]], axis=0)
    values = value(spec, state.critic, all_obs)
    valid = batch.valid.astype(jnp.float32)
    adv, ret = gae(batch.reward * valid, values, batch.done | ~batch.valid, spec.gamma, spec.lam)
    # renormalise the critic to this batch's returns, keeping V itself unchanged
    count = jnp.maximum(jnp.sum(valid), 1.0)
    loc = jnp.sum(ret * valid) / count
    scale = jnp.maximum(jnp.sqrt(jnp.sum((ret - loc) ** 2 * valid) / count), 1e-3)
    critic = _rescale(state.critic, loc, scale)

    flat = lambda a: a.reshape(T * N, *a.shape[2:])  # noqa: E731
    obs, z, old, adv, ret, weights = map(flat, (batch.obs, batch.z, batch.log_prob, adv, ret, valid))
    size = T * N
    B = max(size // spec.minibatches, 1)
    optimizer = spec.optimizer()
    params, static = eqx.partition((state.policy, critic), eqx.is_inexact_array)

    def epoch(carry, epoch_key):
        order = jax.random.permutation(epoch_key, size)[: spec.minibatches * B].reshape(spec.minibatches, B)

        def step(carry, index):
            params, opt_state = carry
            (_, metrics), grads = jax.value_and_grad(_loss, has_aux=True)(
                params, static, spec, obs[index], z[index], old[index], adv[index], ret[index], weights[index])
            # the normalisation is data, not a parameter
            grads = (grads[0], eqx.tree_at(lambda c: (c.loc, c.scale), grads[1],
                                           (jnp.zeros_like(grads[1].loc), jnp.zeros_like(grads[1].scale))))
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), metrics

        return jax.lax.scan(step, carry, order)

    (params, opt_state), metrics = jax.lax.scan(epoch, (params, state.opt_state), jax.random.split(key, spec.epochs))
    policy, critic = eqx.combine(params, static)
    metrics = {k: jnp.mean(v) for k, v in metrics.items()}
    metrics["return"] = jnp.sum(batch.reward * valid) / N
    return PPOState(policy, critic, opt_state), metrics


update = eqx.filter_jit(update_fn)

__all__ = ["PPOSpec", "PPOState", "Trajectories", "Policy", "Critic", "init", "distribution", "log_prob", "sample",
           "to_action", "mode", "value", "gae", "clipped_surrogate", "update_fn", "update"]
