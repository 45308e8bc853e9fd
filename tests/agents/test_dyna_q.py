"""Tabular Dyna-Q and Dyna-Q+ (note 001's box; Sutton & Barto 8.2, 8.3) on the book's mazes."""

import json

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought.agents import dyna_q
from forethought.agents.base import MemoryRun, episode_key
from forethought.cli import main
from forethought.errors import ForethoughtError
from forethought.experiment.run import Run, read_metrics
from forethought.rl import tabular
from forethought.systems import make_env, mazes
from forethought.systems.mazes import ACTIONS

UP, DOWN, RIGHT, LEFT = (ACTIONS.index(name) for name in ("up", "down", "right", "left"))
BOOK = tabular.Hyper(alpha=0.1, epsilon=0.1, gamma=0.95, kappa=0.0)


# ----- the pieces, by hand -------------------------------------------------------------------

def test_one_q_learning_update_is_the_hand_computed_value():
    q = jnp.array([[0.0, 0.5], [0.2, -1.0], [0.3, 0.7]])
    # Q(0,1) + alpha [r + gamma max_a Q(2,a) - Q(0,1)] = 0.5 + 0.5 (1 + 0.9 * 0.7 - 0.5) = 1.065
    updated = tabular.q_update(q, 0, 1, 1.0, 2, False, 0.5, 0.9)
    assert float(updated[0, 1]) == pytest.approx(1.065)
    assert np.array_equal(np.asarray(updated.at[0, 1].set(q[0, 1])), np.asarray(q))  # nothing else moved
    # A step that ends the episode does not bootstrap: 0.5 + 0.5 (1 - 0.5) = 0.75.
    assert float(tabular.q_update(q, 0, 1, 1.0, 2, True, 0.5, 0.9)[0, 1]) == pytest.approx(0.75)


def test_epsilon_greedy_breaks_ties_uniformly_and_explores_with_probability_epsilon():
    keys = jax.random.split(jax.random.key(0), 6000)
    q_row = jnp.array([1.0, 0.0, 1.0, 1.0])
    greedy = np.asarray(jax.vmap(lambda k: tabular.epsilon_greedy(q_row, 0.0, k))(keys))
    counts = np.bincount(greedy, minlength=4) / len(keys)
    assert counts[1] == 0 and np.allclose(counts[[0, 2, 3]], 1 / 3, atol=0.03)
    explore = np.asarray(jax.vmap(lambda k: tabular.epsilon_greedy(q_row, 0.4, k))(keys))
    # The worse action comes only from exploring: 0.4 * 1/4.
    assert np.mean(explore == 1) == pytest.approx(0.1, abs=0.015)


def test_the_model_records_exactly_the_real_step():
    table = tabular.init_table(6, 4)
    table = tabular.model_update(table, 3, RIGHT, 0.5, 4, False)
    table = tabular.model_update(table, 4, UP, 1.0, 1, True)
    table = tabular.model_update(table, 3, LEFT, 0.0, 2, False)
    assert int(table.next_state[3, RIGHT]) == 4 and float(table.reward[3, RIGHT]) == 0.5
    assert bool(table.done[4, UP]) and not bool(table.done[3, RIGHT])
    assert np.argwhere(np.asarray(table.tried)).tolist() == [[3, RIGHT], [3, LEFT], [4, UP]]
    assert np.asarray(table.visited)[: int(table.num_visited)].tolist() == [3, 4]
    assert int(table.steps) == 3
    assert int(table.last_tried[3, RIGHT]) == 1 and int(table.last_tried[3, LEFT]) == 3
    # Untried pairs keep Dyna-Q+'s prior: back to the same state, reward 0.
    assert int(table.next_state[3, DOWN]) == 3 and float(table.reward[3, DOWN]) == 0.0


def test_planning_without_real_experience_changes_nothing():
    table = tabular.init_table(54, 4)
    for untried in (False, True):
        planned = tabular.plan(table, jax.random.key(0), BOOK._replace(kappa=1.0), 50, untried)
        assert np.array_equal(np.asarray(planned.q), np.zeros((54, 4)))


