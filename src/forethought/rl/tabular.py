"""Tabular Dyna-Q and Dyna-Q+ in pure JAX: Q-learning, a deterministic table model, planning.

The tabular Dyna-Q box of note 001 ("Dyna Architecture: Dyna-Q", also note 003), which is
Sutton & Barto, *Reinforcement Learning: An Introduction* (2nd ed.), section 8.2::

    S <- current (nonterminal) state
    A <- epsilon-greedy(S, Q)
    take A; observe R, S'
    Q(S, A) <- Q(S, A) + alpha [R + gamma max_a Q(S', a) - Q(S, A)]       (direct RL)
    Model(S, A) <- R, S'                        (deterministic environment)
    repeat n times:                                                          (planning)
        S <- random previously observed state
        A <- random action previously taken in S
        R, S' <- Model(S, A)
        Q(S, A) <- Q(S, A) + alpha [R + gamma max_a Q(S', a) - Q(S, A)]

Dyna-Q+ (section 8.3) plans with the reward `R + kappa sqrt(tau)`, `tau` the number of real
steps since `(S, A)` was last tried, and (the book's footnote to Figure 8.5) may plan with actions
never tried from a visited state, whose model says "reward 0, back to the same state". The bonus
is used in planning only; acting and the direct update see the real reward.

Everything the agent knows is one `Table` pytree of arrays (`Q`, the model, the visit record), so
a step is one jitted function and many independent runs are one `vmap`. Planning reads only the
`Table`: the true world appears in `run_episode` and `run_steps`, which play the agent against a
`Maze` or `ChangingMaze` entirely in JAX (whole episodes in one `lax.while_loop`), for the
benchmarks and tests; `forethought.agents.dyna_q` plays the same functions against any Gymnasium
env with discrete spaces.

Randomness: step `t` of an episode whose key is `key` uses `fold_in(key, t)`, split into one key
for the action and one for planning, so the agent against a `MazeEnv` and `run_episode` against
the same maze take identical steps, and while `Q` is still all zero the actions do not depend on
`n` (the first episode of Figure 8.2 is the same for every `n`, as in the book).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from forethought.errors import ForethoughtError
from forethought.systems.mazes import ChangingMaze, Maze

NEVER_ENDS = 2**31 - 1
"""`max_steps` meaning "no limit"."""


class Hyper(NamedTuple):
    """The numeric settings (traced, so changing them does not recompile)."""

    alpha: float | jax.Array = 0.1
    """Step size of every Q update, real and planned."""
    epsilon: float | jax.Array = 0.1
    """Probability of a uniformly random action."""
    gamma: float | jax.Array = 0.95
    """Discount."""
    kappa: float | jax.Array = 0.0
    """Dyna-Q+ exploration bonus weight (`kappa sqrt(tau)` added in planning); 0 is Dyna-Q."""


class Table(NamedTuple):
    """Q and the deterministic model learned from real steps, over `S` states and `A` actions.

    Initially `Q = 0` and every model entry says "reward 0, back to the same state, not done"
    (what Dyna-Q+ assumes of untried actions); only `tried` entries are real observations.
    """

    q: jax.Array
    """float32 [S, A]: action values."""
    next_state: jax.Array
    """int32 [S, A]: the model's next state, the last one seen after `(s, a)`."""
    reward: jax.Array
    """float32 [S, A]: the model's reward, the last one seen after `(s, a)`."""
    done: jax.Array
    """bool [S, A]: the model says `(s, a)` ends the episode (no bootstrap)."""
    tried: jax.Array
    """bool [S, A]: `(s, a)` has been taken in the real world."""
    last_tried: jax.Array
    """int32 [S, A]: the value of `steps` just after `(s, a)` was last taken (0: never)."""
    visited: jax.Array
    """int32 [S]: the states acted from, in the order first seen (the first `num_visited`)."""
    num_visited: jax.Array
    """int32 []: how many states have been acted from."""
    steps: jax.Array
    """int32 []: real steps taken (the clock of Dyna-Q+'s `tau`)."""


def init_table(num_states: int, num_actions: int) -> Table:
    """The table of an agent that has seen nothing."""
    if num_states < 1 or num_actions < 1:
        raise ForethoughtError(
            f"init_table: num_states and num_actions must be >= 1, got {num_states}, {num_actions}")
    S, A = int(num_states), int(num_actions)
    return Table(
        q=jnp.zeros((S, A), jnp.float32),
        next_state=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[:, None], (S, A)),
        reward=jnp.zeros((S, A), jnp.float32),
        done=jnp.zeros((S, A), bool),
        tried=jnp.zeros((S, A), bool),
        last_tried=jnp.zeros((S, A), jnp.int32),
        visited=jnp.zeros((S,), jnp.int32),
        num_visited=jnp.zeros((), jnp.int32),
        steps=jnp.zeros((), jnp.int32),
    )


