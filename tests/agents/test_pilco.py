"""The PILCO agent on a tiny task (the double integrator driven to the origin, cost on the distance):
it learns in a few trials with both policies and both models' code paths, refuses what it cannot
do, and resumes a cut-off run to the same numbers."""

import jax
import numpy as np
import pytest

from forethought import systems
from forethought.agents import pilco
from forethought.agents.base import MemoryRun
from forethought.errors import ForethoughtError
from forethought.systems.gym import SystemEnv

SYSTEM = systems.make("double-integrator", start_position=1.0, init_std=0.05, horizon=40)
SMALL = dict(episodes=3, horizon=25, iterations=40, gp_restarts=1, basis=10)


@pytest.mark.parametrize("policy,inducing", [("linear", 200), ("rbf", 200), ("linear", 30)])
def test_pilco_drives_the_point_mass_home_within_three_trials(policy, inducing):
    """`inducing` 30: the last optimisation predicts with the FITC GP on 30 of its 50 points."""
    run = MemoryRun()
    config = pilco.Config(policy=policy, gp_inducing=inducing, **SMALL)
    result = pilco.train(config, SystemEnv(SYSTEM), jax.random.key(0), run)
    costs = [row["cost"] for row in run.rows]
    # the random trial hovers about the start (cost about 0.4 a step); the learned ones arrive
    assert max(costs[1:]) < 0.75 * costs[0], costs
    assert result.successes[-1] and result.trials_to_success is not None


def test_the_bnn_variant_runs_and_improves_on_random():
    config = pilco.Config(model="bnn", particles=10, bnn_hidden=32, **SMALL)
    run = MemoryRun()
    pilco.train(config, SystemEnv(SYSTEM), jax.random.key(1), run)
    costs = [row["cost"] for row in run.rows]
    assert costs[-1] < 0.8 * costs[0], costs


def test_gymnasium_envs_are_refused_clearly():
    import gymnasium

    with pytest.raises(ForethoughtError, match="built-in system"):
        pilco.train(pilco.Config(**SMALL), gymnasium.make("Pendulum-v1"), jax.random.key(0))


def test_an_episode_longer_than_the_env_is_refused():
    with pytest.raises(ForethoughtError, match="exceeds the env's episode"):
        pilco.train(pilco.Config(episodes=2, horizon=50), SystemEnv(SYSTEM), jax.random.key(0))


@pytest.mark.parametrize("field,value,message", [
    ("random_episodes", 0, "random_episodes"),
    ("policy", "mlp", "policy must be"),
    ("model", "nn", "model must be"),
    ("cost_width", 0.0, "cost_width"),
    ("horizon", 0, "horizon must be >= 1"),
    ("gp_inducing", 0, "gp_inducing must be >= 1"),
    ("iterations", 0, "iterations must be >= 1"),
])
def test_bad_settings_name_the_field(field, value, message):
    with pytest.raises(ForethoughtError, match=message):
        pilco.Config(**{**SMALL, field: value})


def test_the_cartpole_optimises_its_policy_longer_by_default():
    """500 L-BFGS iterations on the cart-pole (150 left its swing-up short), 150 elsewhere, and an
    explicit `iterations` wins."""
    cartpole = SystemEnv(systems.make("cartpole"))
    with jax.enable_x64(True):  # as `train` builds its Setup
        assert pilco.Setup(pilco.Config(), cartpole).iterations == 500
        assert pilco.Setup(pilco.Config(iterations=40), cartpole).iterations == 40
        assert pilco.Setup(pilco.Config(), SystemEnv(SYSTEM)).iterations == 150


def test_a_run_cut_off_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    from forethought.experiment.run import Run, read_metrics

    config = pilco.Config(policy="linear", **SMALL)

    def new_run(name):
        return Run.create(tmp_path / name, {"agent": "pilco", "env": "double-integrator", "seed": 0})

    pilco.train(config, SystemEnv(SYSTEM), jax.random.key(5), new_run("full"))
    real_episode = pilco._episode
    calls = {"n": 0}

    def dying_episode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed during the third episode
        return real_episode(*args, **kwargs)

    monkeypatch.setattr(pilco, "_episode", dying_episode)
    with pytest.raises(KeyboardInterrupt):
        pilco.train(config, SystemEnv(SYSTEM), jax.random.key(5), new_run("cut"))
    monkeypatch.setattr(pilco, "_episode", real_episode)
    assert len(read_metrics(tmp_path / "cut")["episode"]) == 2
    pilco.train(config, SystemEnv(SYSTEM), jax.random.key(5), Run.open(tmp_path / "cut"))
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert resumed["return"] == full["return"]
    np.testing.assert_array_equal(resumed["predicted_cost"][1:], full["predicted_cost"][1:])