def test_planning_follows_the_learned_model_even_where_the_maze_disagrees():
    """The model claims RIGHT from the Dyna maze's start reaches the goal (reward 1, episode over);
    the real maze moves one cell right for reward 0. Planning (which is given no maze) drives
    Q(start, RIGHT) to the model's value 1, and touches no pair the model has not seen."""
    maze = mazes.dyna_maze()
    s = maze.start_state
    assert float(maze.reward[s, RIGHT]) == 0.0 and not bool(maze.terminal[maze.next_state[s, RIGHT]])
    table = tabular.model_update(tabular.init_table(maze.num_states, 4), s, RIGHT, 1.0,
                                 maze.goal_states[0], True)
    planned = tabular.plan(table, jax.random.key(1), BOOK._replace(alpha=0.5), 60, False)
    q = np.asarray(planned.q)
    assert q[s, RIGHT] == pytest.approx(1.0, abs=1e-6)
    assert np.count_nonzero(q) == 1


def test_dyna_q_plus_plans_with_the_bonus_and_with_untried_actions():
    """One real step from state 0 (RIGHT, reward 0, to state 1), then the clock is set 100 steps
    later. Dyna-Q+ plans the tried pair with reward kappa sqrt(100) and, per the book's footnote,
    the untried actions of state 0 as "stay, reward 0" plus the bonus kappa sqrt(tau)."""
    kappa, gamma = 0.01, 0.5
    table = tabular.model_update(tabular.init_table(3, 4), 0, RIGHT, 0.0, 1, False)
    table = table._replace(steps=jnp.int32(101))  # tau = 100 for RIGHT, 101 for the others
    hyper = tabular.Hyper(alpha=1.0, epsilon=0.1, gamma=gamma, kappa=kappa)

    one = tabular.plan(table, jax.random.key(0), hyper, 1, False)  # only (0, RIGHT) can be drawn
    assert float(one.q[0, RIGHT]) == pytest.approx(kappa * 10.0)  # + gamma max Q(1, .) = 0

    many = np.asarray(tabular.plan(table, jax.random.key(0), hyper, 400, True).q)
    # Untried a at state 0: Q = kappa sqrt(101) + gamma max_a' Q(0, a'), a fixed point of
    # x = b + gamma x with b = kappa sqrt(101) (the untried actions hold the largest value).
    untried = kappa * np.sqrt(101) / (1 - gamma)
    assert many[0, [UP, DOWN, LEFT]] == pytest.approx([untried] * 3, rel=1e-4)
    assert many[0, RIGHT] == pytest.approx(kappa * 10.0, rel=1e-4)
    assert np.count_nonzero(many[1:]) == 0  # state 1 was never acted from: never planned from

    plain = np.asarray(tabular.plan(table, jax.random.key(0), hyper._replace(kappa=0.0), 400, False).q)
    assert np.count_nonzero(plain) == 0  # Dyna-Q: the model's reward 0, nothing to learn yet


# ----- the agent against the book's mazes -----------------------------------------------------

def test_the_agent_and_the_all_jax_episodes_take_the_same_steps():
    """`dyna_q.train` stepping a MazeEnv in Python and `tabular.run_episodes` stepping the maze in
    JAX use the same randomness, so the benchmark's runs are the agent's runs."""
    for env, config in ((make_env("dyna-maze"), dyna_q.Config(episodes=6, planning_steps=5)),
                        (make_env("shortcut-maze", change_at=300),
                         dyna_q.PlusConfig(episodes=6, planning_steps=5))):
        result = dyna_q.train(config, env, jax.random.key(3))
        tables, lengths, returns = tabular.run_episodes(env.world, jax.random.key(3)[None], config.hyper(),
                                                        config.planning_steps, config.episodes)
        assert result.lengths == np.asarray(lengths)[0].tolist()
        assert result.returns == np.asarray(returns)[0].tolist() == [1.0] * 6
        assert np.allclose(result.table.q, np.asarray(tables.q[0]), atol=1e-5)
        assert np.array_equal(result.table.tried, np.asarray(tables.tried[0]))
    table, length, total = tabular.run_episode(  # the last world, one episode at a time
        tabular.init_table(env.world.num_states, 4), env.world, episode_key(jax.random.key(3), 0),
        config.hyper(), config.planning_steps)
    assert (int(length), float(total)) == (result.lengths[0], 1.0)


