"""MBPO: rollouts go through the model (not the system), end where the task ends, and the loop learns;
on a Gymnasium env they earn the learned reward and end with the learned end probability."""

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
from forethought.models.reward import LearnedTask
from forethought.rl import sac
from forethought.systems.gym import SystemEnv
from tests.agents.plain_env import point_mass_env

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


def PointMassEnv():
    """The point mass of `SYSTEM` as a plain Gymnasium env: no built-in system behind it (so no
    known cost), reward `-(x^2 + 0.1 v^2)` as `SYSTEM`'s, and the episode ends (terminated) if the
    mass leaves [-4, 4]."""
    return point_mass_env(
        lambda x, u, t: np.asarray(SYSTEM.dynamics(jnp.asarray(x, jnp.float32), jnp.asarray([u]), t)),
        lambda x, u, t: -float(SYSTEM.cost(jnp.asarray(x, jnp.float32), jnp.asarray([u]), t)),
        horizon=SYSTEM.horizon)


def constant_logit(net, value):
    """`net` (a scalar-output MLP) changed to output `value` whatever its input."""
    last = lambda n: (n.layers[-1].weight, n.layers[-1].bias)  # noqa: E731
    weight, bias = last(net)
    return eqx.tree_at(last, net, (jnp.zeros_like(weight), jnp.full_like(bias, value)))


def test_rollouts_on_a_learned_task_earn_its_reward_and_draw_its_ends():
    """A learned task whose end probability is 0.3 everywhere: about 30% of the rollouts end at
    each step (a 0.5 threshold would end none), and every reward is the task's `r_hat(s, a)`."""
    spec, actor = actor_for(SYSTEM)
    model = shifting_model(2, 1, [[0.1, 0.0]] * 3)
    task = LearnedTask.create(2, [-1.0], [1.0], jax.random.key(3), hidden=16)
    task = eqx.tree_at(lambda t: (t.done_net, t.seen_ends), task,
                       (constant_logit(task.done_net, float(np.log(0.3 / 0.7))), jnp.asarray(True)))
    B, k = 4000, 3
    starts = jnp.asarray(np.random.default_rng(0).normal(size=(B, 2)), jnp.float32)
    batch, valid = mbpo.model_rollouts(spec, task, model, actor, starts, jax.random.key(1), k)
    valid, done = np.asarray(valid).reshape(k, B), np.asarray(batch.done).reshape(k, B)
    assert abs(done[0].mean() - 0.3) < 0.03, done[0].mean()
    np.testing.assert_array_equal(valid[1], ~done[0])  # an end stops the rollout
    assert abs(valid[2].mean() - 0.49) < 0.03, valid[2].mean()
    np.testing.assert_allclose(batch.reward, jax.vmap(task.reward)(batch.obs, batch.action), rtol=1e-5, atol=1e-6)
    true_reward = -jax.vmap(SYSTEM.cost)(batch.obs, batch.action, jnp.zeros(B * k, int))
    assert float(jnp.max(jnp.abs(batch.reward - true_reward))) > 0.1  # an untrained r_hat, not the system's cost
    # before any end has been seen in the data, nothing ends
    unseen = eqx.tree_at(lambda t: t.seen_ends, task, jnp.asarray(False))
    batch, valid = mbpo.model_rollouts(spec, unseen, model, actor, starts, jax.random.key(1), k)
    assert bool(jnp.all(valid)) and not bool(jnp.any(batch.done))


def test_mbpo_runs_on_a_gymnasium_env_with_a_learned_reward():
    run = MemoryRun()
    config = mbpo.Config(**{**SMALL, "episodes": 3, "reward_hidden": 32, "reward_steps": 300})
    result = mbpo.train(config, PointMassEnv(), jax.random.key(1), run)
    assert isinstance(result.task, LearnedTask) and not bool(result.task.seen_ends)  # the mass stays in [-4, 4]
    assert [row["model_epochs"] > 0 for row in run.rows] == [True] * 3
    assert all(np.isfinite(row["rollout_reward"]) and row["rollout_reward"] < 0 for row in run.rows[1:])
    assert int(result.model_pool.size) > 0 and not bool(jnp.any(result.model_pool.data.done))
    # r_hat is SYSTEM's reward about where the mass has been
    rng = np.random.default_rng(1)
    states = jnp.asarray(np.c_[rng.normal(2.0, 0.3, 256), rng.normal(0.0, 0.3, 256)], jnp.float32)
    actions = jnp.asarray(rng.uniform(-1, 1, size=(256, 1)), jnp.float32)
    true_reward = -jax.vmap(SYSTEM.cost)(states, actions, jnp.zeros(256, int))
    error = jax.vmap(result.task.reward)(states, actions) - true_reward
    assert float(jnp.sqrt(jnp.mean(error ** 2))) < 0.2 * float(jnp.std(true_reward))


