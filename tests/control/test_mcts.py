"""UCT (seed 000, "Monte Carlo Tree Search"): the Score, a known-answer chain, batching over
roots, the Dyna maze's 14-step path, and bad input."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought.control.mcts import UCT_C, uct, uct_batch, uct_path, uct_score
from forethought.errors import ForethoughtError
from forethought.systems.mazes import dyna_maze

# ----- a chain with a known answer -----------------------------------------------------------
# The state is a pytree (position, moves so far). From any cell, TAKE ends the episode with
# 0.3 at once; GO moves right and, from the last cell, reaches the goal for 1; STAY wastes a
# move. From cell 0 with discount 0.9 the best is GO, GO, GO (0.9^2 * 1 = 0.81 > 0.3), and
# STAY first is worth 0.9 * 0.81 = 0.729.
TAKE, GO, STAY = 0, 1, 2
LENGTH = 3
DISCOUNT = 0.9


def chain_step(state, action):
    position, moves = state
    at_end = position == LENGTH - 1
    reward = jnp.where(action == TAKE, 0.3, jnp.where((action == GO) & at_end, 1.0, 0.0))
    done = (action == TAKE) | ((action == GO) & at_end)
    position = jnp.where(action == GO, jnp.minimum(position + 1, LENGTH - 1), position)
    return (position, moves + 1.0), reward.astype(jnp.float32), done


CHAIN_START = (jnp.int32(0), jnp.float32(0.0))
CHAIN = dict(num_actions=3, max_depth=10, rollout_depth=5, c=0.3, discount=DISCOUNT)


@pytest.fixture(scope="module")
def chain_search():
    return uct(chain_step, CHAIN_START, jax.random.key(0), num_simulations=400, **CHAIN)


def test_score_is_the_notes_formula():
    Q = jnp.array([3.0, 1.0, 0.0, 2.5])
    N = jnp.array([4, 2, 0, 5])
    N_parent, c = 12, 0.4
    score = np.asarray(uct_score(Q, N, N_parent, c))
    for a in (0, 1, 3):
        expected = Q[a] / N[a] + 2 * c * math.sqrt(2 * math.log(N_parent) / N[a])
        assert score[a] == pytest.approx(float(expected), rel=1e-6)
    assert score[2] == np.inf  # untried first
    # C = 0 leaves the mean return; the default C is 1/sqrt(2).
    np.testing.assert_allclose(uct_score(Q, N, N_parent, 0.0)[np.array([0, 1, 3])],
                               [0.75, 0.5, 0.5])
    assert UCT_C == pytest.approx(1 / math.sqrt(2))


def test_the_tree_policy_follows_the_score():
    key = jax.random.key(3)
    settings = dict(CHAIN, num_simulations=30)
    before = uct(chain_step, CHAIN_START, key, **settings)
    # Untried actions first: nodes are numbered in the order they were added, and the first
    # three simulations added the root's three children.
    assert np.asarray(before.tree.parent[1:4]).tolist() == [0, 0, 0]
    assert sorted(np.asarray(before.tree.action[1:4]).tolist()) == [TAKE, GO, STAY]
    # Simulation i uses fold_in(key, i), so a search of n + 1 simulations repeats the search of
    # n and then runs one more: the root child it visits must be the Score's argmax.
    after = uct(chain_step, CHAIN_START, key, **dict(settings, num_simulations=31))
    assert int(before.tree.N[0]) == 30
    score = uct_score(before.q_values * before.visit_counts, before.visit_counts,
                      before.tree.N[0], CHAIN["c"])
    assert np.unique(np.asarray(score)).size == 3  # no tie to break at random
    visited = np.flatnonzero(np.asarray(after.visit_counts - before.visit_counts))
    assert visited.tolist() == [int(jnp.argmax(score))]


def test_chain_known_answer(chain_search):
    out = chain_search
    assert int(out.action) == GO
    visits = np.asarray(out.visit_counts)
    assert visits.sum() == 400
    assert visits[GO] > 0.6 * visits.sum()
    q = np.asarray(out.q_values)
    # TAKE always ends at once with 0.3: its estimate is exact.
    assert q[TAKE] == pytest.approx(0.3, abs=1e-6)
    # GO's estimate approaches 0.81 from below (early rollouts are random, never better).
    assert 0.7 < q[GO] <= 0.81 + 1e-5
    assert q[STAY] < q[GO]


def test_tree_arrays_are_consistent(chain_search):
    tree = chain_search.tree
    n = int(tree.num_nodes)
    N, parent = np.asarray(tree.N), np.asarray(tree.parent)
    assert N[0] == 400 and np.all(N[:n] >= 1) and np.all(N[n:] == 0)
    # Every visit to a node went on to exactly one child or stopped there: once, when it was
    # created (never at the root), or every time at the end of the episode or the depth limit.
    done, depth = np.asarray(tree.done), np.asarray(tree.depth)
    for node in range(n):
        into_children = N[np.flatnonzero(parent[:n] == node)].sum()
        if done[node] or depth[node] == CHAIN["max_depth"]:
            assert into_children == 0
        else:
            assert into_children == N[node] - (node != 0)
    # Node states are what the model gives for the recorded action from the parent.
    positions, moves = (np.asarray(x) for x in tree.states)
    for node in range(1, n):
        p, a = parent[node], int(tree.action[node])
        (s_next, _), r, d = chain_step((positions[p], moves[p]), a)
        assert positions[node] == int(s_next) and moves[node] == moves[p] + 1
        assert float(tree.reward[node]) == pytest.approx(float(r)) and bool(d) == done[node]
        assert tree.depth[node] == tree.depth[p] + 1


# ----- the Dyna maze ---------------------------------------------------------------------------

# Reward 1 only on entering the goal: discount 0.9 so the shorter way scores higher, 32 random
# rollouts of 50 moves averaged per leaf to see that reward from afar, and C relative to each
# node's value, since the returns shrink by 0.9 per move of distance (see mcts.py's docstring
# for what the other choices did).
MAZE = dict(num_simulations=3000, max_depth=50, rollout_depth=50, num_rollouts=32, c=5.0,
            relative_c=True, discount=0.9)


def test_dyna_maze_shortest_path_by_replanning():
    maze = dyna_maze()
    shortest = maze.shortest_path_length()
    assert shortest == 14
    path = uct_path(maze.step, maze.start_state, jax.random.key(0), max_steps=30,
                    num_actions=maze.num_actions, **MAZE)
    length = int(path.length)
    assert bool(path.done) and length == shortest
    states, actions = np.asarray(path.states), np.asarray(path.actions)
    assert states[0] == maze.start_state and states[length] in maze.goal_states
    distance = maze.goal_distances()
    for t in range(length):
        s_next, _, _ = maze.step(states[t], actions[t])
        assert int(s_next) == states[t + 1]
        assert distance[states[t + 1]] == distance[states[t]] - 1
    np.testing.assert_allclose(np.asarray(path.rewards)[:length], [0.0] * 13 + [1.0])
    # Padding after the goal.
    assert np.all(actions[length:] == -1) and np.all(states[length:] == states[length])


def test_batched_roots_equal_separate_searches():
    maze = dyna_maze()
    roots = jnp.array([maze.start_state, maze.index(1, 8), maze.index(5, 5)], jnp.int32)
    keys = jax.random.split(jax.random.key(7), 3)
    settings = dict(num_actions=4, num_simulations=300, max_depth=20, rollout_depth=20,
                    num_rollouts=4, c=5.0, relative_c=True, discount=0.9)
    batch = uct_batch(maze.step, roots, keys, **settings)
    assert batch.visit_counts.shape == (3, 4) and batch.tree.N.shape == (3, 301)
    for i in range(3):
        one = uct(maze.step, roots[i], keys[i], **settings)
        assert int(batch.action[i]) == int(one.action)
        np.testing.assert_array_equal(batch.visit_counts[i], one.visit_counts)
        np.testing.assert_array_equal(batch.tree.N[i], one.tree.N)
        np.testing.assert_array_equal(batch.tree.children[i], one.tree.children)
        np.testing.assert_allclose(batch.q_values[i], one.q_values, rtol=1e-6)
    # One move from the goal, the search knows it exactly.
    assert int(batch.action[1]) == 0  # up
    assert float(batch.q_values[1, 0]) == pytest.approx(1.0)


# ----- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, name", [
    (dict(num_simulations=0), "num_simulations"),
    (dict(num_simulations=2.5), "num_simulations"),
    (dict(num_actions=0), "num_actions"),
    (dict(num_actions=True), "num_actions"),
    (dict(num_actions=5), "num_actions"),  # the maze has 4
    (dict(max_depth=0), "max_depth"),
    (dict(rollout_depth=-1), "rollout_depth"),
    (dict(num_rollouts=0), "num_rollouts"),
    (dict(c=-1.0), "c must"),
    (dict(discount=0.0), "discount"),
    (dict(discount=1.5), "discount"),
    (dict(relative_c="yes"), "relative_c"),
])
def test_bad_settings_name_the_argument(bad, name):
    maze = dyna_maze()
    settings = dict(num_actions=4, num_simulations=10) | bad
    with pytest.raises(ForethoughtError, match=name):
        uct(maze.step, maze.start_state, jax.random.key(0), **settings)


def test_bad_model_and_batch_are_reported():
    def wrong_state(state, action):
        return jnp.zeros(2), jnp.float32(0.0), jnp.bool_(False)

    def wrong_reward(state, action):
        return state, jnp.zeros(3), jnp.bool_(False)

    key = jax.random.key(0)
    with pytest.raises(ForethoughtError, match="next_state"):
        uct(wrong_state, jnp.int32(0), key, num_actions=2, num_simulations=5)
    with pytest.raises(ForethoughtError, match="reward"):
        uct(wrong_reward, jnp.int32(0), key, num_actions=2, num_simulations=5)
    with pytest.raises(ForethoughtError, match="step"):
        uct("not a function", jnp.int32(0), key, num_actions=2, num_simulations=5)
    maze = dyna_maze()
    with pytest.raises(ForethoughtError, match="max_steps"):
        uct_path(maze.step, maze.start_state, key, max_steps=0, num_actions=4)
    with pytest.raises(ForethoughtError, match="num_simulations"):
        uct_path(maze.step, maze.start_state, key, max_steps=5, num_actions=4, num_simulations=0)
    with pytest.raises(ForethoughtError, match="batch"):
        uct_batch(maze.step, jnp.zeros(3, jnp.int32), jax.random.split(key, 2), num_actions=4)
