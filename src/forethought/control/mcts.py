"""Monte Carlo tree search with UCT, for discrete actions over a known model.

Seed 000, "Monte Carlo Tree Search (MCTS)". One simulation is the notes' three steps:

1. choose a leaf `s_l` with TreePolicy(`s_1`): from the root, while the node is fully
   expanded, go to the child with the best

       Score(s_t) = Q(s_t) / N(s_t) + 2 C sqrt(2 ln N(s_{t-1}) / N(s_t)),

   and at the first node that is not fully expanded, choose an untried action and add its
   child (expansion); an untried child scores +inf, so "unvisited children first" and the
   Score are one argmax (ties broken at random);
2. evaluate the leaf with DefaultPolicy(`s_l`): a uniformly random rollout of `rollout_depth`
   steps, discounted by `discount`, stopped at `done`;
3. update all values between `s_1` and `s_l` (backup): every node on the path gets `N += 1`
   and `Q +=` the return of this simulation.

Symbols as in the notes: `N(s)` is a node's visit count and `Q(s)` the *sum* of the returns of
the simulations through it, so `Q/N` is their mean. The reward of the move into a node is part
of that node's return (`Q(s_t)` sums `r(s_{t-1}, a) + discount * G(s_t)`), so among siblings
`Q/N` is the action value `Q(s_{t-1}, a)`; at the root, `Q/N` is the value `V(s_1)`.
`C = 1/sqrt(2)` is the constant Kocsis and Szepesvari prove sufficient for returns in [0, 1]
(Browne et al. 2012, "A Survey of MCTS Methods", eq. 2, the form the notes write); rescale it
with the range of your returns.

The model is any pure function `step(state, action) -> (next_state, reward, done)` over JAX
arrays: `state` any pytree (an int32 scalar for `forethought.systems.mazes`), `action` an int32
scalar in `[0, num_actions)`, `reward` a float scalar, `done` a bool scalar. The tree is a set
of fixed-size arrays over `max_nodes = num_simulations + 1` nodes (each simulation adds at most
one), the simulations are a `lax.fori_loop`, and the whole search is one jit-compiled program,
so `jax.vmap` batches it over roots (`uct_batch`, in the style of mctx) and `uct_path` runs
plan-act-replan as one compiled loop.

    >>> m = dyna_maze()
    >>> out = uct(m.step, m.start_state, key, num_actions=m.num_actions, num_simulations=2000,
    ...           max_depth=30, rollout_depth=30, discount=0.95)
    >>> out.action, out.visit_counts, out.q_values
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

from forethought.errors import ForethoughtError

Step = Callable[[Any, jax.Array], tuple[Any, jax.Array, jax.Array]]
"""`step(state, action) -> (next_state, reward, done)`: the known model searched through."""

UCT_C = 1 / math.sqrt(2)
import os
SCALE = bool(int(os.environ.get("SCALE", "1")))
"""The default exploration constant `C` (Kocsis and Szepesvari's `C_p` for returns in [0, 1])."""


@register_dataclass
@dataclasses.dataclass(frozen=True)
class Tree:
    """A search tree as fixed-size arrays over `M = num_simulations + 1` node slots; node 0 is
    the root, slots at and after `num_nodes` are unused (zeros, `parent = -1`).

    Attributes:
      N: int32 `[M]`, visit counts `N(s)`.
      Q: float `[M]`, sums of returns `Q(s)` (see the module docstring); `Q/N` is the mean.
      children: int32 `[M, A]`, the child reached by each action, -1 where not yet expanded.
      parent: int32 `[M]`, the parent node, -1 at the root.
      action: int32 `[M]`, the action that led from the parent here, -1 at the root.
      reward: float `[M]`, the reward of that move (0 at the root).
      done: bool `[M]`, whether the move ended the episode (no child is expanded below).
      depth: int32 `[M]`, moves from the root.
      states: the node states, the pytree of `state` with a leading `[M]` axis.
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
    q_min: jax.Array
    q_max: jax.Array


@register_dataclass
@dataclasses.dataclass(frozen=True)
class MCTSOutput:
    """The result of one search (every field gains a leading batch axis under `uct_batch`).

    Attributes:
      action: int32 scalar, the root's most visited action (ties: the higher `q_values`, then
        the lower index).
      visit_counts: int32 `[A]`, `N` of the root's children (0 where never tried).
      q_values: float `[A]`, `Q/N` of the root's children, the estimated action values (0 where
        never tried).
      value: float scalar, `Q/N` of the root, the estimated value of `root_state`.
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
    """What acting with UCT (plan, take the chosen action in the model, replan) produced.

    Entries after the episode ended (`t >= length`) are padding: the last state repeated,
    action -1, reward 0.

    Attributes:
      states: the visited states, pytree of `state` with a leading `[max_steps + 1]` axis.
      actions: int32 `[max_steps]`.
      rewards: float `[max_steps]`.
      length: int32 scalar, steps taken (the first `t` with `done`, plus one; `max_steps` if it
        never ended).
      done: bool scalar, whether the episode ended within `max_steps`.
    """

    states: Any
    actions: jax.Array
    rewards: jax.Array
    length: jax.Array
    done: jax.Array


