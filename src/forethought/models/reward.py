"""Learned rewards and terminations, for planning in Gymnasium envs whose cost is not known
(seed 000, "Model-Based RL": learn `r(s, a)` beside `p(s' | s, a)`; mbrl-lib's reward and
termination functions, learned instead of written).

`LearnedTask` stands where a built-in system's cost and end test stand in a planner:

    cost(x, u, t)   = -r_hat(x, u)                   an MLP on normalised [x, u], MSE fit
    is_terminal(x') = p_hat(done | x') > 0.5         a logistic MLP on normalised x', fit by
                                                     cross-entropy; never, until an episode in
                                                     the data has ended by termination
    end_probability(x') = p_hat(done | x')           the same, unthresholded: the MPC agents
                                                     plan on the expected accrued cost under it

A user who knows the reward can pass `reward_fn(x, u) -> r` and `termination_fn(x') -> bool`
instead (`LearnedTask.create(..., reward_fn=..., termination_fn=...)`); the learned parts are then
not fit. Fitting is one jitted program of Adam steps over minibatches drawn from the data, which
is padded to a power of two so a growing buffer recompiles only when it crosses one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from forethought.errors import ForethoughtError
from forethought.models.normalize import Normalizer


@dataclasses.dataclass(frozen=True)
class RewardTrainConfig:
    """How to fit the reward and termination networks."""

    steps: int = 1000
    """Adam steps per fit (each on a minibatch)."""
    batch_size: int = 256
    learning_rate: float = 1e-3

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ForethoughtError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ForethoughtError(f"learning_rate must be > 0, got {self.learning_rate}")


class LearnedTask(eqx.Module):
    """A task's reward and end test for a planner (module docstring): `cost`, `is_terminal`,
    action bounds, and the sizes a planner reads. Immutable; `fit` returns a new one."""

    reward_net: eqx.nn.MLP
    done_net: eqx.nn.MLP
    input_norm: Normalizer
    reward_norm: Normalizer
    state_norm: Normalizer
    seen_ends: jax.Array
    action_low: jax.Array
    action_high: jax.Array
    reward_fn: Callable | None = eqx.field(static=True, default=None)
    termination_fn: Callable | None = eqx.field(static=True, default=None)
    terminates: bool = eqx.field(static=True, default=True)
    angles: tuple[int, ...] = eqx.field(static=True, default=())

    @classmethod
    def create(cls, state_dim: int, action_low, action_high, key: jax.Array, *, hidden: int = 200,
               layers: int = 2, reward_fn: Callable | None = None,
               termination_fn: Callable | None = None) -> "LearnedTask":
        low = jnp.asarray(action_low, jnp.float32).reshape(-1)
        high = jnp.asarray(action_high, jnp.float32).reshape(-1)
        m = low.shape[0]
        k1, k2 = jax.random.split(key)
        return cls(
            reward_net=eqx.nn.MLP(state_dim + m, "scalar", hidden, layers, activation=jax.nn.silu, key=k1),
            done_net=eqx.nn.MLP(state_dim, "scalar", hidden, layers, activation=jax.nn.silu, key=k2),
            input_norm=Normalizer.identity(state_dim + m), reward_norm=Normalizer.identity(1),
            state_norm=Normalizer.identity(state_dim), seen_ends=jnp.zeros((), bool),
            action_low=low, action_high=high, reward_fn=reward_fn, termination_fn=termination_fn)

    @property
    def state_dim(self) -> int:
        return self.state_norm.mean.shape[0]

    @property
    def action_dim(self) -> int:
        return self.action_low.shape[0]

    def reward(self, x, u):
        """The (learned or given) reward of taking `u [m]` in `x [n]`."""
        if self.reward_fn is not None:
            return self.reward_fn(x, u)
        z = self.input_norm(jnp.concatenate([x, u]))
        return self.reward_norm.inverse(self.reward_net(z)[None])[0]

    def cost(self, x, u, t=0):
        return -self.reward(x, u)

    def done_probability(self, x):
        """The learned probability that an episode ends on reaching `x`."""
        return jax.nn.sigmoid(self.done_net(self.state_norm(x)))

    def is_terminal(self, x):
        if self.termination_fn is not None:
            return jnp.asarray(self.termination_fn(x), bool)
        return self.seen_ends & (self.done_probability(x) > 0.5)

    def end_probability(self, x):
        """The probability that an episode ends on reaching `x`: the learned one (0 until an end
        has been seen), or 0/1 from a given `termination_fn`. A planner that weighs costs by it
        (`rollout_costs(end_probability=)`) prefers plans that stay far from the learned edge."""
        if self.termination_fn is not None:
            return jnp.asarray(self.termination_fn(x), jnp.float32)
        return jnp.where(self.seen_ends, self.done_probability(x), 0.0)

    def fit(self, obs, action, reward, next_obs, terminated, key: jax.Array,
            config: RewardTrainConfig = RewardTrainConfig()) -> "LearnedTask":
        """Refit the learned parts on a buffer's transitions (warm-started from the current nets)."""
        obs, action, next_obs = (np.asarray(a, np.float32) for a in (obs, action, next_obs))
        reward = np.asarray(reward, np.float32).reshape(-1)
        terminated = np.asarray(terminated, bool).reshape(-1)
        N = obs.shape[0]
        if N == 0:
            raise ForethoughtError("LearnedTask.fit: the buffer is empty")
        for name, value in (("action", action), ("reward", reward), ("next_obs", next_obs),
                            ("terminated", terminated)):
            if value.shape[0] != N:
                raise ForethoughtError(f"LearnedTask.fit: {name} has {value.shape[0]} rows, obs has {N}")
        inputs = np.concatenate([obs, action], axis=1)
        task = dataclasses.replace(self, input_norm=Normalizer.fit(jnp.asarray(inputs)),
                                   reward_norm=Normalizer.fit(jnp.asarray(reward[:, None])),
                                   state_norm=Normalizer.fit(jnp.asarray(next_obs)),
                                   seen_ends=jnp.asarray(bool(terminated.any())))
        size = 1 << max(0, math.ceil(math.log2(N)))
        pad = lambda a: np.concatenate([a, np.zeros((size - N,) + a.shape[1:], a.dtype)])  # noqa: E731
        data = (pad(inputs), pad(reward), pad(next_obs), pad(terminated.astype(np.float32)))
        reward_net, done_net = _fit(task, tuple(jnp.asarray(a) for a in data), jnp.asarray(N), key,
                                    config.steps, config.batch_size, config.learning_rate)
        return dataclasses.replace(task, reward_net=reward_net, done_net=done_net)


