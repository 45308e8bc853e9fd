import json

import numpy as np
import pytest

from forethought.errors import ForethoughtError
from forethought.experiment.plot import learning_curves, mean_interval
from forethought.experiment.run import Run, read_metrics


def make_run(path, seed=0):
    return Run.create(path, {"agent": "random", "env": "pendulum", "seed": seed, "config": {}})


def test_a_run_folder_has_config_metrics_and_events(tmp_path):
    run = make_run(tmp_path / "r")
    run.log(episode=0, env_steps=10, **{"return": -1.5})
    run.log(episode=1, env_steps=20, **{"return": -0.5})
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["agent"] == "random" and "jax" in config["environment"]
    assert read_metrics(tmp_path / "r") == {"episode": [0, 1], "env_steps": [10, 20], "return": [-1.5, -0.5]}
    events = [json.loads(line)["event"] for line in (tmp_path / "r" / "events.jsonl").read_text().splitlines()]
    assert events == ["start"]


def test_an_existing_folder_is_not_overwritten(tmp_path):
    make_run(tmp_path / "r").log(episode=0)
    with pytest.raises(ForethoughtError, match="already exists"):
        make_run(tmp_path / "r")


def test_rows_must_keep_the_columns(tmp_path):
    run = make_run(tmp_path / "r")
    run.log(episode=0, env_steps=1)
    with pytest.raises(ForethoughtError, match="not in metrics.csv"):
        run.log(episode=1, loss=3.0)


def test_resume_drops_rows_the_checkpoint_does_not_cover(tmp_path):
    run = make_run(tmp_path / "r")
    run.log(episode=0, env_steps=10)
    run.save_checkpoint({"x": np.ones(2)}, episode=1)
    run.log(episode=1, env_steps=20)  # an episode whose checkpoint never got written
    with open(tmp_path / "r" / "metrics.csv", "a") as handle:
        handle.write("2,3")  # and a row cut off mid-write
    reopened = Run.open(tmp_path / "r")
    state, meta = reopened.load_checkpoint({"x": np.zeros(2)})
    assert meta["episode"] == 1 and meta["metric_rows"] == 1
    assert read_metrics(tmp_path / "r") == {"episode": [0], "env_steps": [10]}
    reopened.log(episode=1, env_steps=21)
    assert read_metrics(tmp_path / "r")["env_steps"] == [10, 21]


def test_open_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ForethoughtError, match="not a run folder"):
        Run.open(tmp_path)


def test_mean_interval_matches_the_t_interval():
    curves = np.array([[1.0, 2.0], [3.0, 2.0], [2.0, 2.0]])
    mean, lo, hi = mean_interval(curves)
    np.testing.assert_allclose(mean, [2.0, 2.0])
    np.testing.assert_allclose(hi - mean, [4.303 * 1.0 / np.sqrt(3), 0.0], rtol=1e-6)
    np.testing.assert_allclose(mean - lo, hi - mean)


def test_plot_overlays_seeds_as_a_band(tmp_path):
    for seed in range(3):
        run = make_run(tmp_path / f"s{seed}", seed=seed)
        for episode in range(4):
            run.log(episode=episode, env_steps=10 * (episode + 1), **{"return": float(seed + episode)})
    out = learning_curves([tmp_path / f"s{s}" for s in range(3)], tmp_path / "lc.png")
    assert out.stat().st_size > 5000
    with pytest.raises(ForethoughtError, match="no column 'loss'"):
        learning_curves([tmp_path / "s0"], tmp_path / "x.png", y="loss")
