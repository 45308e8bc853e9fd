"""Monte Carlo tree search with UCT, for discrete actions over a known model.

Seed 000, "Monte Carlo Tree Search (MCTS)". One simulation is the notes' three steps:

1. choose a leaf `s_l` with TreePolicy(`s_1`): from the root, while the node is fully
   expanded, go to the child with the best

       Score(s_t) = Q(s_t) / N(s_t) + 2 C sqrt(2 ln N(s_{t-1}) / N(s_t)),

   and at the first node that is not fully expanded, choose an untried action and add its
   child (expansion). An untried child scores +inf, so "untried first" and the Score are one
   argmax, ties broken at random;
2. evaluate the leaf with DefaultPolicy(`s_l`): uniformly random actions for `rollout_depth`
   steps, rewards discounted by `discount`, stopped at `done`;
3. update all values between `s_1` and `s_l` (backup): every node on the path gets `N += 1`
   and `Q +=` the return of this simulation.

Symbols as in the notes: `N(s)` is a node's visit count and `Q(s)` the *sum* of the returns of
the simulations through it, so `Q/N` is their mean. The reward of the move into a node is part
of that node's return (`Q(s_t)` sums `r(s_{t-1}, a_{t-1}) + discount * G(s_t)`), so among
siblings `Q/N` estimates the action value `Q(s_{t-1}, a)`; at the root `Q/N` estimates `V(s_1)`.

Choosing the settings (measured on the Dyna maze, `tests/control/test_mcts.py`):

- `c`: the default `C = 1/sqrt(2)` is Kocsis and Szepesvari's constant for returns in [0, 1]
  (Browne et al. 2012, "A Survey of MCTS Methods", section 3.3, the form the notes write). `C`
  is in units of the return, and with a reward only at a goal the returns shrink like
  `discount ** distance`: on the Dyna maze with `discount = 0.9` the search sees returns near
  1e-4 fourteen steps from the goal and near 0.5 one step from it. No fixed `C` suits both: at
  `C = 1/sqrt(2)` the tree is breadth-first and never reaches the goal; at `C = 0.03` it is
  breadth-first far from the goal and greedy near it (with 2000 simulations, 32 rollouts of
  50 steps and `discount = 0.9`, 15 of 16 runs took the 14-step path; at `C = 0.01`, 25 of
  32).
- `relative_c=True` multiplies `C` by `|V|` of the node being left, its current value
  estimate, so that the exploration bonus is a fraction of the value at hand at every distance
  (and the search does not change when all rewards are scaled). `V` is `Q/N` of the node less
  the move into it. This is the notes' Score with a per-node `C`, the same idea as normalising
  `Q` before the Score (MuZero; mctx's `qtransform_by_parent_and_siblings`). With `C = 5`
  and the settings above, 47 of 48 runs took the 14-step path; with 3000 simulations, 63 of
  64 (`C = 3`: also 63 of 64).
- `discount < 1` makes a shorter way to a reward worth more; with `discount = 1` every path that
  reaches a goal scores the same. Neither small nor near 1 is best: with the relative `C = 5`
  and 3000 simulations, 5 of 16 runs took the 14-step path at 0.5, 13 of 16 at 0.7, 46 of 48
  at 0.8, 63 of 64 at 0.9 and 4 of 16 at 0.98. A small discount leaves the rollouts from far
  cells almost nothing to report; one near 1 leaves neighbouring cells' values too close.
- `num_rollouts`: the leaf value is the mean of this many independent rollouts, run side by
  side with `vmap` (leaf parallelisation, Cazenave and Jouandeau 2007). It estimates the same
  DefaultPolicy value with `1/num_rollouts` of the variance. A sparse reward needs it: one
  random rollout from the Dyna maze's start reaches the goal within 50 steps 4 times in 1000,
  and neighbouring cells' values differ by a few hundredths of a single rollout's spread. With
  the settings above, no run of 16 took the 14-step path with 1 rollout per leaf, 13 of 16
  with 8, and 63 of 64 with 32. It costs time: 3000 simulations took 56 ms on one CPU core
  with 1 rollout of 50 steps and 310 ms with 32 (the tree walk alone, 48 ms).

The model is any pure function `step(state, action) -> (next_state, reward, done)` over JAX
arrays: `state` any pytree (an int32 scalar for `forethought.systems.mazes`), `action` an int32
scalar in `[0, num_actions)`, `reward` a float scalar, `done` a bool scalar. The tree is a set
of fixed-size arrays over `num_simulations + 1` node slots (each simulation adds at most one
node), the simulations are a `lax.fori_loop`, and the whole search is one jit-compiled program,
so `jax.vmap` batches it over roots (`uct_batch`, as mctx batches its searches) and `uct_path`
runs plan, act, replan as one compiled loop.

    >>> m = dyna_maze()
    >>> settings = dict(num_actions=m.num_actions, num_simulations=3000, max_depth=50,
    ...                 rollout_depth=50, num_rollouts=32, c=5.0, relative_c=True, discount=0.9)
    >>> out = uct(m.step, m.start_state, key, **settings)
    >>> out.action, out.visit_counts, out.q_values
    >>> path = uct_path(m.step, m.start_state, key, max_steps=30, **settings)   # 14 moves
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import register_dataclass

from forethought.errors import ForethoughtError, check_int

Step = Callable[[Any, jax.Array], tuple[Any, jax.Array, jax.Array]]
"""`step(state, action) -> (next_state, reward, done)`: the known model searched through."""

UCT_C = 1 / math.sqrt(2)
"""The default exploration constant `C` (Kocsis and Szepesvari's `C_p` for returns in [0, 1])."""


@register_dataclass
@dataclasses.dataclass(frozen=True)
class Tree:
    """A search tree as fixed-size arrays over `M = num_simulations + 1` node slots. Node 0 is
    the root; slots from `num_nodes` on are unused (`N = 0`, `parent = -1`).

    Attributes:
      N: int32 `[M]`, visit counts `N(s)`.
      Q: float `[M]`, sums of returns `Q(s)` (see the module docstring); `Q/N` is their mean.
      children: int32 `[M, A]`, the node each action leads to, -1 where not yet expanded.
      parent: int32 `[M]`, the parent node, -1 at the root.
      action: int32 `[M]`, the action that led from the parent here, -1 at the root.
      reward: float `[M]`, the reward of that move (0 at the root).
      done: bool `[M]`, whether that move ended the episode (nothing is expanded below).
      depth: int32 `[M]`, moves from the root.
      states: the node states: the pytree of `state` with a leading `[M]` axis.
      num_nodes: int32 scalar, slots in use.
    """

    N: jax.Array
    Q: jax.Array
    children: jax.Array
    parent: jax.Array
    action: jax.Array
    reward: jax.Array
    done: jax.Array
    depth: jax.Array
    states: Any
    num_nodes: jax.Array


@register_dataclass
@dataclasses.dataclass(frozen=True)
class MCTSOutput:
    """The result of one search (every field gains a leading `[B]` axis under `uct_batch`).

    Attributes:
      action: int32 scalar, the root's most visited action (ties: the higher `q_values`, then
        the lower index).
      visit_counts: int32 `[A]`, `N` of the root's children (0 where never tried).
      q_values: float `[A]`, `Q/N` of the root's children, the estimated action values (0 where
        never tried).
      value: float scalar, `Q/N` of the root, the estimated value of the root state.
      tree: the whole `Tree`.
    """

    action: jax.Array
    visit_counts: jax.Array
    q_values: jax.Array
    value: jax.Array
    tree: Tree


@register_dataclass
@dataclasses.dataclass(frozen=True)
class UCTPath:
    """What acting with UCT produced (search, take the chosen action in the model, search again
    from the new state). Entries from `length` on are padding: the final state repeated,
    action -1, reward 0.

    Attributes:
      states: the states visited: the pytree of `state` with a leading `[max_steps + 1]` axis,
        `states[0]` the start.
      actions: int32 `[max_steps]`.
      rewards: float `[max_steps]`.
      length: int32 scalar, moves made (up to and including the one that ended the episode).
      done: bool scalar, whether the episode ended within `max_steps`.
    """

    states: Any
    actions: jax.Array
    rewards: jax.Array
    length: jax.Array
    done: jax.Array


@dataclasses.dataclass(frozen=True)
class _Sizes:
    """The static settings of a search (hashable, so the compiled program is reused)."""

    num_actions: int
    num_simulations: int
    max_depth: int
    rollout_depth: int
    num_rollouts: int
    relative_c: bool


# ----- the tree policy's score ---------------------------------------------------------------

def uct_score(Q, N, N_parent, c=UCT_C) -> jax.Array:
    """The notes' `Score = Q/N + 2 C sqrt(2 ln N(parent) / N)` of each child.

    Args:
      Q: `[A]` sums of the children's returns.
      N: `[A]` the children's visit counts.
      N_parent: scalar, the parent's visit count.
      c: the exploration constant `C`, in units of the return.

    Returns:
      `[A]` scores; +inf where `N = 0` (untried actions come first).
    """
    Q = jnp.asarray(Q)
    N = jnp.asarray(N)
    dtype = jnp.result_type(Q.dtype, jnp.float32)
    n = jnp.maximum(N, 1).astype(dtype)
    log_parent = jnp.log(jnp.maximum(jnp.asarray(N_parent, dtype), 1))
    score = Q / n + 2 * c * jnp.sqrt(2 * log_parent / n)
    return jnp.where(N > 0, score, jnp.inf)


def _random_argmax(values, key) -> jax.Array:
    """The index of a maximum of `values`, uniformly among ties."""
    ties = values == values.max()
    return jnp.argmax(jnp.where(ties, jax.random.uniform(key, values.shape), -1.0))


# ----- the search ------------------------------------------------------------------------------

def uct(step: Step, root_state, key, *, num_actions: int, num_simulations: int = 1000,
        max_depth: int = 50, rollout_depth: int = 50, num_rollouts: int = 1, c: float = UCT_C,
        relative_c: bool = False, discount: float = 1.0) -> MCTSOutput:
    """UCT from one root (see the module docstring); jit-compiled whole.

    Args:
      step: the model, `step(state, action) -> (next_state, reward, done)`, pure JAX.
      root_state: the state to plan from (any pytree of arrays or numbers).
      key: PRNG key (the tree policy's tie-breaking and the rollouts).
      num_actions: A, the number of discrete actions, >= 1.
      num_simulations: simulations (tree policy, expansion, rollouts, backup), >= 1; the tree
        holds at most `num_simulations + 1` nodes.
      max_depth: the tree's depth limit, >= 1: a node this many moves below the root is never
        expanded; each time the tree policy reaches it, it is evaluated by rollouts again.
      rollout_depth: steps of each random rollout from a leaf, >= 0 (0 values every leaf at 0).
      num_rollouts: rollouts averaged into one leaf value, >= 1.
      c: the exploration constant `C` of the Score, >= 0, in units of the return (or, with
        `relative_c`, of the value of the node being left).
      relative_c: use `C * |V(node)|` in the Score at each node (see the module docstring).
      discount: gamma in (0, 1], per move, in the tree and in the rollouts.

    Returns:
      `MCTSOutput`: the most visited root action, the root children's visit counts and action
      values, the root value and the tree.
    """
    sizes = _check("uct", step, num_actions, num_simulations, max_depth, rollout_depth,
                   num_rollouts, c, relative_c, discount)
    root_state = jax.tree.map(jnp.asarray, root_state)
    _check_step("uct", step, root_state)
    return _uct(_traceable(step), root_state, key, sizes, jnp.asarray(c, jnp.float32),
                jnp.asarray(discount, jnp.float32))


def uct_batch(step: Step, root_states, keys, **kwargs) -> MCTSOutput:
    """`uct` from a batch of roots at once: `root_states` with a leading `[B]` axis on every
    leaf, `keys: [B]` PRNG keys, and `uct`'s keyword arguments. Every field of the returned
    `MCTSOutput` has a leading `[B]` axis; entry `i` equals `uct(step, root_states[i], keys[i],
    **kwargs)`."""
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None
             for leaf in jax.tree.leaves((root_states, keys))}
    if len(sizes) != 1 or None in sizes:
        raise ForethoughtError(
            "uct_batch: root_states and keys must have the same leading batch axis on every "
            f"leaf, got leading sizes {sorted(map(str, sizes))}")
    return jax.vmap(lambda s, k: uct(step, s, k, **kwargs))(root_states, keys)


