import numpy as np
import pytest
from PIL import Image

from forethought.errors import ForethoughtError
from forethought.experiment.video import record_episode, save_gif
from forethought.systems import make_env


def test_a_recorded_episode_has_one_frame_per_step(tmp_path):
    env = make_env("pendulum", render_mode="rgb_array", horizon=12)
    path = record_episode(env, lambda obs, t: np.array([1.0], np.float32), seed=0, path=tmp_path / "e.gif")
    with Image.open(path) as gif:
        assert gif.n_frames == 13
        assert gif.size == (256, 256)


def test_no_frames_is_an_error(tmp_path):
    with pytest.raises(ForethoughtError, match="no frames"):
        save_gif([], tmp_path / "x.gif")
