"""Learned rewards and terminations (`models/reward.py`): a known reward and a known end test are
recovered from random transitions; given functions are used as they are; an empty buffer is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought.errors import ForethoughtError
from forethought.models.reward import LearnedTask, RewardTrainConfig


def _data(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    obs = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    action = rng.uniform(-2, 2, (n, 1)).astype(np.float32)
    reward = -(obs[:, 0] ** 2 + 0.5 * obs[:, 1] * obs[:, 2] + 0.1 * action[:, 0] ** 2)
    next_obs = np.clip(obs + 0.1 * rng.standard_normal(obs.shape), -1.5, 1.5).astype(np.float32)
    terminated = np.abs(next_obs[:, 0]) > 1.0
    return obs, action, reward, next_obs, terminated


def test_a_known_reward_and_end_test_are_recovered():
    obs, action, reward, next_obs, terminated = _data()
    task = LearnedTask.create(3, [-2.0], [2.0], jax.random.key(0), hidden=64)
    task = task.fit(obs, action, reward, next_obs, terminated, jax.random.key(1), RewardTrainConfig(steps=3000))
    test_obs, test_action, test_reward, test_next, test_end = _data(500, seed=1)
    predicted = jax.vmap(task.reward)(jnp.asarray(test_obs), jnp.asarray(test_action))
    assert float(jnp.mean((predicted - test_reward) ** 2)) < 0.01 * float(np.var(test_reward))
    ends = np.asarray(jax.vmap(task.is_terminal)(jnp.asarray(test_next)))
    assert np.mean(ends == test_end) > 0.95
    # the unthresholded probability is the test's: high past the edge, low well inside it
    probe = lambda x0: jnp.asarray(test_next).at[:, 0].set(x0)  # noqa: E731
    for x0 in (-1.3, 1.3):
        assert float(jnp.min(jax.vmap(task.end_probability)(probe(x0)))) > 0.5
    for x0 in (-0.5, 0.0, 0.5):
        assert float(jnp.max(jax.vmap(task.end_probability)(probe(x0)))) < 0.5
    assert np.allclose(jax.vmap(task.cost, in_axes=(0, 0, None))(jnp.asarray(test_obs), jnp.asarray(test_action), 0),
                       -predicted)


def test_no_ends_in_the_data_means_never_terminal():
    obs, action, reward, next_obs, _ = _data(500)
    task = LearnedTask.create(3, [-2.0], [2.0], jax.random.key(0), hidden=16)
    task = task.fit(obs, action, reward, next_obs, np.zeros(500, bool), jax.random.key(1), RewardTrainConfig(steps=50))
    assert not bool(jnp.any(jax.vmap(task.is_terminal)(jnp.asarray(next_obs))))
    assert not bool(jnp.any(jax.vmap(task.end_probability)(jnp.asarray(next_obs)) > 0))


def test_given_functions_are_used_as_they_are():
    task = LearnedTask.create(2, [-1.0], [1.0], jax.random.key(0), reward_fn=lambda x, u: x[0] - u[0],
                              termination_fn=lambda x: x[1] > 0)
    assert float(task.cost(jnp.array([2.0, -1.0]), jnp.array([0.5]))) == -1.5
    assert bool(task.is_terminal(jnp.array([0.0, 1.0]))) and not bool(task.is_terminal(jnp.array([0.0, -1.0])))
    assert float(task.end_probability(jnp.array([0.0, 1.0]))) == 1.0
    assert float(task.end_probability(jnp.array([0.0, -1.0]))) == 0.0


def test_an_empty_buffer_is_refused():
    task = LearnedTask.create(2, [-1.0], [1.0], jax.random.key(0))
    with pytest.raises(ForethoughtError, match="empty"):
        task.fit(np.zeros((0, 2)), np.zeros((0, 1)), np.zeros(0), np.zeros((0, 2)), np.zeros(0, bool), jax.random.key(0))