def _traceable(step):
    """A bound method of a pytree (`maze.step`) as a `Partial` over that pytree, so that its
    arrays are traced: another maze of the same shape reuses the compiled search instead of
    compiling one with the first maze's tables baked in."""
    owner, function = getattr(step, "__self__", None), getattr(step, "__func__", None)
    if owner is None or function is None or not any(
            isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(owner)):
        return step
    return jax.tree_util.Partial(function, owner)


@eqx.filter_jit
def _uct(step, root_state, key, sizes: _Sizes, c, discount) -> MCTSOutput:
    return _output(_search(step, root_state, key, sizes, c, discount))


def _output(tree: Tree) -> MCTSOutput:
    children = tree.children[0]
    tried = children >= 0
    visits = jnp.where(tried, tree.N[children], 0)
    q = jnp.where(tried, tree.Q[children] / jnp.maximum(visits, 1), 0.0)
    # Most visited; among equally visited, the better estimate.
    action = jnp.argmax(jnp.where(visits == visits.max(), q, -jnp.inf)).astype(jnp.int32)
    value = tree.Q[0] / jnp.maximum(tree.N[0], 1)
    return MCTSOutput(action=action, visit_counts=visits, q_values=q, value=value, tree=tree)


def _value_dtype(step, state):
    _, reward, _ = jax.eval_shape(step, state, jnp.zeros((), jnp.int32))
    return jnp.result_type(reward.dtype, jnp.float32)


