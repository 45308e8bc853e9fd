"""MPC agents on a tiny known task: a 1-D point mass (the double integrator) driven to the origin."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought import systems
from forethought.agents import mpc
from forethought.agents.base import MemoryRun
from forethought.experiment.run import read_metrics
from tests.agents.plain_env import point_mass_env
from tests.agents.resume import cut_run_folder, without_timing
from forethought.errors import ForethoughtError
from forethought.models.ensemble import Ensemble, EnsembleSpec
from forethought.models.train import TrainConfig, fit
from forethought.systems.gym import SystemEnv

SYSTEM = systems.make("double-integrator", start_position=2.0, init_std=0.2, horizon=30)
SMALL = dict(horizon=12, population=64, iterations=3, particles=5, members=5, hidden=32, layers=2,
             batch_size=32, learning_rate=3e-3, max_epochs=60, patience=10)


def rollout_cost(system, planner, model, x0, key):
    x, U, total = jnp.asarray(x0), planner.initial_plan(), 0.0
    for t in range(system.horizon):
        key, step_key = jax.random.split(key)
        u, U, _ = planner.act(model, x, U, step_key)
        u = jnp.clip(u, system.action_low, system.action_high)
        total += float(system.cost(x, u, t))
        x = system.dynamics(x, u, t)
    return total


@pytest.fixture(scope="module")
def reference_return():
    """The true-dynamics controller with the same planner: what a learned model should reach."""
    result = mpc.train(mpc.PETSConfig(episodes=1, random_episodes=0, model="true", **SMALL),
                       SystemEnv(SYSTEM), jax.random.key(0))
    return result.returns[0]


@pytest.mark.parametrize("config_cls", [mpc.PETSConfig, mpc.NaiveConfig])
def test_pets_and_the_naive_model_solve_the_point_mass(config_cls, reference_return):
    run = MemoryRun()
    result = mpc.train(config_cls(episodes=4, **SMALL), SystemEnv(SYSTEM), jax.random.key(1), run)
    random_return = result.returns[0]
    best_learned = max(result.returns[1:])
    assert reference_return > 0.75 * random_return  # the task is not trivial: random is much worse
    assert best_learned >= 1.1 * reference_return, (result.returns, reference_return)
    assert [row["env_steps"] for row in run.rows] == [30, 60, 90, 120]


def test_the_loop_refits_on_all_the_data(monkeypatch):
    seen = []
    real_fit = mpc.fit

    def recording_fit(model, obs, action, next_obs, key, config):
        seen.append(len(obs))
        return real_fit(model, obs, action, next_obs, key, config)

    monkeypatch.setattr(mpc, "fit", recording_fit)
    mpc.train(mpc.NaiveConfig(episodes=3, **SMALL), SystemEnv(SYSTEM), jax.random.key(2))
    assert seen == [30, 60]  # after the random episode and after the first MPC episode


def test_the_fit_takes_the_configured_matmul_type():
    for dtype in ("float32", "bfloat16"):
        _, train_config, _ = mpc._setup(mpc.PETSConfig(training_matmuls=dtype, **SMALL), SYSTEM)
        assert train_config.matmul_dtype == dtype


def test_the_planner_sees_only_the_model():
    """A model fit to the mirror-image system (force reversed) drives the real one the wrong way."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, (2000, 2)).astype(np.float32)
    u = rng.uniform(-1, 1, (2000, 1)).astype(np.float32)
    true_next = np.asarray(jax.vmap(SYSTEM.dynamics)(x, u, jnp.zeros(2000, int)))
    wrong_next = np.asarray(jax.vmap(SYSTEM.dynamics)(x, -u, jnp.zeros(2000, int)))
    spec = EnsembleSpec(2, 1, members=5, hidden=32, layers=2)
    train = TrainConfig(learning_rate=3e-3, batch_size=64, max_epochs=60, patience=10)
    right, _ = fit(Ensemble.create(spec, jax.random.key(0)), x, u, true_next, jax.random.key(1), train)
    wrong, _ = fit(Ensemble.create(spec, jax.random.key(0)), x, u, wrong_next, jax.random.key(1), train)
    planner = mpc.Planner(mpc.PETSConfig(**SMALL), SYSTEM, spec)
    x0 = SYSTEM.initial_state()
    cost_right = rollout_cost(SYSTEM, planner, right, x0, jax.random.key(3))
    cost_wrong = rollout_cost(SYSTEM, planner, wrong, x0, jax.random.key(3))
    cost_nothing = float(SYSTEM.objective(x0, jnp.zeros((SYSTEM.horizon, 1)))) - float(SYSTEM.terminal_cost(
        SYSTEM.rollout(x0, jnp.zeros((SYSTEM.horizon, 1)))[-1]))
    assert cost_right < 0.75 * cost_nothing
    assert cost_wrong > cost_nothing