# ----- the pieces ----------------------------------------------------------------------------

def q_update(q: jax.Array, s, a, r, s_next, done, alpha, gamma) -> jax.Array:
    """One Q-learning update `Q(s,a) += alpha [r + gamma (1 - done) max_a' Q(s',a') - Q(s,a)]`."""
    target = r + gamma * jnp.where(done, 0.0, jnp.max(q[s_next]))
    return q.at[s, a].add(alpha * (target - q[s, a]))


def pick(mask: jax.Array, u) -> jax.Array:
    """The index of the `floor(u * count)`-th True entry of the 1-D `mask` (`u` uniform in [0, 1)):
    a uniform choice among the True entries, from one uniform number (index 0 if none is True)."""
    count = jnp.sum(mask)
    k = jnp.minimum(jnp.floor(u * count).astype(jnp.int32), jnp.maximum(count - 1, 0))
    return jnp.argmax(jnp.cumsum(mask) > k).astype(jnp.int32)


def greedy(q_row: jax.Array, u) -> jax.Array:
    """An action of largest value, ties broken uniformly at random by the uniform number `u` (with
    all of `Q` equal at the start, a fixed tie-break would walk into a wall forever)."""
    return pick(q_row == jnp.max(q_row), u)


def epsilon_greedy(q_row: jax.Array, epsilon, key: jax.Array) -> jax.Array:
    """With probability `epsilon` a uniformly random action, else `greedy`."""
    coin, u_random, u_greedy = jax.random.uniform(key, (3,))
    num_actions = q_row.shape[-1]
    random_action = jnp.minimum(jnp.floor(u_random * num_actions).astype(jnp.int32), num_actions - 1)
    return jnp.where(coin < epsilon, random_action, greedy(q_row, u_greedy))


def model_update(table: Table, s, a, r, s_next, done) -> Table:
    """`Model(s, a) <- r, s'` and the visit record; advances the step clock."""
    steps = table.steps + 1
    new_state = ~jnp.any(table.tried[s])
    visited = jnp.where(new_state, table.visited.at[table.num_visited].set(s), table.visited)
    return table._replace(
        next_state=table.next_state.at[s, a].set(s_next),
        reward=table.reward.at[s, a].set(r),
        done=table.done.at[s, a].set(done),
        tried=table.tried.at[s, a].set(True),
        last_tried=table.last_tried.at[s, a].set(steps),
        visited=visited,
        num_visited=table.num_visited + new_state.astype(jnp.int32),
        steps=steps)


def sample_pair(table: Table, u_state, u_action, untried: bool) -> tuple[jax.Array, jax.Array]:
    """A previously visited state uniformly, then an action uniformly among those taken from it
    (among all actions when `untried`, Dyna-Q+'s footnote); `u_*` are uniform numbers in [0, 1)."""
    s = table.visited[pick(jnp.arange(table.visited.shape[0]) < table.num_visited, u_state)]
    mask = jnp.ones_like(table.tried[s]) if untried else table.tried[s]
    return s, pick(mask, u_action)


def plan(table: Table, key: jax.Array, hyper: Hyper, planning_steps: int, untried: bool) -> Table:
    """`planning_steps` Q-learning updates on transitions drawn from the model alone.

    Dyna-Q+ (`kappa > 0`) adds `kappa sqrt(tau)` to the modelled reward. Before any real step
    there is nothing to sample and `Q` is returned unchanged. The random numbers are drawn in one
    go before the (sequential) updates."""
    if planning_steps == 0:
        return table
    u = jax.random.uniform(key, (2 * planning_steps,)).reshape(planning_steps, 2)

    def body(i, q):
        s, a = sample_pair(table, u[i, 0], u[i, 1], untried)
        tau = (table.steps - table.last_tried[s, a]).astype(jnp.float32)
        r = table.reward[s, a] + hyper.kappa * jnp.sqrt(tau)
        updated = q_update(q, s, a, r, table.next_state[s, a], table.done[s, a],
                           hyper.alpha, hyper.gamma)
        return jnp.where(table.num_visited > 0, updated, q)

    return table._replace(q=jax.lax.fori_loop(0, planning_steps, body, table.q))