def test_a_gymnasium_run_cut_off_resumes_with_its_learned_task(tmp_path):
    from tests.agents.resume import cut_run_folder, without_timing

    config = mbpo.Config(**{**SMALL, "episodes": 3, "reward_hidden": 32, "reward_steps": 300})  # as above
    full_run = MemoryRun()
    full = mbpo.train(config, PointMassEnv(), jax.random.key(4), full_run)
    with pytest.raises(KeyboardInterrupt):  # killed after episode 1's checkpoint
        mbpo.train(config, PointMassEnv(), jax.random.key(4), cut_run_folder(tmp_path, stop=2))
    resumed_run = cut_run_folder(tmp_path)
    resumed = mbpo.train(config, PointMassEnv(), jax.random.key(4), resumed_run)
    from forethought.experiment.run import read_metrics

    rows = read_metrics(tmp_path)
    assert len(rows["episode"]) == 3
    for column in ("return", "critic_loss", "rollout_reward", "model_pool"):
        np.testing.assert_array_equal(rows[column], [r[column] for r in without_timing(full_run.rows)],
                                      err_msg=column)
    leaves = lambda t: jax.tree.leaves(eqx.filter(t, eqx.is_array))  # noqa: E731
    assert all(np.array_equal(p, q) for p, q in zip(leaves(full.task), leaves(resumed.task)))


def test_every_refit_task_reaches_the_rollouts_without_recompiling(monkeypatch):
    """Each refit of the learned task makes its reward the constant 10 x (fits so far): each
    episode's rollouts earn the latest one, and the rollout-and-update call is traced once."""
    real_fit, fits = LearnedTask.fit, []

    def constant_fit(self, *args, **kwargs):
        task = real_fit(self, *args, **kwargs)
        fits.append(10.0 * (len(fits) + 1))  # r_hat = net * std + mean = the constant
        return eqx.tree_at(lambda t: (t.reward_norm.mean, t.reward_norm.std), task,
                           (jnp.full((1,), fits[-1], jnp.float32), jnp.zeros((1,), jnp.float32)))

    traces, real_rollouts = [], mbpo.model_rollouts

    def counted_rollouts(*args, **kwargs):
        traces.append(1)
        return real_rollouts(*args, **kwargs)

    monkeypatch.setattr(LearnedTask, "fit", constant_fit)
    monkeypatch.setattr(mbpo, "model_rollouts", counted_rollouts)
    run = MemoryRun()
    config = mbpo.Config(**{**SMALL, "episodes": 4, "rollouts_per_step": 3, "model_retain_steps": 30,
                            "reward_hidden": 8, "reward_steps": 5, "model_max_epochs": 3})
    result = mbpo.train(config, PointMassEnv(), jax.random.key(2), run)
    assert fits == [10.0, 20.0, 30.0, 40.0]  # a fit after every episode (F = one episode)
    # episode 0 is the warm-up (no updates); each later episode's rollouts follow the fit before it
    assert np.isnan(run.rows[0]["rollout_reward"])
    assert [row["rollout_reward"] for row in run.rows[1:]] == [20.0, 30.0, 40.0]
    assert len(traces) == 1
    pool = result.model_pool
    assert int(pool.size) == 90 and bool(jnp.all(pool.data.reward[:90] == 40.0))  # D_model: the last call's


def test_inverted_pendulum_ends_are_learned_from_the_warm_up():
    """`gym:InvertedPendulum-v5` (MuJoCo): random warm-up episodes fall over within a few steps;
    the learned end fires for a pole past the 0.2 rad limit, not for an upright one."""
    pytest.importorskip("mujoco")
    from forethought.systems.gym import make_env

    config = mbpo.Config(**{**SMALL, "episodes": 20, "random_steps": 40, "model_train_every": 40,
                            "update_every": 20, "model_retain_steps": 40, "reward_hidden": 32,
                            "reward_steps": 400})
    run = MemoryRun()
    result = mbpo.train(config, make_env("gym:InvertedPendulum-v5"), jax.random.key(0), run)
    assert sum(row["model_epochs"] > 0 for row in run.rows) >= 2, run.rows[-1]["env_steps"]
    task = result.task
    assert bool(task.seen_ends)
    upright, fallen = jnp.zeros(4), jnp.asarray([0.0, 0.4, 0.0, 0.0])  # [cart, pole angle, velocities]
    assert float(task.end_probability(upright)) < 0.2 and float(task.end_probability(fallen)) > 0.8
    rewards = [row["rollout_reward"] for row in run.rows if row["rollout_reward"] == row["rollout_reward"]]
    assert rewards and all(0.3 < r < 1.1 for r in rewards), rewards  # 1 per step the pole stays up


def test_unsupported_envs_are_refused_clearly():
    import gymnasium

    from forethought.agents import model_value

    with pytest.raises(ForethoughtError, match="flat Box observation and action spaces; its action space is Discrete"):
        mbpo.train(mbpo.Config(**SMALL), gymnasium.make("CartPole-v1"), jax.random.key(0))
    with pytest.raises(ForethoughtError, match="Pendulum-v1 has none.*only mbpo learns a reward model"):
        model_value.train_mve(model_value.MVEConfig(**SMALL), gymnasium.make("Pendulum-v1"), jax.random.key(0))


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
