"""PPO's pieces: GAE by hand, the clipped surrogate's zero gradient outside the clip range, the
value renormalisation, and a bandit it must solve (and a sign-flipped learner must not)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought import checkpoint
from forethought.errors import ForethoughtError
from forethought.rl import ppo

SPEC = ppo.PPOSpec(obs_dim=1, action_dim=1, action_low=(-1.0,), action_high=(1.0,), hidden=16, epochs=4,
                   minibatches=2, learning_rate=3e-3, init_std=0.5)


def test_gae_equals_the_hand_computation():
    gamma, lam = 0.9, 0.8
    r = np.array([1.0, -2.0, 0.5, 3.0])
    v = np.array([0.2, 0.4, -0.1, 1.0, 2.0])  # V(s_0..s_4), the last bootstraps
    d = np.array([0.0, 1.0, 0.0, 0.0])  # the task ends after step 1: no bootstrapping across it
    delta = [r[0] + gamma * v[1] - v[0], r[1] - v[1], r[2] + gamma * v[3] - v[2], r[3] + gamma * v[4] - v[3]]
    a3 = delta[3]
    a2 = delta[2] + gamma * lam * a3
    a1 = delta[1]
    a0 = delta[0] + gamma * lam * a1
    adv, ret = ppo.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(d, bool), gamma, lam)
    np.testing.assert_allclose(adv, [a0, a1, a2, a3], rtol=1e-6)
    np.testing.assert_allclose(ret, np.array([a0, a1, a2, a3]) + v[:4], rtol=1e-6)
    # lambda = 1, gamma = 1, no ends: the return is the plain sum to go plus the bootstrap
    adv, ret = ppo.gae(jnp.asarray(r), jnp.asarray(v), jnp.zeros(4, bool), 1.0, 1.0)
    np.testing.assert_allclose(ret, np.cumsum(r[::-1])[::-1] + v[4], rtol=1e-6)


@pytest.mark.parametrize("log_ratio,advantage,zero", [
    (0.5, 1.0, True),     # rho = 1.65 > 1.2 with A > 0: no more push up
    (-0.5, -1.0, True),   # rho = 0.61 < 0.8 with A < 0: no more push down
    (0.5, -1.0, False),   # outside, but the unclipped term is the smaller: the gradient pulls back
    (0.1, 1.0, False),    # inside the range
    (-0.1, -1.0, False),
])
def test_the_clipped_loss_has_no_gradient_outside_the_clip_range(log_ratio, advantage, zero):
    old = jnp.array([-1.3])
    grad = jax.grad(lambda new: ppo.clipped_surrogate(new, old, jnp.array([advantage]), 0.2))(old + log_ratio)
    if zero:
        assert float(grad[0]) == 0.0
    else:
        assert abs(float(grad[0])) > 0.5


def test_renormalising_the_critic_keeps_its_values():
    state = ppo.init(ppo.PPOSpec(obs_dim=3, action_dim=1, action_low=(-2.0,), action_high=(2.0,), angles=(0,)),
                     jax.random.key(0))
    spec = ppo.PPOSpec(obs_dim=3, action_dim=1, action_low=(-2.0,), action_high=(2.0,), angles=(0,))
    obs = jax.random.normal(jax.random.key(1), (7, 3))
    before = ppo.value(spec, state.critic, obs)
    after = ppo.value(spec, ppo._rescale(state.critic, jnp.float32(-150.0), jnp.float32(40.0)), obs)
    np.testing.assert_allclose(before, after, rtol=1e-4, atol=1e-4)


def _bandit_batch(state, key, sign, n=256):
    """One-step episodes at a constant observation; reward -(a - 0.6)^2 (times `sign`)."""
    obs = jnp.zeros((1, n, 1))
    z, lp = ppo.sample(SPEC, state.policy, obs, key)
    reward = -sign * (ppo.to_action(SPEC, z)[..., 0] - 0.6) ** 2
    ones = jnp.ones((1, n), bool)
    return ppo.Trajectories(obs, z, lp, reward, ones, ones, obs[0])


@jax.jit
def _train(sign, key):
    params, static = eqx.partition(ppo.init(SPEC, jax.random.key(0)), eqx.is_array)

    def body(params, k):
        state = eqx.combine(params, static)
        batch = _bandit_batch(state, jax.random.fold_in(k, 0), sign)
        state, metrics = ppo.update_fn(SPEC, state, batch, jax.random.fold_in(k, 1))
        return eqx.filter(state, eqx.is_array), metrics["return"]

    params, returns = jax.lax.scan(body, params, jax.random.split(key, 60))
    state = eqx.combine(params, static)
    return ppo.mode(SPEC, state.policy, jnp.zeros((1,)))[0], jnp.exp(state.policy.log_std[0]), returns


def test_ppo_solves_a_bandit_that_a_sign_flipped_learner_does_not():
    action, std, returns = _train(1.0, jax.random.key(3))
    assert abs(float(action) - 0.6) < 0.08, float(action)
    assert float(std) < 0.3  # it grows certain
    assert float(returns[-5:].mean()) > float(returns[:5].mean())
    # the same learner told to minimise the reward runs away from 0.6 (the test can tell them apart)
    broken, _, _ = _train(-1.0, jax.random.key(3))
    assert abs(float(broken) - 0.6) > 0.8, float(broken)


def test_the_state_round_trips_through_a_checkpoint(tmp_path):
    state = ppo.init(SPEC, jax.random.key(4))
    state, _ = ppo.update(SPEC, state, _bandit_batch(state, jax.random.key(5), 1.0, n=16), jax.random.key(6))
    checkpoint.save(tmp_path / "ppo.npz", state)
    loaded, _ = checkpoint.load(tmp_path / "ppo.npz", ppo.init(SPEC, jax.random.key(9)))
    leaves = lambda tree: jax.tree.leaves(eqx.filter(tree, eqx.is_array))  # noqa: E731
    for a, b in zip(leaves(state), leaves(loaded)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("field,value", [("clip", 0.0), ("gamma", 1.5), ("epochs", 0), ("init_std", -1.0),
                                         ("entropy_coef", -0.1), ("minibatches", 2.5)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ForethoughtError, match=field):
        ppo.PPOSpec(**{**dict(obs_dim=1, action_dim=1, action_low=(-1.0,), action_high=(1.0,)), field: value})
