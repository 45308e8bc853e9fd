"""The SAC agent on a tiny known task: a 1-D point mass (the double integrator) driven to the origin."""

import dataclasses

import equinox as eqx
import jax
import numpy as np
import pytest

from forethought import systems
from forethought.agents import sac
from forethought.agents.base import MemoryRun, episode_seed, run_episode
from forethought.errors import ForethoughtError
from forethought.systems.gym import SystemEnv

SYSTEM = systems.make("double-integrator", start_position=2.0, init_std=0.2, horizon=30)
SMALL = dict(random_steps=90, update_every=30, updates_per_step=4, hidden=32, batch_size=64, actor_lr=3e-3,
             critic_lr=3e-3, alpha_lr=3e-3)


def mean_return(policy, seeds=range(5)):
    return float(np.mean([run_episode(SystemEnv(SYSTEM), policy, seed).total_reward for seed in seeds]))


def test_sac_drives_the_point_mass_home():
    run = MemoryRun()
    result = sac.train(sac.Config(episodes=30, **SMALL), SystemEnv(SYSTEM), jax.random.key(0), run)
    learned = mean_return(result.policy)
    standing_still = mean_return(lambda obs, t: np.zeros(1, np.float32))
    # standing still costs about 53 here; the true-dynamics CEM controller of the MPC tests about 38
    assert learned > -40 > standing_still + 10, (learned, standing_still)
    assert [row["env_steps"] for row in run.rows][:4] == [30, 60, 90, 120]
    assert [row["updates"] for row in run.rows][:4] == [0, 0, 0, 120]  # updates start after the warm-up
    assert np.isnan(run.rows[0]["critic_loss"]) and np.isfinite(run.rows[-1]["critic_loss"])


def test_evaluation_episodes_are_logged_and_leave_training_unchanged():
    """`eval_episodes` runs the deterministic policy on a separate env instance: the training
    rows (returns, env steps, losses) are those of the run without it, and the last row's
    `eval_return` is the final policy's mean return over the same reset seeds."""
    config = sac.Config(episodes=5, **SMALL)
    plain, evaluated = MemoryRun(), MemoryRun()
    env = SystemEnv(SYSTEM)
    sac.train(config, env, jax.random.key(0), plain)
    result = sac.train(dataclasses.replace(config, eval_episodes=2), env, jax.random.key(0), evaluated)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("wall_seconds", "eval_return")} for r in rows]  # noqa: E731
    assert np.array_equal(np.asarray([list(r.values()) for r in strip(evaluated.rows)], float),
                          np.asarray([list(r.values()) for r in strip(plain.rows)], float), equal_nan=True)
    assert "eval_return" not in plain.rows[0] and all(np.isfinite(r["eval_return"]) for r in evaluated.rows)
    seeds = [episode_seed(jax.random.fold_in(jax.random.key(0), 5), 4 * 2 + j) for j in range(2)]
    assert evaluated.rows[-1]["eval_return"] == pytest.approx(mean_return(result.policy, seeds), rel=1e-6)


def test_the_warm_up_acts_at_random_then_the_policy_takes_over():
    spec = sac.spec_for(sac.Config(**SMALL), SystemEnv(SYSTEM))
    import forethought.rl.sac as learner

    actor = learner.init(spec, jax.random.key(0)).actor
    policy = sac.behaviour_policy(spec, actor, jax.random.key(1), env_steps=80, random_steps=90, seed=0)
    random_part = [policy(np.zeros(2, np.float32), t) for t in range(10)]
    acted = [policy(np.zeros(2, np.float32), t) for t in range(10, 14)]
    assert len({float(a[0]) for a in random_part}) == 10
    assert all(-1 <= float(a[0]) <= 1 for a in random_part + acted)
    assert sac.owed_steps(80, 30, 90) == 20 and sac.owed_steps(0, 30, 90) == 0 and sac.owed_steps(120, 30, 90) == 30


@pytest.mark.parametrize("field,value,message", [
    ("episodes", 0, "episodes must be an integer >= 1"),
    ("updates_per_step", 0, "updates_per_step"),
    ("batch_size", 0, "batch_size"),
    ("gamma", 1.2, "gamma must be in"),
    ("tau", 0.0, "tau must be in"),
    ("actor_lr", -1.0, "actor_lr must be > 0"),
    ("random_steps", -1, "random_steps"),
    ("eval_episodes", -1, "eval_episodes must be an integer >= 0"),
])
def test_bad_settings_name_the_field(field, value, message):
    with pytest.raises(ForethoughtError, match=message):
        sac.Config(**{**SMALL, field: value})


def test_discrete_action_spaces_are_refused_clearly():
    import gymnasium

    with pytest.raises(ForethoughtError, match="Box action space"):
        sac.train(sac.Config(**SMALL), gymnasium.make("CartPole-v1"), jax.random.key(0))


def test_a_run_cut_off_mid_episode_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    from forethought.experiment.run import Run, read_metrics

    config = sac.Config(episodes=5, **{**SMALL, "random_steps": 40, "update_every": 20, "updates_per_step": 1,
                                       "hidden": 16})

    def new_run(name):
        return Run.create(tmp_path / name, {"agent": "sac", "env": "double-integrator", "seed": 0})

    full = sac.train(config, SystemEnv(SYSTEM), jax.random.key(5), new_run("full"))

    real_run_episode = sac.run_episode
    calls = {"n": 0}

    def dying_run_episode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed during the fourth episode
        return real_run_episode(*args, **kwargs)

    monkeypatch.setattr(sac, "run_episode", dying_run_episode)
    with pytest.raises(KeyboardInterrupt):
        sac.train(config, SystemEnv(SYSTEM), jax.random.key(5), new_run("cut"))
    monkeypatch.setattr(sac, "run_episode", real_run_episode)
    assert len(read_metrics(tmp_path / "cut")["episode"]) == 3
    resumed = sac.train(config, SystemEnv(SYSTEM), jax.random.key(5), Run.open(tmp_path / "cut"))
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    for column in ("return", "updates", "critic_loss", "actor_loss", "alpha"):
        np.testing.assert_array_equal(a[column], b[column], err_msg=column)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(eqx.filter(full.state, eqx.is_array)),
                                                    jax.tree.leaves(eqx.filter(resumed.state, eqx.is_array))))


def test_the_cli_runs_sac_and_writes_a_complete_run_folder(tmp_path):
    from forethought.cli import main
    from forethought.experiment.run import read_metrics

    out = tmp_path / "run"
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in SMALL.items()]
    assert main(["run", "sac", "--env", "double-integrator", "--episodes", "3", "--eval-episodes", "1",
                 "--out", str(out), *flags]) == 0
    assert {"buffer.npz", "checkpoint.npz", "metrics.csv", "learning_curve.png", "eval_curve.png",
            "final_episode.gif"} <= {p.name for p in out.iterdir()}
    metrics = read_metrics(out)
    assert metrics["env_steps"] == [50, 100, 150] and metrics["updates"] == [0, 0, 240]
