"""Mazes of Sutton & Barto chapter 8 (Examples 8.1 to 8.3) as arrays, and their Gymnasium env."""

from __future__ import annotations

import warnings

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.envs.registration import EnvSpec
from gymnasium.utils.env_checker import check_env

from forethought import systems
from forethought.errors import ForethoughtError
from forethought.systems import mazes
from forethought.systems.mazes import ACTIONS, ChangingMaze, Maze, MazeEnv

UP, DOWN, RIGHT, LEFT = (ACTIONS.index(name) for name in ("up", "down", "right", "left"))


def reference_next(walls, s, a):
    """The move rule written out cell by cell, independent of the vectorised table."""
    rows, cols = walls.shape
    r, c = divmod(s, cols)
    dr, dc = {UP: (-1, 0), DOWN: (1, 0), RIGHT: (0, 1), LEFT: (0, -1)}[a]
    r2, c2 = r + dr, c + dc
    if 0 <= r2 < rows and 0 <= c2 < cols and not walls[r2, c2]:
        return r2 * cols + c2
    return s


def wall_cells(maze):
    return {(int(r), int(c)) for r, c in np.argwhere(np.asarray(maze.walls))}


# ----- Example 8.1 -------------------------------------------------------------------------------

def test_dyna_maze_matches_example_8_1():
    m = systems.make("dyna-maze")
    assert m.shape == (6, 9) and m.num_states == 54 and m.num_actions == 4
    assert m.start == (2, 0) and m.goals == ((0, 8),)
    assert wall_cells(m) == {(1, 2), (2, 2), (3, 2), (0, 7), (1, 7), (2, 7), (4, 5)}
    assert m.shortest_path_length() == 14
    assert m.next_state.dtype == jnp.int32 and m.next_state.shape == (54, 4)
    assert m.reward.dtype == jnp.float32 and m.reward.shape == (54, 4)
    assert m.terminal.dtype == jnp.bool_ and m.terminal.shape == (54,)
    assert np.flatnonzero(np.asarray(m.terminal)).tolist() == [m.index(0, 8)]


def test_fourteen_step_path_reaches_goal_under_scan():
    m = mazes.dyna_maze()
    # Down round the bottom of the left wall, along row 3 under the right wall, up to G.
    path = jnp.array([DOWN, DOWN, RIGHT, RIGHT, RIGHT, UP] + [RIGHT] * 5 + [UP] * 3)
    assert path.shape == (14,)

    @jax.jit
    def run(maze, actions):
        def body(s, a):
            s_next, r, done = maze.step(s, a)
            return s_next, (s_next, r, done)
        return jax.lax.scan(body, jnp.int32(maze.start_state), actions)[1]

    states, rewards, dones = run(m, path)
    assert int(states[-1]) == m.index(0, 8)
    assert rewards.tolist() == [0.0] * 13 + [1.0]
    assert dones.tolist() == [False] * 13 + [True]
    # The goal is absorbing: no more reward, still done.
    for a in range(4):
        s, r, done = m.step(m.index(0, 8), a)
        assert (int(s), float(r), bool(done)) == (m.index(0, 8), 0.0, True)


def test_tables_agree_with_step_under_jit_and_vmap_and_with_the_move_rule():
    m = mazes.dyna_maze()
    s, a = jnp.meshgrid(jnp.arange(m.num_states), jnp.arange(m.num_actions), indexing="ij")
    s_next, r, done = jax.jit(jax.vmap(jax.vmap(Maze.step, (None, 0, 0)), (None, 0, 0)))(m, s, a)
    np.testing.assert_array_equal(s_next, m.next_state)
    np.testing.assert_array_equal(r, m.reward)
    np.testing.assert_array_equal(done, np.asarray(m.terminal)[np.asarray(m.next_state)])
    walls = np.asarray(m.walls)
    goal = m.index(0, 8)
    for state in range(m.num_states):
        for action in range(4):
            expected = state if state == goal else reference_next(walls, state, action)
            where = (m.position(state), ACTIONS[action])
            assert int(m.next_state[state, action]) == expected, where
            assert float(m.reward[state, action]) == float(expected == goal and state != goal)


def test_walls_and_edges_block():
    m = mazes.dyna_maze()
    assert int(m.step(m.index(2, 1), RIGHT)[0]) == m.index(2, 1)  # into the wall at (2, 2)
    assert int(m.step(m.index(4, 4), RIGHT)[0]) == m.index(4, 4)  # into the wall at (4, 5)
    assert int(m.step(m.index(2, 0), LEFT)[0]) == m.index(2, 0)  # off the left edge
    assert int(m.step(m.index(5, 3), DOWN)[0]) == m.index(5, 3)  # off the bottom edge
    assert int(m.step(m.index(0, 0), UP)[0]) == m.index(0, 0)  # off the top edge
    assert int(m.step(m.index(2, 0), UP)[0]) == m.index(1, 0)  # a free move
    assert m.position(m.index(4, 5)) == (4, 5)