def test_runs_need_a_batch_of_keys():
    with pytest.raises(ForethoughtError, match="run_keys must be a 1-D array of typed PRNG keys"):
        tabular.run_episodes(mazes.dyna_maze(), jax.random.key(0), BOOK, 5, 2)


def test_figure_8_2_fifty_planning_steps_reach_the_optimum_within_a_few_episodes():
    """The Dyna maze's shortest path takes 14 steps; with epsilon = 0.1 an episode of the optimal
    greedy policy averages about 16.4 (`benchmarks/dyna_maze.py` computes it exactly). Averaged
    over 10 runs, n = 50 is there from episode 3 on; n = 0 (Q-learning) is far from it."""
    keys = jax.random.split(jax.random.key(0), 10)
    _, planned, _ = tabular.run_episodes(mazes.dyna_maze(), keys, BOOK, 50, 8)
    _, direct, _ = tabular.run_episodes(mazes.dyna_maze(), keys, BOOK, 0, 8)
    planned, direct = np.asarray(planned).mean(0), np.asarray(direct).mean(0)
    assert planned[0] == direct[0]  # Q stays 0 until the goal is found: the same first episode
    assert np.all(planned[2:] < 20), planned
    assert np.all(direct[2:] > 100), direct


def test_figure_8_5_dyna_q_plus_finds_the_shortcut_and_dyna_q_does_not():
    """Shortcut maze: 16 steps the long way; after step 3000 a 10-step shortcut opens. Over the
    last 1000 of 6000 steps, Dyna-Q+ (kappa 1e-3) reaches the goal about 80 times per run (the
    short way, with epsilon's detours), Dyna-Q about 55 (still the long way)."""
    keys = jax.random.split(jax.random.key(0), 4)
    world = mazes.shortcut_maze()
    hyper = tabular.Hyper(alpha=1.0, epsilon=0.1, gamma=0.95, kappa=0.0)
    _, plain = tabular.run_steps(world, keys, hyper, 50, 6000)
    _, plus = tabular.run_steps(world, keys, hyper._replace(kappa=1e-3), 50, 6000)
    plain_goals, plus_goals = np.asarray(plain)[:, -1000:].sum(1), np.asarray(plus)[:, -1000:].sum(1)
    assert np.all(plus_goals >= 70), plus_goals
    assert np.all(plain_goals <= 62), plain_goals


# ----- settings, envs, resume, CLI ------------------------------------------------------------

@pytest.mark.parametrize("config_cls,field,value,message", [
    (dyna_q.Config, "episodes", 0, "episodes must be an integer >= 1, got 0"),
    (dyna_q.Config, "planning_steps", -1, "planning_steps must be an integer >= 0, got -1"),
    (dyna_q.Config, "alpha", 0.0, r"alpha must be in \(0, 1\], got 0.0"),
    (dyna_q.Config, "epsilon", 1.5, r"epsilon must be in \[0, 1\], got 1.5"),
    (dyna_q.Config, "gamma", float("nan"), r"gamma must be in \[0, 1\], got nan"),
    (dyna_q.Config, "kappa", -0.1, "kappa must be a finite number >= 0, got -0.1"),
    (dyna_q.PlusConfig, "kappa", 0.0, "kappa must be > 0 for Dyna-Q\\+"),
])
def test_bad_settings_name_the_field(config_cls, field, value, message):
    with pytest.raises(ForethoughtError, match=message):
        config_cls(**{field: value})


def test_dyna_q_plus_defaults():
    assert dyna_q.PlusConfig().kappa == 1e-3 and dyna_q.Config().kappa == 0.0
    assert dyna_q.PlusConfig().planning_steps == dyna_q.Config().planning_steps == 50


def test_non_tabular_envs_are_refused_clearly():
    discrete = "Discrete observation space and a Discrete action space"
    with pytest.raises(ForethoughtError, match=discrete) as info:
        dyna_q.train(dyna_q.Config(), make_env("pendulum"), jax.random.key(0))
    assert "env 'pendulum' has observations Box" in str(info.value)
    with pytest.raises(ForethoughtError, match="Dyna-Q\\+ is tabular.*'CartPole-v1'"):
        dyna_q.train(dyna_q.PlusConfig(), gymnasium.make("CartPole-v1"), jax.random.key(0))