# ----- the tree policy's score ---------------------------------------------------------------

def uct_score(Q, N, N_parent, c=UCT_C) -> jax.Array:
    """The notes' `Score = Q/N + 2 C sqrt(2 ln N(parent) / N)` of each child.

    Args:
      Q: `[A]` sums of the children's returns.
      N: `[A]` the children's visit counts.
      N_parent: scalar, the parent's visit count.
      c: the exploration constant `C`.

    Returns:
      `[A]` scores; +inf where `N = 0` (untried actions come first).
    """
    N = jnp.asarray(N)
    Q = jnp.asarray(Q)
    n = jnp.maximum(N, 1).astype(Q.dtype)
    log_parent = jnp.log(jnp.maximum(jnp.asarray(N_parent, Q.dtype), 1))
    score = Q / n + 2 * c * jnp.sqrt(2 * log_parent / n)
    return jnp.where(N > 0, score, jnp.inf)


def _random_argmax(values, key) -> jax.Array:
    """The index of a maximum of `values`, chosen uniformly among ties."""
    ties = values == values.max()
    return jnp.argmax(jnp.where(ties, jax.random.uniform(key, values.shape), -1.0))


# ----- the search ------------------------------------------------------------------------------

def uct(step: Step, root_state, key, *, num_actions: int, num_simulations: int = 1000,
        max_depth: int = 50, rollout_depth: int = 50, c: float = UCT_C,
        discount: float = 1.0) -> MCTSOutput:
    """UCT from one root (see the module docstring); jit-compiled whole.

    Args:
      step: the model, `step(state, action) -> (next_state, reward, done)`, pure JAX.
      root_state: the state to plan from (any pytree of arrays or numbers).
      key: PRNG key (tie-breaking in the tree policy, the random rollouts).
      num_actions: A, the number of discrete actions.
      num_simulations: simulations (tree policy, expansion, rollout, backup), >= 1; the tree
        holds at most `num_simulations + 1` nodes.
      max_depth: the tree's depth limit, >= 1: a node this many moves below the root is not
        expanded, it is evaluated by a rollout each time it is reached.
      rollout_depth: steps of the random default policy from a new leaf, >= 0 (0 values every
        leaf at 0).
      c: the exploration constant `C` of the Score, >= 0.
      discount: gamma in (0, 1], applied per step in the tree and in the rollouts. With a reward
        only at a goal, gamma < 1 is what makes a shorter way to it worth more.

    Returns:
      `MCTSOutput` with the most visited root action, the root children's visit counts and
      action values, the root value and the tree.
    """
    where = "uct"
    _check_int(where, "num_actions", num_actions, minimum=1)
    _check_int(where, "num_simulations", num_simulations, minimum=1)
    _check_int(where, "max_depth", max_depth, minimum=1)
    _check_int(where, "rollout_depth", rollout_depth, minimum=0)
    _check_scalars(where, c, discount)
    _check_num_actions_of_model(where, step, num_actions)
    root_state = jax.tree.map(jnp.asarray, root_state)
    _check_step(where, step, root_state)
    return _uct(step, root_state, key, num_actions, num_simulations, max_depth, rollout_depth,
                jnp.asarray(c, jnp.float32), jnp.asarray(discount, jnp.float32))


