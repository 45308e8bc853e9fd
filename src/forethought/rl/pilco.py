"""PILCO's policy search: policies with analytic moments, the saturating cost, the moment-matched
rollout and its optimisation (seed 003, "Case study: PILCO" to "PILCO Summary"; Deisenroth and
Rasmussen, ICML 2011; Deisenroth, Fox and Rasmussen, TPAMI 2015).

One step of the predicted rollout keeps a Gaussian over the state `s ~ N(m, S)` and chains the
blocks of `models.moments` on a joint Gaussian:

    z = [s]                                   state, n dims
    z = [s, sin(s_a), cos(s_a)]               trig_block: the angles' features
    f = z[others, sins, coss]                 the features (order of `state_features`)
    c_t = E[cost(f)]                          expected_saturating_cost
    z = [..., u~]                             policy.raw_moments(f): the policy before saturation
    z = [..., u]                              saturation_block: u = u_max (9 sin u~ + sin 3u~) / 8
    Delta ~ model.propagate([f, u])           GP moment matching (with its noise), V = S^-1 cov
    s' = s + Delta,  cov[s, Delta] = cov[s, (f, u)] V

so the state's next mean and covariance are `m + M` and `S + S_Delta + C + C^T`. The expected
total cost `J(theta) = sum_t E[c(s_t)]` is a differentiable function of the policy parameters;
its gradient is the chain rule through the rollout (autodiff), and L-BFGS minimises it inside
one jitted function (`optimise_policy`).

Policies (both see the state features `f` and are saturated to the action bounds):

- `LinearPolicy`: `u~ = W f + b`;
- `RBFPolicy`: `u~_j = sum_i w_ji exp(-1/2 (f - c_i)^T Lambda^{-1} (f - c_i))`, the mean of a
  GP with fixed "pseudo-inputs" `c_i`, whose moments are the GP's without the variance term.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from forethought.errors import ForethoughtError
from forethought.models.ensemble import state_features
from forethought.models.gp import se_moments
from forethought.models.moments import (augment, expected_saturating_cost, linear_block, saturate,
                                        saturating_cost, saturation_block, symmetrize, trig_block)


# ----- policies -------------------------------------------------------------------------------

class LinearPolicy(eqx.Module):
    """`u = saturate(W f + b)` on the state features `f`."""

    W: jax.Array
    """`[m, D]`."""
    b: jax.Array
    """`[m]`."""
    u_max: tuple[float, ...] = eqx.field(static=True)

    @classmethod
    def create(cls, feature_dim: int, u_max, key: jax.Array, scale: float = 0.1) -> "LinearPolicy":
        u_max = tuple(float(v) for v in np.atleast_1d(u_max))
        W = scale * jax.random.normal(key, (len(u_max), feature_dim))
        return cls(W, jnp.zeros(len(u_max)), u_max)

    def raw(self, f: jax.Array) -> jax.Array:
        return self.W @ f + self.b

    def raw_moments(self, m: jax.Array, S: jax.Array):
        return linear_block(self.W.astype(m.dtype), self.b.astype(m.dtype))(m, S)

    def __call__(self, f: jax.Array) -> jax.Array:
        return saturate(self.raw(f), jnp.asarray(self.u_max, f.dtype))


class RBFPolicy(eqx.Module):
    """`u = saturate(sum_i w_i exp(-1/2 (f - c_i)^T Lambda^{-1} (f - c_i)))` on the features `f`."""

    centres: jax.Array
    """`c_i`, `[K, D]`."""
    log_lengthscale: jax.Array
    """`log diag(Lambda)^{1/2}`, `[D]`, shared by the action dimensions."""
    weights: jax.Array
    """`w`, `[m, K]`."""
    u_max: tuple[float, ...] = eqx.field(static=True)

    @classmethod
    def create(cls, mean: jax.Array, cov: jax.Array, basis: int, u_max, key: jax.Array,
               lengthscale: float = 1.0) -> "RBFPolicy":
        """Centres drawn from `N(mean, cov)` of the start's features (as PILCO does), small random
        weights (`0.1 N(0, 1)`), length-scales `lengthscale` in feature units."""
        u_max = tuple(float(v) for v in np.atleast_1d(u_max))
        centre_key, weight_key = jax.random.split(key)
        D = mean.shape[0]
        centres = jax.random.multivariate_normal(centre_key, mean, cov, (basis,))
        weights = 0.1 * jax.random.normal(weight_key, (len(u_max), basis))
        return cls(centres, jnp.full(D, np.log(lengthscale)), weights, u_max)

    def raw(self, f: jax.Array) -> jax.Array:
        z = (f - self.centres) * jnp.exp(-self.log_lengthscale)
        return self.weights @ jnp.exp(-0.5 * jnp.sum(z * z, axis=-1))

    def raw_moments(self, m: jax.Array, S: jax.Array):
        out = self.weights.shape[0]
        log_ell = jnp.broadcast_to(self.log_lengthscale, (out, m.shape[0])).astype(m.dtype)
        return se_moments(self.centres.astype(m.dtype), self.weights.astype(m.dtype), log_ell,
                          jnp.zeros(out, m.dtype), m, S)

    def __call__(self, f: jax.Array) -> jax.Array:
        return saturate(self.raw(f), jnp.asarray(self.u_max, f.dtype))


class MomentModel(Protocol):
    def propagate(self, m: jax.Array, S: jax.Array, noise: bool = False): ...


# ----- the saturating cost --------------------------------------------------------------------

class SaturatingCost(eqx.Module):
    """`1 - exp(-1/2 (f - target)^T W (f - target))` on the state features `f`."""

    W: jax.Array
    target: jax.Array

    def __call__(self, f: jax.Array) -> jax.Array:
        return saturating_cost(f, self.W, self.target)

    def expected(self, m: jax.Array, S: jax.Array) -> jax.Array:
        return expected_saturating_cost(m, S, self.W.astype(m.dtype), self.target.astype(m.dtype))

    @property
    def success_threshold(self) -> float:
        """The cost at half a width from the target, `1 - exp(-1/8)`: `success` asks for less."""
        return float(1 - np.exp(-1 / 8))


def tip_cost(system, width: float | None = None) -> SaturatingCost:
    """PILCO's cost for a built-in system: `d^2 / width^2` with `d` the distance of the pole tip
    from where it is upright (pendulum; cart-pole with the cart at the origin, as in PILCO's
    `loss_cp.m`); for a system without angles, the distance of the state from the origin.
    `width` defaults to the system's `cost_width` (cart-pole: 0.25 m) or half its length."""
    from forethought.systems.cartpole import CartPole
    from forethought.systems.pendulum import Pendulum

    if isinstance(system, CartPole):  # features [x, x', theta', sin, cos]
        l = float(system.pole_length)
        width = float(width or system.cost_width)
        C = np.array([[1.0, 0, 0, l, 0], [0, 0, 0, 0, l]])
        target = np.array([0.0, 0, 0, 0, -1])
    elif isinstance(system, Pendulum):  # features [theta', sin, cos]
        l = float(system.length)
        width = float(width or l / 2)
        C = np.array([[0.0, l, 0], [0, 0, l]])
        target = np.array([0.0, 0, -1])
    elif not system.angles:
        width = float(width or 1.0)
        C = np.eye(system.state_dim)
        target = np.zeros(system.state_dim)
    else:
        raise ForethoughtError(f"PILCO has no saturating cost for system {system.name!r}; it knows pendulum, "
                               "cartpole and systems without angles")
    if not width > 0:
        raise ForethoughtError(f"cost width must be > 0, got {width}")
    return SaturatingCost(jnp.asarray(C.T @ C / width**2), jnp.asarray(target))