def test_maze_is_a_pytree_with_static_geometry():
    m = mazes.dyna_maze()
    leaves, treedef = jax.tree.flatten(m)
    assert len(leaves) == 4
    assert jax.tree.unflatten(treedef, leaves) == m
    # A batch of same-shaped mazes vmaps: here the Dyna maze and the same grid with no walls.
    open_maze = Maze.from_walls(np.zeros((6, 9), bool), m.start, m.goals)
    batch = jax.tree.map(lambda x, y: jnp.stack([x, y]), m, open_maze)
    s_next = jax.vmap(Maze.step, (0, None, None))(batch, m.index(2, 1), RIGHT)[0]
    assert s_next.tolist() == [m.index(2, 1), m.index(2, 2)]


# ----- text layouts ------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    mazes.dyna_maze,
    lambda: mazes.blocking_maze().before, lambda: mazes.blocking_maze().after,
    lambda: mazes.shortcut_maze().before, lambda: mazes.shortcut_maze().after,
    lambda: Maze.from_layout("G.#\nS.G"),
])
def test_layout_round_trip(make):
    m = make()
    assert Maze.from_layout(m.to_layout()) == m
    assert systems.make("maze", layout=m.to_layout()) == m


def test_from_layout_ignores_indentation_and_reads_several_goals():
    m = Maze.from_layout("""
        G..
        .#.
        S.G
    """)
    assert m.shape == (3, 3) and m.start == (2, 0) and m.goals == ((0, 0), (2, 2))
    assert m.shortest_path_length() == 2
    assert m != mazes.dyna_maze()


@pytest.mark.parametrize("layout, message", [
    ("S..\n.G", r"same length; row 0 has 3 characters, row 1 has 2"),
    ("S.x\n..G", r"one of '#' .*got 'x' at row 0, col 2"),
    ("...\n..G", r"exactly one 'S' \(start\), got none"),
    ("S.S\n..G", r"exactly one 'S' \(start\), got 2, at \[\(0, 0\), \(0, 2\)\]"),
    ("S..\n...", r"at least one 'G' \(goal\), got none"),
    ("  \n ", r"at least one row"),
])
def test_bad_layouts_say_what_is_wrong(layout, message):
    with pytest.raises(ForethoughtError, match=r"Maze.from_layout: layout .*" + message):
        Maze.from_layout(layout)


def test_bad_arguments_are_reported():
    with pytest.raises(ForethoughtError, match="layout must be a string, got list"):
        Maze.from_layout(["S.G"])
    with pytest.raises(ForethoughtError, match=r"start must lie inside the 2x3 grid, got \(5, 0\)"):
        Maze.from_walls(np.zeros((2, 3), bool), (5, 0), [(0, 2)])
    with pytest.raises(ForethoughtError, match=r"goal must be a free cell, got a wall at \(0, 2\)"):
        Maze.from_walls(np.array([[0, 0, 1], [0, 0, 0]], bool), (1, 0), [(0, 2)])
    with pytest.raises(ForethoughtError, match="walls must be a boolean array"):
        Maze.from_walls(np.zeros((2, 3)), (1, 0), [(0, 2)])
    with pytest.raises(ForethoughtError, match="no goal can be reached"):
        Maze.from_layout("S#G").shortest_path_length()
    with pytest.raises(ForethoughtError, match="bad parameters"):
        systems.make("dyna-maze", rows=3)


# ----- Examples 8.2 and 8.3: changing worlds ---------------------------------------------------

ROW3_GAP_RIGHT = {(3, c) for c in range(0, 8)}
ROW3_GAP_LEFT = {(3, c) for c in range(1, 9)}
ROW3_GAPS_BOTH = {(3, c) for c in range(1, 8)}


def test_blocking_maze_closes_the_short_way_after_1000_steps():
    world = systems.make("blocking-maze")
    assert isinstance(world, ChangingMaze) and world.change_at == 1000
    before, after = world.before, world.after
    for m in (before, after):
        assert m.shape == (6, 9) and m.start == (5, 3) and m.goals == ((0, 8),)
    assert wall_cells(before) == ROW3_GAP_RIGHT and wall_cells(after) == ROW3_GAP_LEFT
    # The way round the wall moves from its right end (10 steps) to its left end (16 steps).
    assert before.shortest_path_length() == 10
    assert after.shortest_path_length() == 16
    assert world.maze_at(999) is before and world.maze_at(1000) is after


