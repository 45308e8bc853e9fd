"""A learned state value for the tail of a planning horizon (seed 003, "use value function for tail
return"; the terminal value of MPC with a learned value, as in POLO and LOOP).

A planner that sums rewards over H steps is blind to what happens after them: on a task whose only
reward is staying alive (Gymnasium's InvertedPendulum), every plan that survives the horizon ties,
and the cart drifts into the end of its rail. `StateValue` estimates the discounted return that
follows a state under the agent's own closed loop,

    V(x) ~ E[ r_0 + gamma r_1 + gamma^2 r_2 + ... | x_0 = x ],

fit by TD(0) on the real transitions of the buffer: `V(s) <- r + gamma (1 - terminated) V'(s')`,
where `V'` is a Polyak-averaged copy (the target network) and a transition cut by a time limit
(truncated, not terminated) bootstraps. No model is involved, so the value is as good as the data
and carries the behaviour of the policies that collected it (here the MPC agent itself). The
network predicts `V * (1 - gamma) / reward_scale`, which keeps its targets near [-1, 1].
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from forethought.errors import ForethoughtError
from forethought.models.normalize import Normalizer


@dataclasses.dataclass(frozen=True)
class ValueTrainConfig:
    """How to fit a `StateValue` by TD(0)."""

    steps: int = 2000
    """Adam steps per fit (each on a minibatch of transitions)."""
    batch_size: int = 256
    learning_rate: float = 1e-3
    tau: float = 0.01
    """Polyak rate of the target network, per step."""

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ForethoughtError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ForethoughtError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 < self.tau <= 1:
            raise ForethoughtError(f"tau must be in (0, 1], got {self.tau}")


class StateValue(eqx.Module):
    """`V(x)`: the discounted return after state `x` (module docstring). Immutable; `fit` returns a
    new one, warm-started from this one."""

    net: eqx.nn.MLP
    norm: Normalizer
    reward_scale: jax.Array
    gamma: float = eqx.field(static=True)

    @classmethod
    def create(cls, state_dim: int, key: jax.Array, *, gamma: float = 0.99, hidden: int = 64,
               layers: int = 2) -> "StateValue":
        if not 0 <= gamma < 1:
            raise ForethoughtError(f"gamma must be in [0, 1), got {gamma}")
        net = eqx.nn.MLP(state_dim, "scalar", hidden, layers, activation=jax.nn.silu, key=key)
        return cls(net, Normalizer.identity(state_dim), jnp.ones((), jnp.float32), float(gamma))

    def __call__(self, x: jax.Array) -> jax.Array:
        """The value of one state `x [n]`."""
        return self._scaled(self.net, x) * self.reward_scale / (1.0 - self.gamma)

    def _scaled(self, net, x):
        return net(self.norm(x))

    def fit(self, obs, reward, next_obs, terminated, key: jax.Array,
            config: ValueTrainConfig = ValueTrainConfig()) -> "StateValue":
        """Refit by TD(0) on transitions `(obs [N, n], reward [N], next_obs [N, n], terminated [N])`."""
        obs, next_obs = (np.asarray(a, np.float32) for a in (obs, next_obs))
        reward = np.asarray(reward, np.float32).reshape(-1)
        terminated = np.asarray(terminated, bool).reshape(-1)
        N = obs.shape[0]
        if N == 0:
            raise ForethoughtError("StateValue.fit: no transitions")
        for name, value in (("reward", reward), ("next_obs", next_obs), ("terminated", terminated)):
            if value.shape[0] != N:
                raise ForethoughtError(f"StateValue.fit: {name} has {value.shape[0]} rows, obs has {N}")
        for name, value in (("obs", obs), ("reward", reward), ("next_obs", next_obs)):
            if not np.all(np.isfinite(value)):
                raise ForethoughtError(f"StateValue.fit: {name} holds NaN or inf")
        scale = max(float(np.max(np.abs(reward))), 1e-6)
        value = dataclasses.replace(self, norm=Normalizer.fit(jnp.asarray(np.concatenate([obs, next_obs]))),
                                    reward_scale=jnp.asarray(scale, jnp.float32))
        size = 1 << max(0, math.ceil(math.log2(N)))  # a growing buffer recompiles at powers of two only
        pad = lambda a: np.concatenate([a, np.zeros((size - N,) + a.shape[1:], a.dtype)])  # noqa: E731
        data = (pad(obs), pad(reward / scale), pad(next_obs), pad(terminated.astype(np.float32)))
        net = _fit_td(value, tuple(jnp.asarray(a) for a in data), jnp.asarray(N), key, config.steps,
                      config.batch_size, config.learning_rate, config.tau)
        return dataclasses.replace(value, net=net)


@eqx.filter_jit
def _fit_td(value: StateValue, data, count, key, steps: int, batch_size: int, learning_rate: float,
            tau: float):
    obs, reward, next_obs, terminated = data
    gamma = value.gamma
    optimizer = optax.adam(learning_rate)
    params, static = eqx.partition(value.net, eqx.is_inexact_array)

    def loss(p, target_p, idx):
        net, target = eqx.combine(p, static), eqx.combine(target_p, static)
        v = jax.vmap(lambda x: value._scaled(net, x))(obs[idx])
        v_next = jax.vmap(lambda x: value._scaled(target, x))(next_obs[idx])
        # in units of V (1 - gamma) / scale: y = (1 - gamma) r + gamma (1 - d) v'
        y = (1.0 - gamma) * reward[idx] + gamma * (1.0 - terminated[idx]) * jax.lax.stop_gradient(v_next)
        return jnp.mean((v - y) ** 2)

    def step(carry, k):
        p, target_p, opt = carry
        idx = jax.random.randint(k, (batch_size,), 0, count)
        grad = jax.grad(loss)(p, target_p, idx)
        updates, opt = optimizer.update(grad, opt, p)
        p = optax.apply_updates(p, updates)
        target_p = jax.tree.map(lambda t, q: (1.0 - tau) * t + tau * q, target_p, p)
        return (p, target_p, opt), None

    (params, _, _), _ = jax.lax.scan(step, (params, params, optimizer.init(params)),
                                     jax.random.split(key, steps))
    return eqx.combine(params, static)
