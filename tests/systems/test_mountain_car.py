import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought import systems

STATES_AND_ACTIONS = [
    ((-0.5, 0.0), 1.0),
    ((-0.3, 0.02), -0.4),
    ((0.1, 0.069), 1.0),  # the velocity is clipped at 0.07
    ((-1.18, -0.05), -1.0),  # hits the left wall: position clipped, velocity zeroed
    ((0.4, 0.06), 0.3),  # reaches the goal
]


@pytest.fixture(scope="module")
def gym_env():
    env = gymnasium.make("MountainCarContinuous-v0")
    env.reset(seed=0)
    yield env.unwrapped
    env.close()


@pytest.mark.parametrize("state, action", STATES_AND_ACTIONS)
def test_a_step_is_gymnasiums(gym_env, state, action):
    gym_env.state = np.array(state, np.float32)
    expected, _, terminated, _, _ = gym_env.step(np.array([action], np.float32))
    car = systems.make("mountain-car")
    x = jnp.asarray(state, jnp.float32)
    x_next = car.dynamics(x, jnp.array([action], jnp.float32))
    np.testing.assert_allclose(x_next, expected, rtol=1e-6, atol=1e-8)
    assert bool(car.is_terminal(x_next)) == terminated


def test_the_goal_is_terminal_and_absorbing():
    car = systems.make("mountain-car")
    assert not bool(car.is_terminal(jnp.array([0.44, 0.05])))
    at_goal = jnp.array([0.45, 0.03])
    assert bool(car.is_terminal(at_goal))
    np.testing.assert_array_equal(car.dynamics(at_goal, jnp.array([1.0])), at_goal)
    assert float(car.cost(at_goal, jnp.array([1.0]))) == 0.0
    assert float(car.cost(jnp.array([-0.5, 0.0]), jnp.array([0.5]))) == pytest.approx(1.025)


def test_total_cost_counts_the_steps_to_the_goal():
    car = systems.make("mountain-car")
    x0 = car.initial_state()
    # Bang-bang on the sign of the velocity pumps energy and reaches the goal.
    x, steps = x0, 0
    U = []
    while not bool(car.is_terminal(x)) and steps < 200:
        u = jnp.array([1.0 if float(x[1]) >= 0 else -1.0])
        U.append(u)
        x = car.dynamics(x, u)
        steps += 1
    assert bool(car.is_terminal(x)) and steps < 150
    U = jnp.stack(U + [jnp.ones(1)] * 10)  # steps after the goal cost nothing
    assert float(car.objective(x0, U)) == pytest.approx(steps * 1.1, rel=1e-5)


def test_start_is_gymnasiums_distribution():
    car = systems.make("mountain-car")
    np.testing.assert_allclose(car.initial_state(), [-0.5, 0.0])
    starts = jax.vmap(car.initial_state)(jax.random.split(jax.random.key(0), 500))
    assert float(starts[:, 0].min()) >= -0.6 and float(starts[:, 0].max()) <= -0.4
    np.testing.assert_array_equal(starts[:, 1], 0.0)
    assert car.horizon == 200