def _search(step, root_state, key, sizes: _Sizes, c, discount) -> Tree:
    """The simulations: a `fori_loop` over a fixed-size `Tree`."""
    A, D, relative_c = sizes.num_actions, sizes.max_depth, sizes.relative_c
    M = sizes.num_simulations + 1
    value_dtype = _value_dtype(step, root_state)
    c, discount = c.astype(value_dtype), discount.astype(value_dtype)

    def node_state(tree, node):
        return jax.tree.map(lambda x: x[node], tree.states)

    def node_value(tree, node):
        """`V` of the node's state: its `Q/N` less the move into it, `(Q/N - r) / discount`."""
        mean = tree.Q[node] / jnp.maximum(tree.N[node], 1)
        return jnp.where(node == 0, mean, (mean - tree.reward[node]) / discount)

    def tree_policy(tree, key):
        """Descend by Score while the node is fully expanded. Returns the node reached, the
        untried action chosen there and whether to expand it (False when the descent stopped
        at a `done` node or at the depth limit: that node is evaluated as it is)."""
        def descend(carry):
            node, _, _, i = carry
            children = tree.children[node]
            tried = children >= 0
            c_node = c * jnp.abs(node_value(tree, node)) if relative_c else c
            score = uct_score(jnp.where(tried, tree.Q[children], 0.0),
                              jnp.where(tried, tree.N[children], 0), tree.N[node], c_node)
            a = _random_argmax(score, jax.random.fold_in(key, i)).astype(jnp.int32)
            expand = children[a] < 0
            return jnp.where(expand, node, children[a]), a, expand, i + 1

        def can_descend(carry):
            node, _, expand, _ = carry
            return ~expand & ~tree.done[node] & (tree.depth[node] < D)

        zero = jnp.zeros((), jnp.int32)
        node, a, expand, _ = jax.lax.while_loop(can_descend, descend,
                                                (zero, zero, jnp.zeros((), bool), zero))
        return node, a, expand

    def expansion(tree, node, a, expand):
        """Add the child of `node` under `a` (where `expand`); return the tree and the leaf."""
        new = tree.num_nodes
        s_next, r, done = step(node_state(tree, node), a)

        def put(buffer, value):
            return buffer.at[new].set(jnp.where(expand, value, buffer[new]))

        old_child = tree.children[node, a]
        tree = dataclasses.replace(
            tree, children=tree.children.at[node, a].set(jnp.where(expand, new, old_child)),
            parent=put(tree.parent, node), action=put(tree.action, a),
            reward=put(tree.reward, jnp.asarray(r, value_dtype)),
            done=put(tree.done, jnp.asarray(done, bool)),
            depth=put(tree.depth, tree.depth[node] + 1),
            states=jax.tree.map(put, tree.states, s_next),
            num_nodes=new + expand.astype(jnp.int32))
        return tree, jnp.where(expand, new, node)

    def default_policy(state, key):
        """The discounted return of one uniformly random rollout from `state`, stopped at the
        first `done`."""
        actions = jax.random.randint(key, (sizes.rollout_depth,), 0, A, jnp.int32)

        def move(carry, a):
            s, G, weight, ended = carry
            s_next, r, done = step(s, a)
            G = G + jnp.where(ended, 0.0, weight * r)
            return (s_next, G, weight * discount, ended | done), None

        init = (state, jnp.zeros((), value_dtype), jnp.ones((), value_dtype),
                jnp.zeros((), bool))
        (_, G, _, _), _ = jax.lax.scan(move, init, actions)
        return G

    def backup(tree, leaf, G):
        """From `leaf` up to the root: `N += 1`, and `Q +=` the return from that node's state
        plus the reward of the move into it (`G` at the leaf, then `r + discount * G` per move
        up; just `G` at the root)."""
        # Collect the path, then add to N and Q with one scatter: a while_loop carrying N and
        # Q would, under vmap, copy both [M] arrays at every move up.
        def up(carry):
            node, G, k, path, returns = carry
            G_in = jnp.where(node == 0, G, tree.reward[node] + discount * G)
            return tree.parent[node], G_in, k + 1, path.at[k].set(node), returns.at[k].set(G_in)

        init = (leaf, G, jnp.zeros((), jnp.int32), jnp.full(D + 1, M, jnp.int32),
                jnp.zeros(D + 1, value_dtype))
        _, _, _, path, returns = jax.lax.while_loop(lambda carry: carry[0] >= 0, up, init)
        return dataclasses.replace(tree, N=tree.N.at[path].add(1, mode="drop"),
                                   Q=tree.Q.at[path].add(returns, mode="drop"))

    def simulate(i, tree):
        select_key, rollout_key = jax.random.split(jax.random.fold_in(key, i))
        node, a, expand = tree_policy(tree, select_key)
        tree, leaf = expansion(tree, node, a, expand)
        rollout_keys = jax.random.split(rollout_key, sizes.num_rollouts)
        G = jax.vmap(default_policy, (None, 0))(node_state(tree, leaf), rollout_keys).mean()
        return backup(tree, leaf, jnp.where(tree.done[leaf], 0.0, G).astype(value_dtype))

    states = jax.tree.map(lambda x: jnp.zeros((M,) + x.shape, x.dtype).at[0].set(x), root_state)
    tree = Tree(N=jnp.zeros(M, jnp.int32), Q=jnp.zeros(M, value_dtype),
                children=jnp.full((M, A), -1, jnp.int32), parent=jnp.full(M, -1, jnp.int32),
                action=jnp.full(M, -1, jnp.int32), reward=jnp.zeros(M, value_dtype),
                done=jnp.zeros(M, bool), depth=jnp.zeros(M, jnp.int32), states=states,
                num_nodes=jnp.ones((), jnp.int32))
    return jax.lax.fori_loop(0, sizes.num_simulations, simulate, tree)