def learn(table: Table, s, a, r, s_next, done, key: jax.Array, hyper: Hyper, planning_steps: int,
          untried: bool) -> Table:
    """After one real step: the direct Q update, the model update, then the planning updates."""
    table = table._replace(q=q_update(table.q, s, a, r, s_next, done, hyper.alpha, hyper.gamma))
    table = model_update(table, s, a, r, s_next, done)
    return plan(table, key, hyper, planning_steps, untried)


def step_keys(episode_key: jax.Array, t) -> tuple[jax.Array, jax.Array]:
    """(action key, planning key) of step `t` of an episode."""
    k_act, k_plan = jax.random.split(jax.random.fold_in(episode_key, t))
    return k_act, k_plan


# ----- jitted entry points for an agent that steps a Python env ------------------------------

def _act(table: Table, s, episode_key: jax.Array, t, epsilon) -> jax.Array:
    return epsilon_greedy(table.q[s], epsilon, step_keys(episode_key, t)[0])


@jax.jit
def act(table: Table, s, episode_key: jax.Array, t, epsilon) -> jax.Array:
    """The epsilon-greedy action at state `s`, step `t` of the episode."""
    return _act(table, s, episode_key, t, epsilon)


@functools.partial(jax.jit, static_argnames=("planning_steps", "untried"))
def learn_and_act(table: Table, s, a, r, s_next, done, episode_key: jax.Array, t, hyper: Hyper,
                  planning_steps: int, untried: bool) -> tuple[Table, jax.Array]:
    """One jitted call per real step `t`: `learn` from `(s, a, r, s', done)`, then the action
    for step `t + 1` at `s'` (unused when the episode has ended)."""
    table = learn(table, s, a, r, s_next, done, step_keys(episode_key, t)[1], hyper,
                  planning_steps, untried)
    return table, _act(table, s_next, episode_key, t + 1, hyper.epsilon)


# ----- whole episodes against a maze, in JAX --------------------------------------------------

def world_step(world: Maze | ChangingMaze, s, a, t):
    """`(s', r, terminal)` of the world at total step `t` (a `ChangingMaze` switches layout at
    `change_at`, as `MazeEnv` does)."""
    if isinstance(world, ChangingMaze):
        before, after = world.before.step(s, a), world.after.step(s, a)
        return jax.tree.map(lambda b, c: jnp.where(t < world.change_at, b, c), before, after)
    return world.step(s, a)


def _check_keys(run_keys, where: str) -> None:
    if not (hasattr(run_keys, "dtype") and jax.dtypes.issubdtype(run_keys.dtype, jax.dtypes.prng_key)
            and run_keys.ndim == 1):
        raise ForethoughtError(f"{where}: run_keys must be a 1-D array of typed PRNG keys (one per "
                               f"run, e.g. jax.random.split(jax.random.key(0), 30)), got "
                               f"{getattr(run_keys, 'dtype', type(run_keys).__name__)} of shape "
                               f"{getattr(run_keys, 'shape', ())}")


def _check_world(world, table: Table, where: str) -> None:
    if not isinstance(world, (Maze, ChangingMaze)):
        raise ForethoughtError(f"{where}: world must be a Maze or ChangingMaze, got {type(world).__name__}")
    if table.q.shape[-2:] != (world.num_states, world.num_actions):
        raise ForethoughtError(
            f"{where}: the table is for {table.q.shape[-2]} states and {table.q.shape[-1]} actions, "
            f"the maze has {world.num_states} and {world.num_actions}")


def _start(world: Maze | ChangingMaze) -> int:
    return (world.before if isinstance(world, ChangingMaze) else world).start_state


def _episode(table, world, episode_key, hyper, world_t0, planning_steps, untried, max_steps):
    def cond(carry):
        _, _, t, _, done = carry
        return ~done & (t < max_steps)

    def body(carry):
        table, s, t, total, _ = carry
        a = _act(table, s, episode_key, t, hyper.epsilon)
        s_next, r, terminal = world_step(world, s, a, world_t0 + t)
        table = learn(table, s, a, r, s_next, terminal, step_keys(episode_key, t)[1], hyper,
                      planning_steps, untried)
        return table, s_next, t + 1, total + r, terminal

    s0 = jnp.asarray(_start(world), jnp.int32)
    table, _, length, total, _ = jax.lax.while_loop(
        cond, body, (table, s0, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32),
                     jnp.zeros((), bool)))
    return table, length, total