# ----- the moment-matched rollout ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """Where things sit in the joint Gaussian of one step (static)."""

    state_dim: int
    angles: tuple[int, ...]

    @property
    def features(self) -> list[int]:
        n, k = self.state_dim, len(self.angles)
        others = [i for i in range(n) if i not in self.angles]
        return others + list(range(n, n + 2 * k))

    def feature_moments(self, m: jax.Array, S: jax.Array):
        """Joint Gaussian over `[s, sin(s_a), cos(s_a)]` and the indices of the features in it."""
        if self.angles:
            m, S = augment(m, S, list(range(self.state_dim)), trig_block(self.angles, self.state_dim))
        return m, S, self.features


def step_moments(model: MomentModel, policy, cost: SaturatingCost, layout: Layout, m: jax.Array,
                 S: jax.Array):
    """One predicted step: `N(m, S)` of the state -> `(m', S')` of the next state, and the
    expected cost of the current state (module docstring)."""
    n = layout.state_dim
    m, S, f = layout.feature_moments(m, S)
    c = cost.expected(m[jnp.asarray(f)], S[jnp.ix_(jnp.asarray(f), jnp.asarray(f))])
    K = m.shape[0]
    m, S = augment(m, S, f, policy.raw_moments)
    a = len(policy.u_max)
    m, S = augment(m, S, list(range(K, K + a)), saturation_block(jnp.asarray(policy.u_max, m.dtype)))
    inputs = jnp.asarray(f + list(range(K + a, K + 2 * a)))
    M, SD, V = model.propagate(m[inputs], S[jnp.ix_(inputs, inputs)], noise=True)
    cross = S[:n, inputs] @ V
    return m[:n] + M, symmetrize(S[:n, :n] + SD + cross + cross.T), c


class ParticleModel(eqx.Module):
    """A BNN propagated as Deep PILCO does (Gal, McAllister and Rasmussen 2017; seed 003): each of
    `particles` particles keeps one weight sample for the whole rollout, and after every step the
    cloud is refit to a Gaussian and redrawn from it ("moment matching as a regulariser"). `key`
    fixes the weight samples, the start particles and the redraws, so the expected cost is a
    deterministic, differentiable function of the policy (common random numbers)."""

    bnn: eqx.Module
    key: jax.Array
    particles: int = eqx.field(static=True)