def test_other_discrete_envs_work():
    """Gymnasium's FrozenLake without slipping: the goal is 6 steps away; holes end episodes."""
    env = gymnasium.make("FrozenLake-v1", is_slippery=False)
    result = dyna_q.train(dyna_q.Config(episodes=100, planning_steps=20, alpha=0.5), env, jax.random.key(0))
    assert result.table.q.shape == (16, 4) and sum(result.returns[-20:]) >= 15
    from forethought.agents.base import run_episode

    greedy = run_episode(env, result.policy, seed=0)
    assert greedy.total_reward == 1.0 and greedy.length == 6


class DyingEnv(gymnasium.Wrapper):
    """Raises KeyboardInterrupt (a kill) on the given total step."""

    def __init__(self, env, die_at):
        super().__init__(env)
        self.die_at, self.steps = die_at, 0

    def step(self, action):
        self.steps += 1
        if self.steps == self.die_at:
            raise KeyboardInterrupt
        return self.env.step(action)


def test_a_run_cut_off_mid_episode_resumes_to_the_same_numbers(tmp_path):
    """On the blocking maze with the wall moving after 400 steps, cut in an episode before the
    move: the resumed run restores the table and the maze's step count and meets the move where
    the uninterrupted run did."""
    config = dyna_q.Config(episodes=6, planning_steps=5)

    def env():
        return make_env("blocking-maze", change_at=400)

    def new_run(name):
        return Run.create(tmp_path / name, {"agent": "dyna-q", "env": "blocking-maze", "seed": 0})

    full = dyna_q.train(config, env(), jax.random.key(5), new_run("full"))
    steps = np.cumsum(full.lengths)
    assert steps[1] < 400 < steps[-1], steps  # the wall moves after the cut, before the end
    with pytest.raises(KeyboardInterrupt):
        dyna_q.train(config, DyingEnv(env(), die_at=int(steps[1]) + 3), jax.random.key(5), new_run("cut"))
    assert len(read_metrics(tmp_path / "cut")["episode"]) == 2
    resumed = dyna_q.train(config, env(), jax.random.key(5), Run.open(tmp_path / "cut"))
    assert resumed.lengths == full.lengths and resumed.returns == full.returns
    assert np.array_equal(resumed.table.q, full.table.q)
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    for column in ("episode", "env_steps", "return", "length", "model_pairs"):
        assert a[column] == b[column]


def test_memory_run_rows_have_the_standard_columns():
    run = MemoryRun()
    dyna_q.train(dyna_q.Config(episodes=2, planning_steps=5), make_env("dyna-maze"), jax.random.key(0), run)
    assert list(run.rows[0]) == ["episode", "env_steps", "return", "length", "wall_seconds", "model_pairs"]
    assert run.rows[1]["env_steps"] == run.rows[0]["length"] + run.rows[1]["length"]


def test_cli_runs_dyna_q_and_dyna_q_plus(tmp_path, capsys):
    out = tmp_path / "dq"
    assert main(["run", "dyna-q", "--env", "dyna-maze", "--planning-steps", "40", "--episodes", "5",
                 "--out", str(out)]) == 0
    assert read_metrics(out)["episode"] == [0, 1, 2, 3, 4]
    assert json.loads((out / "config.json").read_text())["config"]["planning_steps"] == 40
    assert (out / "learning_curve.png").exists() and (out / "final_episode.gif").exists()
    plus = tmp_path / "dqp"
    assert main(["run", "dyna-q-plus", "--env", "dyna-maze", "--episodes", "5", "--out", str(plus)]) == 0
    assert json.loads((plus / "config.json").read_text())["config"]["kappa"] == 1e-3
    capsys.readouterr()
    assert main(["run", "dyna-q", "--planning-steps", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "planning_steps must be an integer >= 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["run", "dyna-q", "--env", "pendulum", "--out", str(tmp_path / "pendulum")]) == 2
    assert "Discrete observation space" in capsys.readouterr().err
