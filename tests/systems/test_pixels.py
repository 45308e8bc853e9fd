"""Pixel observations: every built-in system through its `render`, frame stacking, any env that
renders rgb_array, and clear errors."""

import gymnasium
import numpy as np
import pytest

from forethought import systems
from forethought.errors import ForethoughtError
from forethought.systems.base import System
from forethought.systems.gym import make_env
from forethought.systems.pixels import ActionRepeat, PixelObservation, pixel_env, resize

CONTINUOUS = [n for n in systems.names() if n != "maze" and isinstance(systems.make(n), System)]
MAZES = [n for n in systems.names() if n != "maze" and n not in CONTINUOUS]


@pytest.mark.parametrize("name", CONTINUOUS)
@pytest.mark.parametrize("size", [32, 64])
def test_every_built_in_system_gives_pixel_observations(name, size):
    env = PixelObservation(make_env(name), size=size, frames=2)
    obs, info = env.reset(seed=0)
    assert obs.shape == (size, size, 6) and obs.dtype == np.uint8 and env.observation_space.contains(obs)
    np.testing.assert_array_equal(obs[..., :3], obs[..., 3:])  # the stack starts with the first frame twice
    assert obs.std() > 0  # not a blank picture
    state = info["state"]
    np.testing.assert_array_equal(obs[..., 3:], env.unwrapped.system.render(state, size))
    action = env.action_space.high
    changed = False
    for _ in range(5):
        new, reward, terminated, truncated, info = env.step(action)
        assert new.shape == obs.shape and np.isfinite(reward)
        np.testing.assert_array_equal(new[..., :3], obs[..., 3:])  # oldest first: the previous newest
        np.testing.assert_array_equal(new[..., 3:], env.unwrapped.system.render(info["state"], size))
        changed |= not np.array_equal(new[..., 3:], obs[..., 3:])
        obs = new
        if terminated or truncated:
            break
    assert changed  # full force moves every system visibly within 5 steps


@pytest.mark.parametrize("name", MAZES)
def test_mazes_render_through_rgb_array(name):
    env = PixelObservation(make_env(name, render_mode="rgb_array"), size=32, frames=1)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (32, 32, 3) and obs.std() > 0
    assert env.step(env.action_space.sample())[0].shape == (32, 32, 3)


class Blob(gymnasium.Env):
    """A Gymnasium env that is not a built-in: a dot on a 60x90 picture, moved by the action."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode=None):
        self.render_mode = render_mode
        self.observation_space = gymnasium.spaces.Box(-1, 1, (1,), np.float32)
        self.action_space = gymnasium.spaces.Box(-1, 1, (1,), np.float32)
        self.x = 0.0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = 0.0
        return np.array([self.x], np.float32), {}

    def step(self, action):
        self.x = float(np.clip(self.x + 0.5 * float(action[0]), -1, 1))
        return np.array([self.x], np.float32), -abs(self.x), False, False, {}

    def render(self):
        image = np.zeros((60, 90, 3), np.uint8)
        col = int(round((self.x + 1) / 2 * 80))
        image[25:35, col:col + 10] = 255
        return image


def test_any_env_that_renders_rgb_array_is_resized():
    env = PixelObservation(Blob(render_mode="rgb_array"), size=32, frames=3)
    obs, info = env.reset(seed=0)
    assert obs.shape == (32, 32, 9) and info["state"].tolist() == [0.0]
    np.testing.assert_array_equal(obs[..., :3], resize(Blob(render_mode="rgb_array").render(), 32))
    obs, *_ = env.step(np.array([1.0], np.float32))
    # the dot moved right: its brightness centre shifts between the two newest frames
    cols = [np.argmax(obs[..., 3 * k:3 * k + 3].sum(axis=(0, 2))) for k in range(3)]
    assert cols[0] == cols[1] < cols[2]


def test_bad_input_is_refused_by_name():
    with pytest.raises(ForethoughtError, match="rgb_array"):
        PixelObservation(Blob(), size=32)
    with pytest.raises(ForethoughtError, match="size must be one of"):
        PixelObservation(make_env("pendulum"), size=48)
    with pytest.raises(ForethoughtError, match="frames must be"):
        PixelObservation(make_env("pendulum"), frames=0)
    with pytest.raises(ForethoughtError, match="already has pixel"):
        pixel_env(PixelObservation(make_env("pendulum"), size=32))


def test_action_repeat_holds_the_action_and_sums_the_rewards():
    plain, repeated = make_env("pendulum", horizon=7), ActionRepeat(make_env("pendulum", horizon=7), 3)
    plain.reset(seed=0)
    repeated.reset(seed=0)
    u = np.array([2.0], np.float32)
    rewards = [plain.step(u)[1] for _ in range(3)]
    state, reward, *_ = repeated.step(u)
    np.testing.assert_allclose(state, plain.unwrapped.state)
    np.testing.assert_allclose(reward, sum(rewards), rtol=1e-6)
    repeated.step(u)
    *_, truncated, _ = repeated.step(u)  # the 7-step episode ends inside the third repeat
    assert truncated and repeated.inner_steps == 7
    with pytest.raises(ForethoughtError, match="repeat must be"):
        ActionRepeat(plain, 0)