# ----- acting: search, step, search again ------------------------------------------------------

def uct_path(step: Step, state, key, *, max_steps: int, num_actions: int,
             num_simulations: int = 1000, max_depth: int = 50, rollout_depth: int = 50,
             num_rollouts: int = 1, c: float = UCT_C, relative_c: bool = False,
             discount: float = 1.0) -> UCTPath:
    """Act with UCT in the model from `state`: search, take the most visited action with `step`,
    search again from the new state with a fresh tree, until `done` or `max_steps` moves.
    One compiled `lax.while_loop`, so it also `vmap`s over start states.

    Args:
      step, state, key: the model, the start state and a PRNG key (search `t` uses
        `fold_in(key, t)`).
      max_steps: the most moves to make, >= 1.
      num_actions, num_simulations, max_depth, rollout_depth, num_rollouts, c, relative_c,
        discount: each search's settings, as in `uct`.

    Returns:
      `UCTPath` with the states, actions and rewards, `length` and `done`.
    """
    check_int(max_steps, "max_steps", where="uct_path", minimum=1)
    sizes = _check("uct_path", step, num_actions, num_simulations, max_depth, rollout_depth,
                   num_rollouts, c, relative_c, discount)
    state = jax.tree.map(jnp.asarray, state)
    _check_step("uct_path", step, state)
    return _uct_path(_traceable(step), state, key, max_steps, sizes, jnp.asarray(c, jnp.float32),
                     jnp.asarray(discount, jnp.float32))