def PointMassEnv():
    """The double integrator as a plain Gymnasium env: no built-in system behind it, reward
    `-(x^2 + 0.1 v^2)`, and the episode ends (terminated) if the mass leaves [-4, 4]."""
    return point_mass_env(lambda x, u, t: np.array([x[0] + 0.1 * x[1], x[1] + 0.1 * u]),
                          lambda x, u, t: -(x[0] ** 2 + 0.1 * x[1] ** 2), horizon=30)


def test_a_gymnasium_env_is_solved_with_a_learned_reward():
    run = MemoryRun()
    result = mpc.train(mpc.PETSConfig(episodes=4, **SMALL), PointMassEnv(), jax.random.key(1), run)
    # the random episode drifts about x = 2 (return about -120); planning on the learned reward
    # brings the mass home
    assert max(result.returns[1:]) > 0.6 * result.returns[0], result.returns


def test_given_reward_and_termination_functions_are_planned_on():
    # a reward that pays for going right and an end at x > 3: the planner follows them, not the
    # env's reward (which wants x = 0)
    result = mpc.train(mpc.PETSConfig(episodes=2, **SMALL), PointMassEnv(), jax.random.key(1),
                       reward_fn=lambda x, u: 1.0 + x[0], termination_fn=lambda x: x[0] > 3.0)
    env = PointMassEnv()
    start, _ = env.reset(seed=5)
    obs = start
    for t in range(15):
        obs, *_ = env.step(result.policy(obs, t))
    assert obs[0] > start[0] + 0.3 and obs[1] > 0.3, (start, obs)


def test_unsupported_gymnasium_envs_and_arguments_are_refused_clearly():
    import gymnasium

    with pytest.raises(ForethoughtError, match="flat Box observation and action spaces; its action space is Discrete"):
        mpc.train(mpc.PETSConfig(**SMALL), gymnasium.make("CartPole-v1"), jax.random.key(0))
    with pytest.raises(ForethoughtError, match="model true"):
        mpc.train(mpc.PETSConfig(model="true", random_episodes=0, **SMALL), gymnasium.make("Pendulum-v1"),
                  jax.random.key(0))
    with pytest.raises(ForethoughtError, match="has its own cost"):
        mpc.train(mpc.PETSConfig(**SMALL), SystemEnv(SYSTEM), jax.random.key(0), reward_fn=lambda x, u: 0.0)


@pytest.mark.parametrize("field,value,message", [
    ("particles", 7, "multiple of members"),
    ("random_episodes", 0, "random_episodes"),
    ("horizon", 0, "horizon must be >= 1"),
    ("value_discount", 1.0, "value_discount must be in"),
])
def test_bad_settings_name_the_field(field, value, message):
    with pytest.raises(ForethoughtError, match=message):
        mpc.PETSConfig(**{**SMALL, field: value})


@pytest.mark.parametrize("terminal_value", [False, True])
def test_a_run_cut_off_mid_episode_resumes_to_the_same_numbers(tmp_path, monkeypatch, terminal_value):
    """The checkpoint holds all the loop learns: the model and, with a planning tail, its value."""
    from forethought.experiment.run import Run, read_metrics

    config = mpc.NaiveConfig(episodes=3, terminal_value=terminal_value, **SMALL)

    def new_run(name):
        return Run.create(tmp_path / name, {"agent": "mpc", "env": "double-integrator", "seed": 0})

    mpc.train(config, SystemEnv(SYSTEM), jax.random.key(5), new_run("full"))

    real_run_episode = mpc.run_episode
    calls = {"n": 0}

    def dying_run_episode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed during the third episode
        return real_run_episode(*args, **kwargs)

    monkeypatch.setattr(mpc, "run_episode", dying_run_episode)
    with pytest.raises(KeyboardInterrupt):
        mpc.train(config, SystemEnv(SYSTEM), jax.random.key(5), new_run("cut"))
    monkeypatch.setattr(mpc, "run_episode", real_run_episode)
    assert len(read_metrics(tmp_path / "cut")["episode"]) == 2
    mpc.train(config, SystemEnv(SYSTEM), jax.random.key(5), Run.open(tmp_path / "cut"))
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert resumed["return"] == full["return"]
    assert resumed["model_holdout_loss"][:2] == full["model_holdout_loss"][:2]


def test_the_true_model_controller_balances_the_cartpole_for_the_whole_episode():
    """Planning uses the task's end: a rollout that topples stops earning, so CEM keeps it up."""
    env = SystemEnv(systems.make("cartpole-balance"))
    result = mpc.train(mpc.PETSConfig(episodes=1, random_episodes=0, model="true", horizon=15,
                                      population=64, iterations=3), env, jax.random.key(0))
    assert result.returns == [200.0]


# ----- several seeds as one vmapped program (sweep --vectorize) -------------------------------------

