"""MBPO: rollouts go through the model (not the system), end where the task ends, and the loop learns."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought import systems
from forethought.agents import mbpo, sac as sac_agent
from forethought.agents.base import MemoryRun, run_episode
from forethought.errors import ForethoughtError
from forethought.models.ensemble import Ensemble, EnsembleSpec
from forethought.rl import sac
from forethought.systems.gym import SystemEnv

SYSTEM = systems.make("double-integrator", start_position=2.0, init_std=0.2, horizon=30)
SMALL = dict(random_steps=30, update_every=30, updates_per_step=10, hidden=32, batch_size=64, actor_lr=3e-3,
             critic_lr=3e-3, alpha_lr=3e-3, rollouts_per_step=20, members=3, elites=2, model_hidden=32,
             model_layers=2, model_train_every=30, model_retain_steps=90, model_batch_size=32,
             model_learning_rate=3e-3, model_max_epochs=30)


def shifting_model(n, m, shifts):
    """A deterministic ensemble whose member `e` predicts `x + shifts[e]` whatever `x` and `u` are."""
    shifts = jnp.asarray(shifts, jnp.float32)
    model = Ensemble.create(EnsembleSpec(n, m, members=len(shifts), hidden=8, layers=1, probabilistic=False),
                            jax.random.key(0))
    last = lambda e: (e.net.mlps.layers[-1].weight, e.net.mlps.layers[-1].bias)  # noqa: E731
    weight, _ = last(model)
    return eqx.tree_at(last, model, (jnp.zeros_like(weight), shifts))


def actor_for(system, key=0):
    spec = sac_agent.spec_for(mbpo.Config(**SMALL), SystemEnv(system))
    return spec, sac.init(spec, jax.random.key(key)).actor


def test_rollouts_move_by_the_model_and_earn_the_true_cost():
    """A model that shifts every state by (0.5, 0) whatever the action: the real point mass never does."""
    spec, actor = actor_for(SYSTEM)
    model = shifting_model(2, 1, [[0.5, 0.0], [0.5, 0.0], [0.5, 0.0]])
    starts = jnp.asarray(np.random.default_rng(0).normal(size=(16, 2)), jnp.float32)
    batch, valid = mbpo.model_rollouts(spec, SYSTEM, model, actor, starts, jax.random.key(1), 3)
    assert batch.obs.shape == (48, 2) and bool(jnp.all(valid)) and not bool(jnp.any(batch.done))
    np.testing.assert_allclose(batch.next_obs - batch.obs, np.tile([0.5, 0.0], (48, 1)), atol=1e-6)
    np.testing.assert_array_equal(batch.obs[:16], starts)
    np.testing.assert_array_equal(batch.obs[16:32], batch.next_obs[:16])  # k steps chained, step-major
    true_cost = jax.vmap(SYSTEM.cost)(batch.obs, batch.action, jnp.zeros(48, int))
    np.testing.assert_allclose(batch.reward, -true_cost, rtol=1e-6)
    real_next = jax.vmap(SYSTEM.dynamics)(batch.obs, batch.action, jnp.zeros(48, int))
    assert float(jnp.max(jnp.abs(real_next - batch.next_obs))) > 0.3


def test_each_rollout_step_draws_a_member_among_the_elites():
    spec, actor = actor_for(SYSTEM)
    model = shifting_model(2, 1, [[1.0, 0.0], [-1.0, 0.0], [100.0, 0.0]])
    model = eqx.tree_at(lambda e: e.elite_index, model, jnp.array([0, 1], jnp.int32))  # member 2 is no elite
    batch, _ = mbpo.model_rollouts(spec, SYSTEM, model, actor, jnp.zeros((200, 2)), jax.random.key(2), 4)
    moves = np.asarray(batch.next_obs - batch.obs)[:, 0].reshape(4, 200)
    assert set(np.round(moves.ravel(), 4)) == {1.0, -1.0}
    assert 0.4 < np.mean(moves > 0) < 0.6
    assert np.mean(np.any(moves != moves[:1], axis=0)) > 0.5  # members change along a rollout (TS1)


def test_rollouts_stop_where_the_task_ends():
    car = systems.make("mountain-car")
    spec, actor = actor_for(car)
    model = shifting_model(2, 1, [[1.0, 0.0]] * 3)  # from the valley floor, one step reaches the goal
    starts = jnp.tile(jnp.array([-0.5, 0.0]), (8, 1))
    batch, valid = mbpo.model_rollouts(spec, car, model, actor, starts, jax.random.key(0), 3)
    assert valid.reshape(3, 8).sum(axis=1).tolist() == [8, 0, 0]
    assert bool(jnp.all(batch.done[:8]))
    pool = sac.fifo_add(sac.empty_pool(2, 1, 100), batch, valid)
    assert int(pool.size) == 8 and bool(jnp.all(pool.data.done[:8]))


def test_mbpo_drives_the_point_mass_home_in_a_few_episodes():
    run = MemoryRun()
    result = mbpo.train(mbpo.Config(episodes=8, **SMALL), SystemEnv(SYSTEM), jax.random.key(1), run)
    learned = np.mean([run_episode(SystemEnv(SYSTEM), result.policy, seed).total_reward for seed in range(5)])
    # standing still costs about 53; SAC alone needs about 30 episodes for this (tests/agents/test_sac.py)
    assert learned > -42, learned
    rows = run.rows
    assert [r["model_epochs"] > 0 for r in rows] == [True] * 8  # F = one episode
    assert rows[-1]["model_pool"] == 20 * 90 and rows[-1]["updates"] == 7 * 300


def test_the_rollout_length_schedule_is_linear_in_episodes():
    config = mbpo.Config(rollout_length_start=1, rollout_length_end=5, rollout_schedule_start=2,
                         rollout_schedule_end=6)
    assert [config.rollout_length(e) for e in range(9)] == [1, 1, 1, 2, 3, 4, 5, 5, 5]
    assert mbpo.Config(batch_size=200, real_ratio=0.05).batch_counts() == (10, 190)


def test_gymnasium_envs_without_a_cost_are_refused_clearly():
    import gymnasium

    with pytest.raises(ForethoughtError, match="built-in system"):
        mbpo.train(mbpo.Config(**SMALL), gymnasium.make("Pendulum-v1"), jax.random.key(0))


@pytest.mark.parametrize("field,value,message", [
    ("real_ratio", 1.5, "real_ratio must be in"),
    ("elites", 9, "elites must be <= members"),
    ("rollout_schedule_end", -1, "rollout_schedule_end"),
    ("rollout_length_start", 0, "rollout_length_start"),
    ("model_retain_steps", 10, "model_retain_steps must be >= update_every"),
    ("updates_per_step", 0, "updates_per_step"),
])
def test_bad_settings_name_the_field(field, value, message):
    with pytest.raises(ForethoughtError, match=message):
        mbpo.Config(**{**SMALL, field: value})


def test_a_run_cut_off_mid_episode_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    from forethought.experiment.run import Run, read_metrics

    config = mbpo.Config(episodes=4, **SMALL)  # the settings of the learning test: nothing new to compile

    def new_run(name):
        return Run.create(tmp_path / name, {"agent": "mbpo", "env": "double-integrator", "seed": 0})

    full = mbpo.train(config, SystemEnv(SYSTEM), jax.random.key(5), new_run("full"))
    real_run_episode = mbpo.run_episode
    calls = {"n": 0}

    def dying_run_episode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed during the third episode
        return real_run_episode(*args, **kwargs)

    monkeypatch.setattr(mbpo, "run_episode", dying_run_episode)
    with pytest.raises(KeyboardInterrupt):
        mbpo.train(config, SystemEnv(SYSTEM), jax.random.key(5), new_run("cut"))
    monkeypatch.setattr(mbpo, "run_episode", real_run_episode)
    assert len(read_metrics(tmp_path / "cut")["episode"]) == 2
    resumed = mbpo.train(config, SystemEnv(SYSTEM), jax.random.key(5), Run.open(tmp_path / "cut"))
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    for column in ("return", "critic_loss", "model_holdout_loss", "rollout_reward", "model_pool"):
        np.testing.assert_array_equal(a[column], b[column], err_msg=column)
    for x, y in ((full.state, resumed.state), (full.model, resumed.model)):
        assert all(np.array_equal(p, q) for p, q in zip(jax.tree.leaves(eqx.filter(x, eqx.is_array)),
                                                        jax.tree.leaves(eqx.filter(y, eqx.is_array))))