def test_shortcut_maze_opens_a_shorter_way_after_3000_steps():
    world = systems.make("shortcut-maze")
    assert world.change_at == 3000
    before, after = world.before, world.after
    for m in (before, after):
        assert m.shape == (6, 9) and m.start == (5, 3) and m.goals == ((0, 8),)
    assert wall_cells(before) == ROW3_GAP_LEFT and wall_cells(after) == ROW3_GAPS_BOTH
    assert before.shortest_path_length() == 16
    assert after.shortest_path_length() == 10
    # The long way on the left stays open: from (4, 0) the goal is still 12 steps away.
    assert after.goal_distances()[after.index(4, 0)] == 12
    assert before.goal_distances()[before.index(4, 0)] == 12
    assert systems.make("shortcut-maze", change_at=10).change_at == 10


def test_maze_at_with_a_traced_step_and_a_wall_under_the_agent():
    world = mazes.blocking_maze()
    step = jax.jit(lambda w, t, s, a: w.maze_at(t).step(s, a)[0])
    below_gap = world.before.index(4, 8)
    assert int(step(world, 999, below_gap, UP)) == world.before.index(3, 8)
    assert int(step(world, 1000, below_gap, UP)) == below_gap
    # An agent standing in the right-hand gap when it closes can still step off the new wall.
    assert int(world.after.step(world.after.index(3, 8), DOWN)[0]) == world.after.index(4, 8)
    with pytest.raises(ForethoughtError, match="same shape"):
        ChangingMaze(world.before, Maze.from_layout("S.G"), 5)
    with pytest.raises(ForethoughtError, match="change_at must be an integer >= 0, got -1"):
        ChangingMaze(world.before, world.after, -1)


# ----- pictures ----------------------------------------------------------------------------------

def test_render_shape_dtype_and_agent():
    m = mazes.dyna_maze()
    empty = m.render(size=64)
    assert empty.shape == (64, 64, 3) and empty.dtype == np.uint8
    image = m.render(m.start_state)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    assert not np.array_equal(image, m.render(m.index(5, 8)))
    assert image.min() < 100 and image.max() > 200  # dark walls on a light floor


# ----- Gymnasium ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dyna-maze", "blocking-maze", "shortcut-maze"])
def test_check_env(name):
    # Made from a spec, so that check_env also re-makes the env in each declared render mode.
    spec = EnvSpec(id=f"forethought-test/{name}-v0", entry_point=MazeEnv,
                   kwargs={"maze": systems.make(name), "max_episode_steps": 50})
    env = gymnasium.make(spec, render_mode="rgb_array").unwrapped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=False)
    assert [str(w.message) for w in caught] == []
    assert env.render().shape == (256, 256, 3)


def test_env_plays_the_maze_and_truncates():
    env = MazeEnv(mazes.dyna_maze(), max_episode_steps=3)
    obs, info = env.reset(seed=0)
    assert obs == env.maze.start_state and info["position"] == (2, 0)
    assert env.observation_space.n == 54 and env.action_space.n == 4
    assert env.step(RIGHT)[1:4] == (0.0, False, False)
    assert env.step(RIGHT)[1:4] == (0.0, False, False)  # blocked by the wall at (2, 2)
    obs, reward, terminated, truncated, info = env.step(UP)
    assert (terminated, truncated, info["position"]) == (False, True, (1, 1))
    with pytest.warns(UserWarning, match="render_mode is None"):
        assert env.render() is None
    with pytest.raises(ForethoughtError, match=r"action must be an integer in \[0, 4\), got 4"):
        env.step(4)
    with pytest.raises(ForethoughtError, match="render_mode must be None or one of"):
        MazeEnv(mazes.dyna_maze(), render_mode="human")


def test_env_reaches_the_goal_with_reward_one():
    env = MazeEnv(mazes.dyna_maze())
    env.reset()
    path = [DOWN, DOWN, RIGHT, RIGHT, RIGHT, UP] + [RIGHT] * 5 + [UP] * 3
    results = [env.step(a) for a in path]
    assert [r[1] for r in results] == [0.0] * 13 + [1.0]
    assert [r[2] for r in results] == [False] * 13 + [True]
    assert results[-1][0] == env.maze.index(0, 8)


def test_env_switches_layout_after_change_at_total_steps_across_episodes():
    env = MazeEnv(mazes.blocking_maze(change_at=5), max_episode_steps=2)
    before, after = env.world.before, env.world.after
    env.reset()
    for _ in range(2):  # episode 1: 2 steps, truncated
        env.step(RIGHT)
    env.reset()
    for _ in range(3):  # episode 2: 3 more steps brings the total to 5
        assert env.maze is before
        env.step(LEFT)
        if env.elapsed == 2:
            env.reset()
    assert env.total_steps == 5 and env.maze is after
    # Step 5 and later use the new layout: the right-hand gap is closed.
    env.state = after.index(4, 8)
    assert env.step(UP)[0] == after.index(4, 8)
    env.reset(seed=1)  # the world's clock runs on across resets, seeded or not
    assert env.total_steps == 6 and env.maze is after