VECTOR = dict(episodes=3, horizon=8, population=16, iterations=2, particles=2, members=2, hidden=16, layers=1,
              batch_size=16, max_epochs=4)


def _close(rows, other):
    """Rows equal up to float reassociation: integers exactly, floats to 1e-4 relative."""
    assert len(rows) == len(other)
    for a, b in zip(without_timing(rows), without_timing(other)):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, nan_ok=True), (k, a, b)


@pytest.mark.parametrize("system_name", ["double-integrator", "cartpole-balance"])
def test_vectorized_seeds_repeat_separate_runs(system_name):
    """Every seed of `train_vectorized` gives its `train` run's rows (episodes that end early, on
    cartpole-balance, included)."""
    env = SystemEnv(systems.make(system_name, horizon=40))
    config = mpc.PETSConfig(**VECTOR)
    keys = [jax.random.key(s) for s in (0, 1, 2)]
    runs = [MemoryRun() for _ in keys]
    results = mpc.train_vectorized(config, env, keys, runs)
    for key, run, result in zip(keys, runs, results):
        alone = MemoryRun()
        mpc.train(config, env, key, alone)
        _close(run.rows, alone.rows)
        assert result.env_steps == run.rows[-1]["env_steps"]
    if system_name == "cartpole-balance":
        assert any(row["length"] < 40 for run in runs for row in run.rows)


def test_vectorized_seeds_at_different_episodes_are_brought_level_on_resume(tmp_path):
    """A kill between two seeds' checkpoints leaves them an episode apart; the resumed program
    runs the late seed alone for that episode and then all together, as an uninterrupted one."""
    env = SystemEnv(SYSTEM)
    config = mpc.PETSConfig(**VECTOR)
    keys = [jax.random.key(s) for s in (0, 1)]
    whole = [MemoryRun() for _ in keys]
    mpc.train_vectorized(config, env, keys, whole)
    paths = [tmp_path / "a", tmp_path / "b"]
    cut = [cut_run_folder(paths[0], stop=2), cut_run_folder(paths[1], stop=1)]
    with pytest.raises(KeyboardInterrupt):  # seed 1 stops after episode 0's checkpoint
        mpc.train_vectorized(config, env, keys, cut)
    assert [len(read_metrics(p)["episode"]) for p in paths] == [1, 1]
    cut = [cut_run_folder(paths[0], stop=2), cut_run_folder(paths[1])]
    with pytest.raises(KeyboardInterrupt):  # killed after seed 0's checkpoint of episode 1, before seed 1's
        mpc.train_vectorized(config, env, keys, cut)
    assert [len(read_metrics(p)["episode"]) for p in paths] == [2, 1]
    mpc.train_vectorized(config, env, keys, [cut_run_folder(p) for p in paths])
    for path, run in zip(paths, whole):
        _close([dict(zip(read_metrics(path), values)) for values in zip(*read_metrics(path).values())], run.rows)


def test_vectorized_runs_refuse_envs_without_a_built_in_system():
    import gymnasium

    env = gymnasium.make("Pendulum-v1")
    with pytest.raises(ForethoughtError, match="need a built-in system's JAX dynamics; env Pendulum-v1"):
        mpc.train_vectorized(mpc.PETSConfig(**VECTOR), env, [jax.random.key(0)])


class QuadraticValue(eqx.Module):
    """V(x) = -x'Px / 2: the return after x under LQR, for the planner's tail."""

    P: jax.Array

    def __call__(self, x):
        return -0.5 * x @ self.P @ x


def test_a_terminal_value_makes_a_one_step_planner_act_like_lqr():
    """With the infinite-horizon LQR value as its tail, MPC over one step is LQR (the force stays
    inside the bound); without it, the one-step planner is myopic and does much worse."""
    system = systems.make("double-integrator", start_position=2.0, horizon=30)
    A, B, Q, R = (np.asarray(m, np.float64) for m in (system.A, system.B, system.Q, system.R))
    P = Q
    for _ in range(2000):
        P = Q + A.T @ P @ A - A.T @ P @ B @ np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
    K = np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
    x, lqr_cost = np.array([2.0, 0.0]), 0.0
    for t in range(system.horizon):
        u = -K @ x
        lqr_cost += float(system.cost(x, u, t))
        x = A @ x + B @ u
    config = mpc.PETSConfig(model="true", random_episodes=0, horizon=1, population=256, iterations=5)
    planner = mpc.Planner(config, system, None)
    x0, key = system.initial_state(), jax.random.key(0)
    with_tail = rollout_cost(system, planner, (None, None, QuadraticValue(jnp.asarray(P, jnp.float32))), x0, key)
    without = rollout_cost(system, planner, None, x0, key)
    assert with_tail == pytest.approx(lqr_cost, rel=0.04)  # CEM on one step: 35.7 against 35.0
    assert without > 1.4 * lqr_cost, (without, lqr_cost)  # 59.2
