import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from forethought import systems
from forethought.errors import ForethoughtError
from forethought.systems.gym import SystemEnv, env_id, make_env, system_of


@pytest.mark.parametrize("name", systems.names())
def test_every_registered_env_passes_the_gymnasium_checker(name):
    env = gymnasium.make(env_id(name), render_mode="rgb_array")
    check_env(env.unwrapped, skip_render_check=False)
    frame = env.unwrapped.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3


def test_reward_is_minus_cost_and_episode_truncates_at_the_horizon():
    env = make_env("pendulum", horizon=5)
    system = system_of(env)
    obs, _ = env.reset(seed=3)
    for t in range(5):
        action = np.array([0.5], np.float32)
        expected_next = np.asarray(system.dynamics(obs, action, t))
        expected_reward = -float(system.cost(obs, action, t))
        obs, reward, terminated, truncated, _ = env.step(action)
        np.testing.assert_allclose(obs, expected_next, rtol=1e-6)
        assert reward == pytest.approx(expected_reward, rel=1e-6)
        assert not terminated
        assert truncated == (t == 4)


def test_actions_are_clipped_to_the_bounds():
    env = make_env("pendulum")
    env.reset(seed=0, options={"state": np.zeros(2)})
    big, _, _, _, _ = env.step(np.array([100.0]))
    env.reset(seed=0, options={"state": np.zeros(2)})
    limit, _, _, _, _ = env.step(np.array([system_of(env).max_torque]))
    np.testing.assert_array_equal(big, limit)


def test_reset_is_reproducible_with_a_seed():
    env = make_env("cartpole")
    a, _ = env.reset(seed=7)
    b, _ = env.reset(seed=7)
    c, _ = env.reset(seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("spec,message", [
    ("pendulm", "did you mean 'pendulum'"),
    ("gym:NoSuchEnv-v0", "NoSuchEnv"),
    ("", "non-empty"),
])
def test_bad_env_names_give_one_clear_error(spec, message):
    with pytest.raises(ForethoughtError, match=message):
        make_env(spec)


def test_bad_actions_and_states_are_reported():
    env = make_env("pendulum")
    with pytest.raises(ForethoughtError, match="reset"):
        env.step(np.zeros(1))
    env.reset(seed=0)
    with pytest.raises(ForethoughtError, match=r"action must have shape \(1,\)"):
        env.step(np.zeros(3))
    with pytest.raises(ForethoughtError, match="finite"):
        env.step(np.array([np.nan]))
    with pytest.raises(ForethoughtError, match="options\\['state'\\]"):
        env.reset(options={"state": [np.nan, 0.0]})


def test_a_state_that_blows_up_is_reported_with_the_step():
    env = SystemEnv(systems.make("pendulum", dt=1e30))
    env.reset(seed=0, options={"state": np.array([1.0, 1.0])})
    with pytest.raises(ForethoughtError, match="non-finite at step 0"):
        env.step(np.zeros(1))


def test_gymnasium_envs_pass_through_the_gym_prefix():
    env = make_env("gym:Pendulum-v1")
    assert system_of(env) is None
    obs, _ = env.reset(seed=0)
    assert obs.shape == (3,)


def test_changing_parameters_does_not_recompile_the_step():
    import dataclasses

    from forethought.systems.gym import _step

    env = make_env("pendulum")
    env.reset(seed=0)
    env.step(np.zeros(1))
    before = _step._cache_size()
    env.unwrapped.system = dataclasses.replace(env.unwrapped.system, mass=3.0)
    env.step(np.zeros(1))
    assert _step._cache_size() == before
