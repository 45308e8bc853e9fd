"""GIFs of systems: a person would rather watch an episode than read its numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from forethought.errors import ForethoughtError


def save_gif(frames: Sequence[np.ndarray], path: Path, fps: float = 20.0) -> Path:
    """Write uint8 RGB frames `[H, W, 3]` as a looping GIF (atomically)."""
    from PIL import Image  # Pillow comes with Matplotlib

    if len(frames) == 0:
        raise ForethoughtError(f"save_gif: no frames to write to {path}")
    images = [Image.fromarray(np.asarray(frame, np.uint8)) for frame in frames]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.gif")
    images[0].save(tmp, save_all=True, append_images=images[1:], duration=max(int(1000 / fps), 20),
                   loop=0, optimize=False)
    tmp.replace(path)
    return path


def record_episode(env: Any, policy: Callable[[np.ndarray, int], Any], seed: int, path: Path,
                   max_frames: int = 500) -> Path:
    """Roll `policy(obs, t)` for one episode in `env` (created with `render_mode="rgb_array"`) and
    save every frame as a GIF at the env's `render_fps`."""
    obs, _ = env.reset(seed=seed)
    frames = [env.render()]
    done, t = False, 0
    while not done and t < max_frames:
        obs, _, terminated, truncated, _ = env.step(policy(obs, t))
        frames.append(env.render())
        done, t = terminated or truncated, t + 1
    fps = float(env.metadata.get("render_fps", 20) or 20)
    return save_gif(frames, path, fps=fps)
