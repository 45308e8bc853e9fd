"""The TD(0) state value of the MPC agents' planning tail (`models/value.py`) against closed forms."""

import jax
import numpy as np
import pytest

from forethought.errors import ForethoughtError
from forethought.models.value import StateValue, ValueTrainConfig

CONFIG = ValueTrainConfig(steps=2000)


def fit(value, data, rounds):
    for i in range(rounds):
        value = value.fit(*data, jax.random.key(i), CONFIG)
    return value


def test_a_chain_that_ends_gets_the_discounted_count_of_steps_left():
    """States 0..K-1 step to the next with reward 1; leaving K-1 ends the episode:
    V(k) = (1 - gamma^(K - k)) / (1 - gamma)."""
    K, gamma = 40, 0.95
    obs = np.arange(K, dtype=np.float32)[:, None]
    data = (obs, np.ones(K), obs + 1, np.arange(K) == K - 1)
    value = fit(StateValue.create(1, jax.random.key(0), gamma=gamma), data, 5)
    predicted = np.asarray(jax.vmap(value)(obs))
    exact = (1 - gamma ** (K - np.arange(K))) / (1 - gamma)
    np.testing.assert_allclose(predicted, exact, atol=0.1)  # on a scale of 0..17


def test_a_transition_cut_by_a_time_limit_bootstraps():
    """Two states that swap forever, reward 2 in state 0 and 0 in state 1, never terminated (the
    data ends by truncation): V(0) = 2 / (1 - gamma^2), V(1) = gamma V(0)."""
    gamma = 0.9
    obs = np.array([[0.0], [1.0]], np.float32)
    data = (obs, np.array([2.0, 0.0]), obs[::-1], np.array([False, False]))
    value = fit(StateValue.create(1, jax.random.key(1), gamma=gamma), data, 5)
    v0 = 2 / (1 - gamma**2)
    np.testing.assert_allclose(np.asarray(jax.vmap(value)(obs)), [v0, gamma * v0], rtol=0.02)


def test_bad_input_is_named():
    value = StateValue.create(2, jax.random.key(0))
    obs = np.zeros((4, 2), np.float32)
    with pytest.raises(ForethoughtError, match="reward has 3 rows, obs has 4"):
        value.fit(obs, np.zeros(3), obs, np.zeros(4, bool), jax.random.key(0))
    with pytest.raises(ForethoughtError, match="next_obs holds NaN"):
        value.fit(obs, np.zeros(4), np.full((4, 2), np.nan), np.zeros(4, bool), jax.random.key(0))
    with pytest.raises(ForethoughtError, match="gamma must be in"):
        StateValue.create(2, jax.random.key(0), gamma=1.0)
    with pytest.raises(ForethoughtError, match="tau must be in"):
        ValueTrainConfig(tau=0.0)