@eqx.filter_jit
def _uct_path(step, state, key, max_steps, sizes: _Sizes, c, discount) -> UCTPath:
    value_dtype = _value_dtype(step, state)
    steps = jnp.arange(max_steps + 1)

    def act(carry):
        t, s, states, actions, rewards, _ = carry
        a = _output(_search(step, s, jax.random.fold_in(key, t), sizes, c, discount)).action
        s_next, r, done = step(s, a)
        # Write s_next from t + 1 on, so that the tail is already padded when the loop stops.
        states = jax.tree.map(
            lambda buffer, x: jnp.where((steps > t).reshape((-1,) + (1,) * x.ndim), x, buffer),
            states, s_next)
        return (t + 1, s_next, states, actions.at[t].set(a),
                rewards.at[t].set(jnp.asarray(r, value_dtype)), jnp.asarray(done, bool))

    def going(carry):
        t, *_, done = carry
        return (t < max_steps) & ~done

    init = (jnp.zeros((), jnp.int32), state,
            jax.tree.map(lambda x: jnp.broadcast_to(x, (max_steps + 1,) + x.shape), state),
            jnp.full(max_steps, -1, jnp.int32), jnp.zeros(max_steps, value_dtype),
            jnp.zeros((), bool))
    length, _, states, actions, rewards, done = jax.lax.while_loop(going, act, init)
    return UCTPath(states=states, actions=actions, rewards=rewards, length=length, done=done)