def uct_batch(step: Step, root_states, keys, **kwargs) -> MCTSOutput:
    """`uct` over a batch of roots at once: `root_states` with a leading `[B]` axis on every
    leaf, `keys: [B]` PRNG keys; the keyword arguments are `uct`'s. Every field of the
    returned `MCTSOutput` has a leading `[B]` axis. Equal to `B` separate calls."""
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None
             for leaf in jax.tree.leaves((root_states, keys))}
    if len(sizes) != 1 or None in sizes:
        raise ForethoughtError(
            "uct_batch: root_states and keys must all have the same leading batch axis, got "
            f"leading sizes {sorted(map(str, sizes))}")
    return jax.vmap(lambda s, k: uct(step, s, k, **kwargs))(root_states, keys)


@eqx.filter_jit
def _uct(step, root_state, key, num_actions, num_simulations, max_depth, rollout_depth, c,
         discount) -> MCTSOutput:
    tree = _search(step, root_state, key, num_actions, num_simulations, max_depth,
                   rollout_depth, c, discount)
    return _output(tree)


def _output(tree: Tree) -> MCTSOutput:
    children = tree.children[0]
    tried = children >= 0
    visits = jnp.where(tried, tree.N[children], 0)
    q = jnp.where(tried, tree.Q[children] / jnp.maximum(visits, 1), 0.0)
    # Most visited; among equally visited, the better estimate.
    action = jnp.argmax(jnp.where(visits == visits.max(), q, -jnp.inf)).astype(jnp.int32)
    value = tree.Q[0] / jnp.maximum(tree.N[0], 1)
    return MCTSOutput(action=action, visit_counts=visits, q_values=q, value=value, tree=tree)


def _init_tree(root_state, M, A, value_dtype) -> Tree:
    states = jax.tree.map(lambda x: jnp.zeros((M,) + x.shape, x.dtype).at[0].set(x), root_state)
    return Tree(N=jnp.zeros(M, jnp.int32), Q=jnp.zeros(M, value_dtype),
                children=jnp.full((M, A), -1, jnp.int32),
                parent=jnp.full(M, -1, jnp.int32), action=jnp.full(M, -1, jnp.int32),
                reward=jnp.zeros(M, value_dtype), done=jnp.zeros(M, bool),
                depth=jnp.zeros(M, jnp.int32), states=states,
                num_nodes=jnp.ones((), jnp.int32), q_min=jnp.full((), jnp.inf, value_dtype),
                q_max=jnp.full((), -jnp.inf, value_dtype))