@eqx.filter_jit
def _fit(task: LearnedTask, data, count, key, steps: int, batch_size: int, learning_rate: float):
    inputs, reward, next_obs, done = data
    optimizer = optax.adam(learning_rate)
    nets = (task.reward_net, task.done_net)
    params, static = eqx.partition(nets, eqx.is_inexact_array)
    # terminations are rare: weigh the two classes equally in the cross-entropy
    valid = jnp.arange(inputs.shape[0]) < count
    positives = jnp.sum(done * valid)
    weight_pos = jnp.where(positives > 0, 0.5 * count / jnp.maximum(positives, 1.0), 0.0)
    weight_neg = 0.5 * count / jnp.maximum(count - positives, 1.0)

    def loss(p, idx):
        reward_net, done_net = eqx.combine(p, static)
        z = jax.vmap(task.input_norm)(inputs[idx])
        target = (reward[idx] - task.reward_norm.mean[0]) / task.reward_norm.std[0]
        reward_loss = jnp.mean((jax.vmap(reward_net)(z) - target) ** 2)
        logits = jax.vmap(done_net)(jax.vmap(task.state_norm)(next_obs[idx]))
        y = done[idx]
        w = jnp.where(y > 0.5, weight_pos, weight_neg)
        done_loss = jnp.mean(w * optax.sigmoid_binary_cross_entropy(logits, y))
        return reward_loss + done_loss

    def step(carry, k):
        p, opt = carry
        idx = jax.random.randint(k, (batch_size,), 0, count)
        grad = jax.grad(loss)(p, idx)
        updates, opt = optimizer.update(grad, opt, p)
        return (optax.apply_updates(p, updates), opt), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, steps))
    return eqx.combine(params, static)