def _particle_predict(model: ParticleModel, policy, cost: SaturatingCost, layout: Layout, m0, S0, steps):
    dynamics = model.bnn.as_dynamics(model.key, model.particles, "ts_inf", moment_matching=True)
    n = layout.state_dim
    eps = jax.random.normal(jax.random.fold_in(model.key, 2), (model.particles, n), m0.dtype)
    X0 = m0 + eps @ jnp.linalg.cholesky(S0 + 1e-12 * jnp.eye(n, dtype=m0.dtype)).T

    def moments_and_cost(X):
        F = state_features(X, layout.angles)
        return X.mean(0), jnp.atleast_2d(jnp.cov(X, rowvar=False)), jnp.mean(cost(F)), F

    def body(X, t):
        m, S, c, F = moments_and_cost(X)
        U = jax.vmap(policy)(F)
        return dynamics(X, U.astype(X.dtype), t), (m, S, c)

    XT, (ms, Ss, cs) = jax.lax.scan(body, X0, jnp.arange(steps))
    mT, ST, cT, _ = moments_and_cost(XT)
    return (jnp.concatenate([ms, mT[None]]), jnp.concatenate([Ss, ST[None]]),
            jnp.concatenate([cs, cT[None]]))


def predict(model: MomentModel | ParticleModel, policy, cost: SaturatingCost, layout: Layout,
            m0: jax.Array, S0: jax.Array, steps: int):
    """The predicted rollout from `N(m0, S0)`: state means `[T+1, n]`, covariances `[T+1, n, n]`
    and expected costs `[T+1]` of every state, the last included; moment-matched through a GP,
    or by Deep PILCO's particles through a `ParticleModel`."""
    if isinstance(model, ParticleModel):
        return _particle_predict(model, policy, cost, layout, m0, S0, steps)

    def body(carry, _):
        m, S = carry
        m_next, S_next, c = step_moments(model, policy, cost, layout, m, S)
        return (m_next, S_next), (m, S, c)

    (mT, ST), (ms, Ss, cs) = jax.lax.scan(body, (m0, S0), None, length=steps)
    mf, Sf, idx = layout.feature_moments(mT, ST)
    idx = jnp.asarray(idx)
    cT = cost.expected(mf[idx], Sf[jnp.ix_(idx, idx)])
    return (jnp.concatenate([ms, mT[None]]), jnp.concatenate([Ss, ST[None]]),
            jnp.concatenate([cs, cT[None]]))


def expected_total_cost(model, policy, cost, layout: Layout, m0, S0, steps: int) -> jax.Array:
    """`J = sum_{t=1..T} E[c(s_t)]` (the start's cost does not depend on the policy)."""
    _, _, costs = predict(model, policy, cost, layout, m0, S0, steps)
    return jnp.sum(costs[1:])


@eqx.filter_jit
def optimise_policy(model, policy, cost, layout: Layout, m0, S0, steps: int, iterations: int,
                    tolerance: float = 0.0):
    """Minimise `expected_total_cost` over the policy's arrays with L-BFGS (line search included)
    in one jitted loop; returns the best policy seen, its cost, the starting cost and the
    iterations taken. It stops after `iterations`, or once an iteration changes the cost by at
    most `tolerance` times its size (0: only when it stalls; the cost is flat far from the target
    early on, where a relative test would stop too soon). A non-finite cost is never kept."""
    params, static = eqx.partition(policy, eqx.is_inexact_array)

    def objective(p):
        return expected_total_cost(model, eqx.combine(p, static), cost, layout, m0, S0, steps)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        i, p, state, best_value, best, _, _ = carry
        value, grad = value_and_grad(p, state=state)
        grad = jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0), grad)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=objective)
        better = jnp.isfinite(value) & (value < best_value)
        best = jax.tree.map(lambda new, old: jnp.where(better, new, old), p, best)
        best_value = jnp.where(better, value, best_value)
        return i + 1, optax.apply_updates(p, updates), state, best_value, best, carry[6], value

    def going(carry):
        i, *_, previous, value = carry
        return (i < iterations) & ~(jnp.abs(previous - value) <= tolerance * jnp.maximum(1.0, jnp.abs(value)))

    dtype = m0.dtype
    inf = jnp.asarray(jnp.inf, dtype)
    initial = objective(params)
    carry = (jnp.asarray(0), params, opt.init(params), inf, params, inf, inf)
    i, p, _, best_value, best, _, _ = jax.lax.while_loop(going, step, carry)
    last = objective(p)
    better = jnp.isfinite(last) & (last < best_value)
    best = jax.tree.map(lambda new, old: jnp.where(better, new, old), p, best)
    best_value = jnp.where(better, last, best_value)
    return eqx.combine(best, static), best_value, initial, i


def policy_action(policy, x: jax.Array, angles: tuple[int, ...]) -> jax.Array:
    """The action the policy takes in state `x [n]`."""
    return policy(state_features(x, angles))
