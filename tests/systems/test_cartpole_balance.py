import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought import systems
from forethought.systems.gym import make_env


@pytest.mark.parametrize("push", [1, 0])
def test_a_step_is_gymnasiums_cartpole_step(push):
    balance = systems.make("cartpole-balance")
    reference = gymnasium.make("CartPole-v1").unwrapped
    reference.reset(seed=0)
    for state in ([0.1, -0.05, 0.2, 0.3], [-1.0, 0.5, 0.1, -0.8]):
        reference.state = np.array(state)  # Gymnasium's order: x, x_dot, theta, theta_dot
        reference.step(push)  # a full push either way, the continuous action +1 or -1
        x, x_dot, theta, theta_dot = reference.state
        ours = balance.dynamics(jnp.array([state[0], state[2], state[1], state[3]], jnp.float32),
                                jnp.array([1.0 if push else -1.0]), 0)
        np.testing.assert_allclose(ours, [x, theta, x_dot, theta_dot], atol=1e-5)


def test_the_episode_ends_when_the_pole_falls_or_the_cart_leaves():
    balance = systems.make("cartpole-balance")
    assert not bool(balance.is_terminal(jnp.zeros(4)))
    assert bool(balance.is_terminal(jnp.array([0.0, 0.25, 0.0, 0.0])))
    assert bool(balance.is_terminal(jnp.array([2.5, 0.0, 0.0, 0.0])))
    env = make_env("cartpole-balance")
    env.reset(seed=0)
    steps, done = 0, False
    while not done:
        _, reward, terminated, truncated, _ = env.step(np.array([1.0], np.float32))
        assert reward == 1.0
        steps, done = steps + 1, terminated or truncated
    assert terminated and steps < 60  # pushing one way topples it quickly


def test_starts_are_uniform_in_the_small_box():
    balance = systems.make("cartpole-balance")
    starts = jax.vmap(balance.initial_state)(jax.random.split(jax.random.key(0), 500))
    assert float(jnp.abs(starts).max()) <= 0.05 and float(starts.std()) > 0.02
