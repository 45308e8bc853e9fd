"""Pixel observations: any env that renders, seen through its pictures only.

Seed 000, "Latent Space Models": for complex observations (images: high-dimensional, redundant,
partially observed) a model learns `p(o_t | s_t)` and `p(s_{t+1} | s_t, a_t)` separately. This
wrapper makes such observations from an env's own `render`:

    env = PixelObservation(make_env("pendulum"), size=64, frames=2)
    obs, _ = env.reset(seed=0)        # uint8 [64, 64, 3 * 2]: the last two frames, oldest first

- For a built-in system (`SystemEnv`) the frame is `system.render(x, size)`, drawn directly at
  `size` (the NumPy rasterizer is anti-aliased at any size), so the inner env needs no
  `render_mode`.
- Any other Gymnasium env must have been made with `render_mode="rgb_array"`; its frames are
  resized to `size x size` by area averaging (PIL's box filter).
- A single frame shows where things are, not how fast they move: `frames` stacks the most recent
  frames along the channel axis (oldest first) so velocity can be read off. After `reset` the
  stack holds the first frame `frames` times.

Observations are `Box(0, 255, (size, size, 3 * frames), uint8)`. The underlying observation
(the raw state of a built-in system) is kept in `info["state"]`, for plots and tests only: an
agent learning from pixels never reads it.
"""

from __future__ import annotations

import collections

import gymnasium
import numpy as np

from forethought.errors import ForethoughtError

SIZES = (32, 64)
"""The sizes the latent models' convolutional stacks are built for (and the issue's two)."""


class PixelObservation(gymnasium.Wrapper):
    """Observations of `env` replaced by its last `frames` rendered frames (module docstring)."""

    def __init__(self, env: gymnasium.Env, size: int = 64, frames: int = 2):
        super().__init__(env)
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size not in SIZES:
            raise ForethoughtError(f"PixelObservation: size must be one of {SIZES}, got {size!r}")
        if not isinstance(frames, (int, np.integer)) or isinstance(frames, bool) or frames < 1:
            raise ForethoughtError(f"PixelObservation: frames must be an integer >= 1, got {frames!r}")
        from forethought.systems.gym import system_of

        self.size, self.frames = int(size), int(frames)
        self._system = system_of(env)
        if self._system is None and getattr(env, "render_mode", None) != "rgb_array":
            name = env.spec.id if env.spec else type(env.unwrapped).__name__
            raise ForethoughtError(
                f"PixelObservation: env {name} must render rgb_array frames for pixel observations; "
                f"its render_mode is {getattr(env, 'render_mode', None)!r} (make it with "
                "render_mode='rgb_array')")
        self.observation_space = gymnasium.spaces.Box(0, 255, (self.size, self.size, 3 * self.frames), np.uint8)
        self._stack: collections.deque[np.ndarray] = collections.deque(maxlen=self.frames)

    def frame(self, state: np.ndarray | None = None) -> np.ndarray:
        """The current frame, uint8 `[size, size, 3]` (of `state` instead, for a built-in system)."""
        if self._system is not None:
            x = self.env.unwrapped.state if state is None else state
            return np.asarray(self._system.render(x, self.size), np.uint8)
        if state is not None:
            raise ForethoughtError("PixelObservation.frame: state= needs a built-in system")
        image = self.env.render()
        if image is None or np.ndim(image) != 3 or np.shape(image)[-1] not in (3, 4):
            raise ForethoughtError(f"PixelObservation: the env's render() must return an RGB array "
                                   f"[H, W, 3], got {None if image is None else np.shape(image)}")
        return resize(np.asarray(image)[..., :3], self.size)

    def _observation(self) -> np.ndarray:
        return np.concatenate(list(self._stack), axis=-1)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        state, info = self.env.reset(seed=seed, options=options)
        first = self.frame()
        self._stack.clear()
        for _ in range(self.frames):
            self._stack.append(first)
        return self._observation(), {**info, "state": state}

    def step(self, action):
        state, reward, terminated, truncated, info = self.env.step(action)
        self._stack.append(self.frame())
        return self._observation(), reward, terminated, truncated, {**info, "state": state}


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """An RGB uint8 image `[H, W, 3]` resized to `[size, size, 3]` (box filter; not cropped, so a
    non-square frame is squeezed)."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BOX), np.uint8)


def pixel_env(env: gymnasium.Env, size: int = 64, frames: int = 2) -> PixelObservation:
    """`env` seen through pixels (an env that already is a `PixelObservation` is refused)."""
    if isinstance(env, PixelObservation):
        raise ForethoughtError("pixel_env: env already has pixel observations")
    return PixelObservation(env, size=size, frames=frames)


class ActionRepeat(gymnasium.Wrapper):
    """Each action held for `repeat` steps of `env`, rewards summed (PlaNet's action repeat): a
    model step then spans `repeat` env steps, so frames differ more and a planning horizon reaches
    further. An episode that ends mid-repeat ends there. `inner_steps` counts the env's own steps
    since `reset`."""

    def __init__(self, env: gymnasium.Env, repeat: int):
        super().__init__(env)
        if not isinstance(repeat, (int, np.integer)) or isinstance(repeat, bool) or repeat < 1:
            raise ForethoughtError(f"ActionRepeat: repeat must be an integer >= 1, got {repeat!r}")
        self.repeat = int(repeat)
        self.inner_steps = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.inner_steps = 0
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        total = 0.0
        for _ in range(self.repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            self.inner_steps += 1
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, info