def _search(step, root_state, key, A, num_simulations, max_depth, rollout_depth, c,
            discount) -> Tree:
    """The simulations, as a `fori_loop` over a fixed-size `Tree`."""
    _, reward0, _ = jax.eval_shape(step, root_state, jnp.zeros((), jnp.int32))
    value_dtype = jnp.result_type(reward0.dtype, jnp.float32)
    discount = discount.astype(value_dtype)
    c = c.astype(value_dtype)
    tree = _init_tree(root_state, num_simulations + 1, A, value_dtype)

    def node_state(tree, node):
        return jax.tree.map(lambda x: x[node], tree.states)

    def tree_policy(tree, key):
        """Descend by Score while the node is fully expanded; return the node to stop at, the
        action to expand from it and whether to expand (False at a `done` node or at the depth
        limit, which are evaluated as they are)."""
        def descend(carry):
            node, _, _, i = carry
            children = tree.children[node]
            N_children = jnp.where(children >= 0, tree.N[children], 0)
            Q_children = jnp.where(children >= 0, tree.Q[children], 0.0)
            spread = jnp.where(tree.q_max > tree.q_min, tree.q_max - tree.q_min, 0.0)
            cc = c * spread if SCALE else c
            score = uct_score(Q_children, N_children, tree.N[node], cc)
            a = _random_argmax(score, jax.random.fold_in(key, i)).astype(jnp.int32)
            child = children[a]
            expand = child < 0
            return jnp.where(expand, node, child), a, expand, i + 1

        def can_descend(carry):
            node, _, expand, _ = carry
            return ~expand & ~tree.done[node] & (tree.depth[node] < max_depth)

        node, a, expand, _ = jax.lax.while_loop(
            can_descend, descend, (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                                   jnp.zeros((), bool), jnp.zeros((), jnp.int32)))
        return node, a, expand

    def expand_node(tree, node, a, expand):
        """Add the child of `node` under `a` where `expand`; return the tree and the leaf."""
        new = tree.num_nodes
        s_next, r, done = step(node_state(tree, node), a)

        def put(buffer, value):
            return buffer.at[new].set(jnp.where(expand, value, buffer[new]))

        tree = dataclasses.replace(
            tree,
            children=tree.children.at[node, a].set(jnp.where(expand, new, tree.children[node, a])),
            parent=put(tree.parent, node), action=put(tree.action, a),
            reward=put(tree.reward, jnp.asarray(r, value_dtype)),
            done=put(tree.done, jnp.asarray(done, bool)),
            depth=put(tree.depth, tree.depth[node] + 1),
            states=jax.tree.map(put, tree.states, s_next),
            num_nodes=new + expand.astype(jnp.int32))
        return tree, jnp.where(expand, new, node)

    def default_policy(state, key):
        """The discounted return of a uniformly random rollout from `state`, stopped at done."""
        actions = jax.random.randint(key, (rollout_depth,), 0, A, jnp.int32)

        def move(carry, a):
            s, G, weight, ended = carry
            s_next, r, done = step(s, a)
            G = G + jnp.where(ended, 0.0, weight * r)
            return (s_next, G, weight * discount, ended | done), None

        zero = jnp.zeros((), value_dtype)
        (_, G, _, _), _ = jax.lax.scan(move, (state, zero, jnp.ones((), value_dtype),
                                              jnp.zeros((), bool)), actions)
        return G

    def backup(tree, leaf, G):
        """From `leaf` up to the root: `N += 1`, `Q +=` the return counted from the move into
        the node (`G` itself at the leaf's state, then `r + discount * G` per move up)."""
        def update(carry):
            N, Q, node, G, lo, hi = carry
            # G is the return from `node`'s state; the node's Q counts the move into it too.
            G_in = jnp.where(node == 0, G, tree.reward[node] + discount * G)
            N, Q = N.at[node].add(1), Q.at[node].add(G_in)
            mean = Q[node] / N[node]
            return N, Q, tree.parent[node], G_in, jnp.minimum(lo, mean), jnp.maximum(hi, mean)

        N, Q, _, _, lo, hi = jax.lax.while_loop(lambda carry: carry[2] >= 0, update,
                                        (tree.N, tree.Q, leaf, G, tree.q_min, tree.q_max))
        return dataclasses.replace(tree, N=N, Q=Q, q_min=lo, q_max=hi)

    def simulate(i, tree):
        select_key, rollout_key = jax.random.split(jax.random.fold_in(key, i))
        node, a, expand = tree_policy(tree, select_key)
        tree, leaf = expand_node(tree, node, a, expand)
        G = default_policy(node_state(tree, leaf), rollout_key)
        G = jnp.where(tree.done[leaf], 0.0, G).astype(value_dtype)
        return backup(tree, leaf, G)

    return jax.lax.fori_loop(0, num_simulations, simulate, tree)


# ----- acting: plan, step, replan --------------------------------------------------------------

def uct_path(step: Step, state, key, *, max_steps: int, num_actions: int, **kwargs) -> UCTPath:
    """Act with UCT in the model from `state`: search, take the most visited action with
    `step`, search again from the new state (a fresh tree each time), until `done` or
    `max_steps` moves. One compiled `lax.while_loop`; the keyword arguments are `uct`'s.

    Returns:
      `UCTPath` with the states, actions, rewards, `length` and `done`.
    """
    where = "uct_path"
    _check_int(where, "max_steps", max_steps, minimum=1)
    _check_int(where, "num_actions", num_actions, minimum=1)
    settings = dict(num_simulations=1000, max_depth=50, rollout_depth=50, c=UCT_C, discount=1.0)
    unknown = set(kwargs) - set(settings)
    if unknown:
        raise ForethoughtError(f"{where}: unknown keyword arguments {sorted(unknown)}; expected "
                               f"some of {sorted(settings)}")
    settings.update(kwargs)
    for name in ("num_simulations", "max_depth"):
        _check_int(where, name, settings[name], minimum=1)
    _check_int(where, "rollout_depth", settings["rollout_depth"], minimum=0)
    _check_scalars(where, settings["c"], settings["discount"])
    _check_num_actions_of_model(where, step, num_actions)
    state = jax.tree.map(jnp.asarray, state)
    _check_step(where, step, state)
    return _uct_path(step, state, key, max_steps, num_actions, settings["num_simulations"],
                     settings["max_depth"], settings["rollout_depth"],
                     jnp.asarray(settings["c"], jnp.float32),
                     jnp.asarray(settings["discount"], jnp.float32))


