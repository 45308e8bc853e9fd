"""SAC's pieces: the squashed Gaussian, the TD target by hand, the FIFO pool, and a bandit it must solve."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought import checkpoint
from forethought.errors import ForethoughtError
from forethought.rl import sac

SPEC = sac.SACSpec(obs_dim=2, action_dim=1, action_low=(-2.0,), action_high=(3.0,), angles=(0,), hidden=16,
                   layers=2, gamma=0.9, init_alpha=0.3, batch_size=8)


def test_the_squashed_gaussian_density_is_the_change_of_variables_of_its_samples():
    mean, log_std = jnp.array([0.4, -1.0]), jnp.array([-0.3, 0.2])
    low, high = jnp.array([-2.0, 0.0]), jnp.array([3.0, 1.0])
    eps = jax.random.normal(jax.random.key(0), (200_000, 2))
    actions, log_probs = sac.squashed_sample(mean, log_std, eps, low, high)
    assert jnp.all((actions > low) & (actions < high))
    # the sample's log-density is the density of the action it produced
    np.testing.assert_allclose(log_probs[:1000], sac.squashed_log_prob(mean, log_std, actions[:1000], low, high),
                               rtol=1e-4, atol=1e-3)
    # per dimension (the density factorises): it integrates to one, and a histogram of samples matches it
    for i in range(2):
        edges = np.linspace(float(low[i]), float(high[i]), 41)
        grid = np.linspace(float(low[i]), float(high[i]), 20001)[1:-1]
        density = np.exp(np.asarray(sac.squashed_log_prob(mean[i:i + 1], log_std[i:i + 1], jnp.asarray(grid)[:, None],
                                                         low[i:i + 1], high[i:i + 1])))
        assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=2e-3)
        counts, _ = np.histogram(np.asarray(actions[:, i]), edges)
        expected = np.array([np.trapezoid(density[(grid >= a) & (grid < b)], grid[(grid >= a) & (grid < b)])
                             for a, b in zip(edges[:-1], edges[1:])])
        np.testing.assert_allclose(counts / len(actions), expected, atol=4e-3)


def test_the_log_density_is_stable_at_saturation():
    action, log_prob = sac.squashed_sample(jnp.array([30.0]), jnp.array([-5.0]), jnp.array([0.0]), -1.0, 1.0)
    assert float(action[0]) == pytest.approx(1.0) and np.isfinite(float(log_prob))


def _mlp(mlp, z):
    """An eqx MLP by hand in NumPy (ReLU hidden layers, linear output)."""
    for i, layer in enumerate(mlp.layers):
        z = np.asarray(layer.weight) @ z + np.asarray(layer.bias)
        if i < len(mlp.layers) - 1:
            z = np.maximum(z, 0.0)
    return z


def test_td_target_matches_a_hand_computation():
    state = sac.init(SPEC, jax.random.key(0))
    # make the target critics differ from the critics, so the test sees which one is used
    state = eqx.tree_at(lambda s: s.target_critic, state,
                        jax.tree.map(lambda a: a * 1.3 if eqx.is_array(a) else a, state.target_critic))
    rng = np.random.default_rng(0)
    batch = sac.Batch(jnp.asarray(rng.normal(size=(4, 2)), jnp.float32), jnp.zeros((4, 1)),
                      jnp.asarray([1.0, -2.0, 0.5, 3.0]), jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
                      jnp.asarray([False, True, False, False]))
    key = jax.random.key(3)
    y = np.asarray(sac.td_target(SPEC, state, batch, key))

    eps = np.asarray(jax.random.normal(key, (4, 1)))
    alpha = math.exp(float(state.log_alpha))
    centre, half = 0.5, 2.5
    for i in range(4):
        s = np.asarray(batch.next_obs[i], np.float64)
        f = np.array([s[1], np.sin(s[0]), np.cos(s[0])])  # angles go last, as (sin, cos)
        out = _mlp(state.actor.mlp, f)
        log_std = sac.LOG_STD_MIN + 0.5 * (sac.LOG_STD_MAX - sac.LOG_STD_MIN) * (np.tanh(out[1]) + 1)
        u = out[0] + np.exp(log_std) * eps[i, 0]
        a = centre + half * np.tanh(u)
        log_pi = (-0.5 * eps[i, 0] ** 2 - log_std - 0.5 * np.log(2 * np.pi)) - np.log(half * (1 - np.tanh(u) ** 2))
        qs = [_mlp(jax.tree.map(lambda x, j=j: x[j] if eqx.is_array(x) else x, state.target_critic.mlps),
                   np.concatenate([f, [(a - centre) / half]]))[0] for j in range(2)]
        expected = float(batch.reward[i]) + 0.9 * (1 - float(batch.done[i])) * (min(qs) - alpha * log_pi)
        assert y[i] == pytest.approx(expected, rel=1e-4, abs=1e-4), i
    assert y[1] == pytest.approx(-2.0)  # a real end: no bootstrap


def test_the_fifo_pool_packs_valid_transitions_and_drops_the_oldest():
    pool = sac.empty_pool(1, 1, capacity=5)

    def batch(values):
        v = jnp.asarray(values, jnp.float32)
        return sac.Batch(v[:, None], v[:, None], v, v[:, None], jnp.zeros(len(values), bool))

    pool = sac.fifo_add(pool, batch([1, 2, 3]), jnp.array([True, False, True]))
    assert int(pool.size) == 2 and pool.data.reward[:2].tolist() == [1, 3]
    pool = sac.fifo_add(pool, batch([4, 5, 6, 7]))
    assert int(pool.size) == 5 and sorted(pool.data.reward.tolist()) == [3, 4, 5, 6, 7]
    pool = sac.fifo_add(pool, batch(list(range(10, 18))))  # more than the capacity: the last five stay
    assert sorted(pool.data.reward.tolist()) == [13, 14, 15, 16, 17]
    drawn = sac.sample(pool, jax.random.key(0), 200)
    assert set(drawn.reward.tolist()) == {13, 14, 15, 16, 17}


def test_padded_pools_sample_only_their_valid_rows():
    pool = sac.padded_pool(np.ones((3, 2)), np.ones((3, 1)), np.array([1.0, 2.0, 3.0]), np.ones((3, 2)),
                           np.zeros(3, bool))
    assert pool.capacity == 1024 and int(pool.size) == 3
    assert set(sac.sample(pool, jax.random.key(1), 500).reward.tolist()) == {1.0, 2.0, 3.0}


def test_sac_finds_the_best_action_of_a_contextual_bandit():
    """One-step episodes (`done`), reward `-10 (a - s/2)^2`, data from uniform random actions: the
    critic must learn the parabola and the actor its peak, `a* = s / 2`, for every context `s`."""
    rng = np.random.default_rng(0)
    s = rng.uniform(-1, 1, (2000, 1)).astype(np.float32)
    a = rng.uniform(-1, 1, (2000, 1)).astype(np.float32)
    pool = sac.padded_pool(s, a, -10 * (a[:, 0] - s[:, 0] / 2) ** 2, s, np.ones(2000, bool))
    spec = sac.SACSpec(1, 1, (-1.0,), (1.0,), hidden=32, actor_lr=3e-3, critic_lr=3e-3, alpha_lr=3e-3,
                       batch_size=64)
    state, metrics = sac.update(spec, sac.init(spec, jax.random.key(0)), (pool,), (64,), jax.random.key(1), 3000)
    contexts = jnp.linspace(-1, 1, 9)[:, None]
    np.testing.assert_allclose(sac.policy_mode(spec, state.actor, contexts)[:, 0], contexts[:, 0] / 2, atol=0.06)
    assert float(metrics["entropy"]) == pytest.approx(-1.0, abs=0.3)  # the temperature found the target
    assert float(metrics["alpha"]) < 0.5


def test_the_state_checkpoints_and_vmaps_over_seeds(tmp_path):
    state = sac.init(SPEC, jax.random.key(0))
    checkpoint.save(tmp_path / "sac.npz", state)
    loaded, _ = checkpoint.load(tmp_path / "sac.npz", sac.init(SPEC, jax.random.key(1)))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(eqx.filter(state, eqx.is_array)),
                                                    jax.tree.leaves(eqx.filter(loaded, eqx.is_array))))
    states = eqx.filter_vmap(lambda k: sac.init(SPEC, k))(jax.random.split(jax.random.key(0), 3))
    assert states.log_alpha.shape == (3,)


@pytest.mark.parametrize("field,value,message", [
    ("action_low", (1.0,), "low < high"),
    ("gamma", 1.5, "gamma"),
    ("angles", (5,), "angles"),
    ("hidden", 0, "hidden"),
])
def test_bad_specs_name_the_field(field, value, message):
    with pytest.raises(ForethoughtError, match=message):
        sac.SACSpec(**{**dict(obs_dim=2, action_dim=1, action_low=(-1.0,), action_high=(1.0,)), field: value})


def test_train_steps_checks_its_batch_counts():
    with pytest.raises(ForethoughtError, match="counts"):
        sac.train_steps(SPEC, sac.init(SPEC, jax.random.key(0)), (sac.empty_pool(2, 1, 4),), (8, 8),
                        jax.random.key(0), 1)