_episode_jit = jax.jit(_episode, static_argnames=("planning_steps", "untried", "max_steps"))


def run_episode(table: Table, world: Maze | ChangingMaze, episode_key: jax.Array, hyper: Hyper,
                planning_steps: int, *, world_t0=0, max_steps: int | None = None):
    """One episode from the start state until a goal (or `max_steps`), all in one jitted call.

    `world_t0` is the world's total step count when the episode starts (for a `ChangingMaze`).
    Dyna-Q+'s untried actions are planned with when `hyper.kappa > 0` (a concrete number).
    Returns `(table, length, return)`; `run_episodes` runs many independent runs at once."""
    _check_world(world, table, "run_episode")
    return _episode_jit(table, world, episode_key, hyper, world_t0, int(planning_steps),
                    _untried(hyper), NEVER_ENDS if max_steps is None else int(max_steps))


@functools.partial(jax.jit, static_argnames=("episodes", "planning_steps", "untried"))
def _runs_of_episodes(tables, world, run_keys, hyper, episodes, planning_steps, untried):
    def one_run(table, key):
        def body(carry, i):
            table, t0 = carry
            table, length, total = _episode(
                table, world, jax.random.fold_in(key, i), hyper, t0, planning_steps, untried,
                NEVER_ENDS)
            return (table, t0 + length), (length, total)

        (table, _), (lengths, returns) = jax.lax.scan(body, (table, jnp.zeros((), jnp.int32)),
                                                      jnp.arange(episodes))
        return table, lengths, returns

    return jax.vmap(one_run)(tables, run_keys)


def run_episodes(world: Maze | ChangingMaze, run_keys: jax.Array, hyper: Hyper, planning_steps: int,
                 episodes: int):
    """`len(run_keys)` independent runs of `episodes` episodes each from an empty table, all in
    one jitted call. Episode `i` of the run with key `k` uses `fold_in(k, i)`, the rule of
    `forethought.agents.base.episode_key`, so a run equals `dyna_q.train` with key `k` on the
    same maze. Returns `(tables, lengths [R, E], returns [R, E])`."""
    _check_keys(run_keys, "run_episodes")
    tables = jax.vmap(lambda _: init_table(world.num_states, world.num_actions))(run_keys)
    _check_world(world, tables, "run_episodes")
    return _runs_of_episodes(tables, world, run_keys, hyper, int(episodes), int(planning_steps),
                             _untried(hyper))


@functools.partial(jax.jit, static_argnames=("steps", "planning_steps", "untried"))
def _runs_of_steps(tables, world, run_keys, hyper, steps, planning_steps, untried):
    start = jnp.asarray(_start(world), jnp.int32)

    def one_run(table, key):
        def body(carry, t):
            table, s = carry
            k_act, k_plan = step_keys(key, t)
            a = epsilon_greedy(table.q[s], hyper.epsilon, k_act)
            s_next, r, terminal = world_step(world, s, a, t)
            table = learn(table, s, a, r, s_next, terminal, k_plan, hyper, planning_steps, untried)
            return (table, jnp.where(terminal, start, s_next)), r

        (table, _), rewards = jax.lax.scan(body, (table, start), jnp.arange(steps))
        return table, rewards

    return jax.vmap(one_run)(tables, run_keys)


def run_steps(world: Maze | ChangingMaze, run_keys: jax.Array, hyper: Hyper, planning_steps: int,
              steps: int):
    """`len(run_keys)` independent runs of `steps` real steps each from an empty table, starting
    over at the start state whenever a goal is reached (the time axis of Figures 8.4 and 8.5).
    Step `t` of the run with key `k` uses `fold_in(k, t)`. Returns `(tables, rewards [R, steps])`;
    the cumulative reward is `rewards.cumsum(-1)`."""
    _check_keys(run_keys, "run_steps")
    tables = jax.vmap(lambda _: init_table(world.num_states, world.num_actions))(run_keys)
    _check_world(world, tables, "run_steps")
    return _runs_of_steps(tables, world, run_keys, hyper, int(steps), int(planning_steps),
                          _untried(hyper))


def _untried(hyper: Hyper) -> bool:
    """Dyna-Q+ plans with untried actions; decided from a concrete `kappa`."""
    try:
        return float(hyper.kappa) > 0.0
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ForethoughtError("tabular: hyper.kappa must be a concrete number (it decides whether "
                               "untried actions are planned with)") from None