@eqx.filter_jit
def _uct_path(step, state, key, max_steps, A, num_simulations, max_depth, rollout_depth, c,
              discount) -> UCTPath:
    _, reward0, _ = jax.eval_shape(step, state, jnp.zeros((), jnp.int32))
    value_dtype = jnp.result_type(reward0.dtype, jnp.float32)
    states = jax.tree.map(lambda x: jnp.broadcast_to(x, (max_steps + 1,) + x.shape), state)

    def act(carry):
        t, s, states, actions, rewards, _ = carry
        tree = _search(step, s, jax.random.fold_in(key, t), A, num_simulations, max_depth,
                       rollout_depth, c, discount)
        a = _output(tree).action
        s_next, r, done = step(s, a)
        # Pad after the end with the final state.
        after = jnp.arange(max_steps + 1) > t
        states = jax.tree.map(
            lambda buf, x: jnp.where(after.reshape((-1,) + (1,) * x.ndim), x, buf),
            states, s_next)
        return (t + 1, s_next, states, actions.at[t].set(a),
                rewards.at[t].set(jnp.asarray(r, value_dtype)), jnp.asarray(done, bool))

    def going(carry):
        t, *_, done = carry
        return (t < max_steps) & ~done

    t, _, states, actions, rewards, done = jax.lax.while_loop(
        going, act, (jnp.zeros((), jnp.int32), state, states,
                     jnp.full(max_steps, -1, jnp.int32), jnp.zeros(max_steps, value_dtype),
                     jnp.zeros((), bool)))
    return UCTPath(states=states, actions=actions, rewards=rewards, length=t, done=done)


# ----- argument checks (at the boundary, before tracing) ---------------------------------------

def _check_int(where, name, value, *, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ForethoughtError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")


def _check_scalars(where, c, discount):
    for name, value in (("c", c), ("discount", discount)):
        if np.ndim(value) != 0:
            raise ForethoughtError(f"{where}: {name} must be a scalar, got shape "
                                   f"{np.shape(value)}")
    if not isinstance(c, jax.core.Tracer) and not float(c) >= 0:
        raise ForethoughtError(f"{where}: c must be >= 0, got {c!r}")
    if not isinstance(discount, jax.core.Tracer) and not 0 < float(discount) <= 1:
        raise ForethoughtError(f"{where}: discount must be in (0, 1], got {discount!r}")


def _check_num_actions_of_model(where, step, num_actions):
    """Where `step` is a bound method of a world that says how many actions it has (a `Maze`),
    `num_actions` must agree: JAX clamps an out-of-range index instead of failing, so a wrong
    count would silently search a different problem."""
    known = getattr(getattr(step, "__self__", None), "num_actions", None)
    if isinstance(known, (int, np.integer)) and known != num_actions:
        raise ForethoughtError(
            f"{where}: num_actions must be {known}, the number of actions of "
            f"{type(step.__self__).__name__}, got {num_actions}")


def _check_step(where, step, state):
    """`step(state, 0)` must return `(next_state, reward, done)`, `next_state` with the
    structure, shapes and dtypes of `state`, `reward` and `done` scalars (checked abstractly,
    without running it)."""
    try:
        out = jax.eval_shape(step, state, jnp.zeros((), jnp.int32))
    except ForethoughtError:
        raise
    except Exception as error:
        raise ForethoughtError(
            f"{where}: step(state, action) failed on root_state {state!r} and an int32 "
            f"action: {type(error).__name__}: {error}") from error
    if not (isinstance(out, tuple) and len(out) == 3):
        raise ForethoughtError(
            f"{where}: step must return a tuple (next_state, reward, done), got {out!r}")
    s_next, reward, done = out
    spec = jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), state)
    spec_next = jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), s_next)
    if jax.tree.structure(state) != jax.tree.structure(s_next) or jax.tree.leaves(
            spec, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2) != jax.tree.leaves(
            spec_next, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2):
        raise ForethoughtError(
            f"{where}: step's next_state must have the structure, shapes and dtypes of "
            f"root_state {spec}, got {spec_next}")
    if reward.shape != () or not jnp.issubdtype(reward.dtype, jnp.floating):
        raise ForethoughtError(f"{where}: step's reward must be a float scalar, got shape "
                               f"{reward.shape} dtype {reward.dtype}")
    if done.shape != ():
        raise ForethoughtError(f"{where}: step's done must be a scalar, got shape {done.shape}")