# ----- argument checks (at the boundary, before tracing) ---------------------------------------



def _check(where, step, num_actions, num_simulations, max_depth, rollout_depth, num_rollouts,
           c, relative_c, discount) -> _Sizes:
    if not callable(step):
        raise ForethoughtError(f"{where}: step must be a function step(state, action) -> "
                               f"(next_state, reward, done), got {type(step).__name__}")
    check_int(num_actions, "num_actions", where=where, minimum=1)
    check_int(num_simulations, "num_simulations", where=where, minimum=1)
    check_int(max_depth, "max_depth", where=where, minimum=1)
    check_int(rollout_depth, "rollout_depth", where=where, minimum=0)
    check_int(num_rollouts, "num_rollouts", where=where, minimum=1)
    # JAX clamps an out-of-range index instead of failing, so a num_actions larger than the
    # model's would silently search a different problem; a world that knows its count (a
    # Maze, whose bound `step` this is) lets us catch that.
    known = getattr(getattr(step, "__self__", None), "num_actions", None)
    if isinstance(known, (int, np.integer)) and known != num_actions:
        raise ForethoughtError(
            f"{where}: num_actions must be {known}, the number of actions of the "
            f"{type(step.__self__).__name__} whose step is searched, got {num_actions}")
    for name, value in (("c", c), ("discount", discount)):
        if np.ndim(value) != 0:
            raise ForethoughtError(f"{where}: {name} must be a scalar, got shape "
                                   f"{np.shape(value)}")
    if not isinstance(c, jax.core.Tracer) and not float(c) >= 0:
        raise ForethoughtError(f"{where}: c must be >= 0, got {c!r}")
    if not isinstance(discount, jax.core.Tracer) and not 0 < float(discount) <= 1:
        raise ForethoughtError(f"{where}: discount must be in (0, 1], got {discount!r}")
    if not isinstance(relative_c, (bool, np.bool_)):
        raise ForethoughtError(f"{where}: relative_c must be True or False, got {relative_c!r}")
    return _Sizes(int(num_actions), int(num_simulations), int(max_depth), int(rollout_depth),
                  int(num_rollouts), bool(relative_c))


def _check_step(where, step, state):
    """`step(state, action)` must return `(next_state, reward, done)`: `next_state` with the
    structure, shapes and dtypes of `state`, `reward` a float scalar, `done` a scalar (checked
    abstractly with `eval_shape`, without running it)."""
    try:
        out = jax.eval_shape(step, state, jnp.zeros((), jnp.int32))
    except Exception as error:
        raise ForethoughtError(
            f"{where}: step(state, action) failed on the given state and an int32 action: "
            f"{type(error).__name__}: {error}") from error
    if not (isinstance(out, tuple) and len(out) == 3):
        raise ForethoughtError(
            f"{where}: step must return a tuple (next_state, reward, done), got {out!r}")
    s_next, reward, done = out

    def spec(tree):
        return jax.tree.structure(tree), [(x.shape, jnp.dtype(x.dtype))
                                          for x in jax.tree.leaves(tree)]

    if spec(state) != spec(s_next):
        raise ForethoughtError(
            f"{where}: step's next_state must have the structure, shapes and dtypes of the "
            f"state, {spec(state)}, got {spec(s_next)}")
    if reward.shape != () or not jnp.issubdtype(reward.dtype, jnp.floating):
        raise ForethoughtError(f"{where}: step's reward must be a float scalar, got shape "
                               f"{reward.shape}, dtype {reward.dtype}")
    if done.shape != ():
        raise ForethoughtError(f"{where}: step's done must be a scalar, got shape {done.shape}")
