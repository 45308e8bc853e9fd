"""The latent-space MPC agent: the loop from pixels, checkpoint and resume, the prediction GIF, the
final policy on the plain env, and clear errors."""

import gymnasium
import jax
import numpy as np
import pytest

from forethought.agents import latent_mpc
from forethought.agents.base import MemoryRun
from forethought.errors import ForethoughtError
from forethought.systems.gym import make_env
from tests.agents.resume import cut_run_folder, without_timing

TINY = dict(pixels=True, image_size=32, frames=2, random_episodes=1, latent=4, deter=8, embed=16, hidden=16, depth=4,
            chunk=4, batch_size=4, train_steps=5, horizon=4, population=16, iterations=2, video_steps=5)


def pendulum():
    return make_env("pendulum", horizon=10)


@pytest.mark.parametrize("model", ["deterministic", "rssm"])
def test_the_loop_learns_from_pixels_and_writes_the_prediction_gif(tmp_path, model):
    from PIL import Image

    repeat = 2 if model == "rssm" else 1
    config = latent_mpc.Config(episodes=3, model=model, action_repeat=repeat, **TINY)
    run = cut_run_folder(tmp_path / "run")
    result = latent_mpc.train(config, pendulum(), jax.random.key(0), run)
    assert len(result.returns) == 3 and result.env_steps == 30
    assert result.model.spec.obs_shape == (32, 32, 6) and result.model.spec.kind == model
    from forethought.experiment.run import read_metrics

    rows = read_metrics(tmp_path / "run")
    assert rows["episode"] == [0, 1, 2] and rows["length"] == [10, 10, 10]
    assert np.isfinite(rows["model_loss"][0]) and np.isfinite(rows["model_loss"][1])  # fit after episodes 0, 1
    assert np.isnan(rows["prediction_error"][0]) and np.isfinite(rows["prediction_error"][1])
    with Image.open(tmp_path / "run" / latent_mpc.GIF_FILE) as gif:
        steps = 10 // repeat  # of the model, in the last episode
        assert gif.n_frames == config.context + min(config.video_steps, steps - config.context + 1)
        assert gif.size[0] > 2 * gif.size[1] * 0.9  # real | predicted side by side
    # the final policy takes the env's pixels, and the raw state of the plain env (the CLI's GIF)
    env = latent_mpc.prepare_env(pendulum(), config)
    obs, info = env.reset(seed=1)
    u = result.policy(obs, 0)
    assert u.shape == (1,) and -4 <= float(u[0]) <= 4
    first = result.policy(info["state"], 0)
    assert first.shape == (1,)
    if repeat == 2:  # on the plain env the policy holds each action for action_repeat steps
        np.testing.assert_array_equal(result.policy(info["state"] + 0.3, 1), first)
    with pytest.raises(ForethoughtError, match="expected observations of shape"):
        result.policy(np.zeros(5, np.float32), 0)


def test_a_cut_run_resumes_to_the_same_numbers(tmp_path):
    config = latent_mpc.Config(episodes=3, **TINY)
    whole = MemoryRun()
    latent_mpc.train(config, pendulum(), jax.random.key(3), whole)
    with pytest.raises(KeyboardInterrupt):
        latent_mpc.train(config, pendulum(), jax.random.key(3), cut_run_folder(tmp_path / "cut", stop=2))
    assert (tmp_path / "cut" / latent_mpc.EPISODES_FILE).exists()
    latent_mpc.train(config, pendulum(), jax.random.key(3), cut_run_folder(tmp_path / "cut"))
    from forethought.experiment.run import read_metrics

    metrics = read_metrics(tmp_path / "cut")
    resumed = [dict(zip(metrics, values)) for values in zip(*metrics.values())]
    np.testing.assert_equal(without_timing(resumed), without_timing(whole.rows))


def test_state_observations_work_without_pixels():
    config = latent_mpc.Config(episodes=2, **{**TINY, "pixels": False})
    result = latent_mpc.train(config, pendulum(), jax.random.key(0))
    assert result.model.spec.obs_shape == (2,) and not result.model.spec.images
    assert float(result.model.obs_scale[0]) != 1.0  # normalised by the data


class NoPictures(gymnasium.Env):
    observation_space = gymnasium.spaces.Box(-1, 1, (2,), np.float32)
    action_space = gymnasium.spaces.Box(-1, 1, (1,), np.float32)


def test_bad_input_is_refused_by_name():
    with pytest.raises(ForethoughtError, match="rgb_array"):
        latent_mpc.train(latent_mpc.Config(episodes=2, **TINY), NoPictures(), jax.random.key(0))
    with pytest.raises(ForethoughtError, match="image_size"):
        latent_mpc.Config(image_size=40)
    with pytest.raises(ForethoughtError, match="random_episodes"):
        latent_mpc.Config(random_episodes=0)
    assert latent_mpc.Config(episodes=2, random_episodes=3).random == 1  # one planned episode is left
    with pytest.raises(ForethoughtError, match="chunk length 20"):
        latent_mpc.train(latent_mpc.Config(episodes=2, **{**TINY, "chunk": 20}), pendulum(), jax.random.key(0))
    with pytest.raises(ForethoughtError, match="flat Box observations"):
        latent_mpc.train(latent_mpc.Config(episodes=2, **{**TINY, "pixels": False}), OddImages(), jax.random.key(0))


class OddImages(NoPictures):
    observation_space = gymnasium.spaces.Box(0, 255, (40, 40, 3), np.uint8)
