"""Discrete grid mazes as arrays: the Dyna maze, the blocking maze and the shortcut maze.

Sutton & Barto, *Reinforcement Learning: An Introduction* (2nd ed.), chapter 8, Examples 8.1 to
8.3; the tabular Dyna-Q box of note 001 ("Dyna Architecture") plans through exactly this kind of
model, `Model(S, A) -> R, S'`.

A `Maze` holds the deterministic tabular model as arrays over the `S = rows * cols` cells
(state `s = row * cols + col`, row 0 at the top) and the `A = 4` actions of `ACTIONS`:

- `next_state: int32 [S, A]`: moving into a wall or off the grid leaves the agent in place,
- `reward: float32 [S, A]`: 1 on entering a goal, 0 otherwise (Example 8.1),
- `terminal: bool [S]`: the goals, which are absorbing (any action stays, reward 0).

Wall cells are states too, so the arrays are rectangular; no start reaches them. Their rows of
`next_state` still move the agent out, because in a changing world (`ChangingMaze`) a wall can
appear under an agent that then has to be able to step off it.

`Maze.step(s, a)` is pure JAX (jit, vmap, `lax.scan`); `MazeEnv` is the same world as a
Gymnasium env, counting steps across episodes so that a `ChangingMaze` switches its layout at the
step the book's figures use.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
from gymnasium import spaces

from forethought.errors import ForethoughtError
from forethought.systems import draw

ACTIONS: tuple[str, ...] = ("up", "down", "right", "left")
"""Action names, in the order of the action index."""

MOVES: tuple[tuple[int, int], ...] = ((-1, 0), (1, 0), (0, 1), (0, -1))
"""`(d_row, d_col)` of each action in `ACTIONS` (row 0 is the top row)."""

WALL, FREE, START, GOAL = "#", ".", "S", "G"


@dataclasses.dataclass(frozen=True, eq=False)
class Maze:
    """A grid maze and its deterministic tabular model (see the module docstring).

    Build one with `Maze.from_layout(text)` or `Maze.from_walls(walls, start, goals)`, which
    compute the model arrays; the constructor itself takes every field as given (JAX calls it
    when it rebuilds the pytree). The arrays are pytree data, so a `Maze` passes through `jit`
    and `vmap`; `shape`, `start` and `goals` are static.
    """

    walls: jax.Array
    """bool [rows, cols]: True where a wall is."""
    next_state: jax.Array
    """int32 [S, A]: the state reached by action `a` from state `s`."""
    reward: jax.Array
    """float32 [S, A]: 1.0 on entering a goal from a non-goal state, else 0.0."""
    terminal: jax.Array
    """bool [S]: True at the goals."""
    shape: tuple[int, int]
    """(rows, cols)."""
    start: tuple[int, int]
    """(row, col) of the start."""
    goals: tuple[tuple[int, int], ...]
    """(row, col) of each goal."""

    # ----- construction ---------------------------------------------------------------------
    @classmethod
    def from_walls(cls, walls, start, goals) -> Maze:
        """The maze with wall mask `walls: bool [rows, cols]`, `start: (row, col)` and
        `goals: sequence of (row, col)`; computes the tabular model."""
        walls = np.asarray(walls)
        if walls.ndim != 2 or walls.shape[0] < 1 or walls.shape[1] < 1:
            raise ForethoughtError(
                f"Maze: walls must be a non-empty 2-D [rows, cols] array, got shape {walls.shape}")
        if walls.dtype != bool:
            raise ForethoughtError(f"Maze: walls must be a boolean array, got dtype {walls.dtype}")
        rows, cols = walls.shape
        start = _cell(start, "start", walls)
        try:
            goals = tuple(_cell(g, "goal", walls) for g in goals)
        except TypeError:
            raise ForethoughtError(
                f"Maze: goals must be a sequence of (row, col) pairs, got {goals!r}") from None
        if not goals:
            raise ForethoughtError("Maze: goals must hold at least one (row, col), got none")
        if len(set(goals)) != len(goals):
            raise ForethoughtError(f"Maze: goals must be distinct, got {list(goals)}")
        if start in goals:
            raise ForethoughtError(
                f"Maze: start {start} must not be a goal, goals are {list(goals)}")

        S, A = rows * cols, len(ACTIONS)
        r, c = np.divmod(np.arange(S), cols)
        next_state = np.empty((S, A), np.int32)
        for a, (dr, dc) in enumerate(MOVES):
            r2, c2 = r + dr, c + dc
            inside = (r2 >= 0) & (r2 < rows) & (c2 >= 0) & (c2 < cols)
            r2, c2 = np.where(inside, r2, r), np.where(inside, c2, c)
            blocked = walls[r2, c2]
            next_state[:, a] = np.where(blocked, r * cols + c, r2 * cols + c2)
        terminal = np.zeros(S, bool)
        terminal[[gr * cols + gc for gr, gc in goals]] = True
        # Goals are absorbing: the episode ended on entering them.
        next_state[terminal] = np.flatnonzero(terminal)[:, None]
        reward = (terminal[next_state] & ~terminal[:, None]).astype(np.float32)
        return cls(walls=jnp.asarray(walls), next_state=jnp.asarray(next_state),
                   reward=jnp.asarray(reward), terminal=jnp.asarray(terminal),
                   shape=(rows, cols), start=start, goals=goals)

    @classmethod
    def from_layout(cls, layout: str) -> Maze:
        """Parse a text maze: `#` wall, `.` free, `S` the start (exactly one), `G` a goal (one or
        more), one line per row, all rows the same length. Leading and trailing whitespace of
        the text and of each line is ignored, so an indented triple-quoted string works."""
        where = "Maze.from_layout"
        if not isinstance(layout, str):
            raise ForethoughtError(f"{where}: layout must be a string, got {type(layout).__name__}")
        lines = [line.strip() for line in layout.strip().splitlines()]
        if not lines or not lines[0]:
            raise ForethoughtError(f"{where}: layout must have at least one row, got {layout!r}")
        for i, line in enumerate(lines):
            if len(line) != len(lines[0]):
                raise ForethoughtError(
                    f"{where}: layout rows must all have the same length; row 0 has "
                    f"{len(lines[0])} characters, row {i} has {len(line)} ({line!r})")
            for j, ch in enumerate(line):
                if ch not in (WALL, FREE, START, GOAL):
                    raise ForethoughtError(
                        f"{where}: layout characters must be one of '#' (wall), '.' (free), "
                        f"'S' (start), 'G' (goal); got {ch!r} at row {i}, col {j}")
        grid = np.array([list(line) for line in lines])
        starts = [tuple(int(v) for v in p) for p in np.argwhere(grid == START)]
        goals = [tuple(int(v) for v in p) for p in np.argwhere(grid == GOAL)]
        if len(starts) != 1:
            got = "none" if not starts else f"{len(starts)}, at {starts}"
            raise ForethoughtError(
                f"{where}: layout must contain exactly one 'S' (start), got {got}")
        if not goals:
            raise ForethoughtError(
                f"{where}: layout must contain at least one 'G' (goal), got none")
        return cls.from_walls(grid == WALL, starts[0], goals)

    # ----- the model --------------------------------------------------------------------------
    def step(self, s, a):
        """One move: `s`, `a` integer (arrays or Python ints) -> `(s_next, reward, done)`.

        Pure JAX, so it works under `jit` and `vmap` (batch `s` and `a` together, or a stacked
        batch of mazes of one shape). `done` is `terminal[s_next]`."""
        s_next = self.next_state[s, a]
        return s_next, self.reward[s, a], self.terminal[s_next]

    def index(self, row, col):
        """State index `row * cols + col` of a cell (ints or integer arrays)."""
        return row * self.shape[1] + col

    def position(self, s):
        """`(row, col)` of state `s` (ints or integer arrays)."""
        return s // self.shape[1], s % self.shape[1]

    @property
    def start_state(self) -> int:
        return int(self.index(*self.start))

    @property
    def goal_states(self) -> tuple[int, ...]:
        return tuple(int(self.index(*g)) for g in self.goals)

    @property
    def num_states(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def num_actions(self) -> int:
        return len(ACTIONS)

    def goal_distances(self) -> np.ndarray:
        """int [S]: the fewest steps from each state to a goal (0 at a goal, -1 where no goal
        can be reached), by breadth-first search backwards through `next_state`."""
        next_state = np.asarray(self.next_state)
        predecessors: list[list[int]] = [[] for _ in range(self.num_states)]
        for s, row in enumerate(next_state):
            for s2 in set(row.tolist()) - {s}:
                predecessors[s2].append(s)
        distance = np.full(self.num_states, -1, np.int64)
        queue = deque(self.goal_states)
        distance[list(self.goal_states)] = 0
        while queue:
            s2 = queue.popleft()
            for s in predecessors[s2]:
                if distance[s] < 0:
                    distance[s] = distance[s2] + 1
                    queue.append(s)
        return distance

    def shortest_path_length(self) -> int:
        """The fewest steps from the start to a goal (breadth-first search)."""
        d = int(self.goal_distances()[self.start_state])
        if d < 0:
            raise ForethoughtError(
                f"Maze: no goal can be reached from the start in\n{self.to_layout()}")
        return d

    # ----- text and pictures -------------------------------------------------------------------
    def to_layout(self) -> str:
        """The text form read by `from_layout`."""
        grid = np.where(np.asarray(self.walls), WALL, FREE).astype("<U1")
        grid[self.start] = START
        for g in self.goals:
            grid[g] = GOAL
        return "\n".join("".join(row) for row in grid)

    def render(self, s=None, size: int = 256) -> np.ndarray:
        """uint8 [size, size, 3]: walls dark, the start blue, goals green, the agent (at state
        `s`, if given) an orange disc. One cell is one world unit, row 0 at the top."""
        rows, cols = self.shape
        side = max(rows, cols) + 0.2  # a margin keeps the border line inside the image
        pad_x, pad_y = (side - cols) / 2, (side - rows) / 2
        canvas = draw.Canvas(size, (-pad_x, cols + pad_x, -pad_y, rows + pad_y))

        def centre(row, col):
            return (col + 0.5, rows - row - 0.5)

        for i in range(1, rows):
            canvas.line((0, i), (cols, i), 0.02, draw.GREY)
        for j in range(1, cols):
            canvas.line((j, 0), (j, rows), 0.02, draw.GREY)
        canvas.rectangle(centre(*self.start), 0.8, 0.8, draw.BLUE)
        for g in self.goals:
            canvas.rectangle(centre(*g), 0.8, 0.8, draw.GREEN)
        for row, col in np.argwhere(np.asarray(self.walls)):
            canvas.rectangle(centre(row, col), 1.0, 1.0, draw.INK)
        canvas.polyline([(0, 0), (cols, 0), (cols, rows), (0, rows), (0, 0)], 0.06, draw.INK)
        if s is not None:
            canvas.circle(centre(*self.position(int(s))), 0.3, draw.ACCENT)
        return canvas.to_uint8()

    # ----- comparisons ------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Maze):
            return NotImplemented
        return (self.shape == other.shape and self.start == other.start
                and self.goals == other.goals
                and all(np.array_equal(np.asarray(getattr(self, f)), np.asarray(getattr(other, f)))
                        for f in ("walls", "next_state", "reward", "terminal")))

    def __hash__(self) -> int:
        return hash((self.shape, self.start, self.goals))

    def __repr__(self) -> str:
        try:
            return f"Maze.from_layout('''\n{self.to_layout()}\n''')"
        except Exception:  # traced or batched arrays have no single layout to print
            return f"Maze(shape={self.shape}, start={self.start}, goals={self.goals})"


jax.tree_util.register_dataclass(
    Maze, data_fields=["walls", "next_state", "reward", "terminal"],
    meta_fields=["shape", "start", "goals"])


def _cell(value: Any, name: str, walls: np.ndarray) -> tuple[int, int]:
    """Check that `value` is a free (row, col) inside `walls`."""
    rows, cols = walls.shape
    try:
        row, col = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ForethoughtError(
            f"Maze: {name} must be a (row, col) pair of ints, got {value!r}") from None
    if not (0 <= row < rows and 0 <= col < cols):
        raise ForethoughtError(
            f"Maze: {name} must lie inside the {rows}x{cols} grid, got ({row}, {col})")
    if walls[row, col]:
        raise ForethoughtError(f"Maze: {name} must be a free cell, got a wall at ({row}, {col})")
    return row, col


@dataclasses.dataclass(frozen=True)
class ChangingMaze:
    """A world whose layout switches from `before` to `after` once `change_at` environment steps
    have been taken (counted across episodes, as in Examples 8.2 and 8.3).

    Both layouts must have the same grid shape; a pytree with `change_at` static, so
    `maze_at(t)` with a traced step `t` picks the arrays with `jnp.where` (then the two layouts
    must also share start and goals, as the book's blocking and shortcut mazes do).
    """

    before: Maze
    after: Maze
    change_at: int
    """The total step count from which `after` is the world: steps 0 .. change_at - 1 use
    `before`."""

    def __post_init__(self):
        if not (isinstance(self.before, Maze) and isinstance(self.after, Maze)):
            raise ForethoughtError(
                f"ChangingMaze: before and after must be Maze, got "
                f"{type(self.before).__name__} and {type(self.after).__name__}")
        if self.before.shape != self.after.shape:
            raise ForethoughtError(
                f"ChangingMaze: before and after must have the same shape, got "
                f"{self.before.shape} and {self.after.shape}")
        if not isinstance(self.change_at, (int, np.integer)) or self.change_at < 0:
            raise ForethoughtError(
                f"ChangingMaze: change_at must be an integer >= 0, got {self.change_at!r}")

    def maze_at(self, step) -> Maze:
        """The layout in force for the transition taken at total step `step` (0-based)."""
        if not isinstance(step, jax.core.Tracer):
            return self.before if int(step) < self.change_at else self.after
        if (self.before.start, self.before.goals) != (self.after.start, self.after.goals):
            raise ForethoughtError(
                "ChangingMaze.maze_at: a traced step needs before and after to share start and "
                f"goals, got {self.before.start}, {self.before.goals} and "
                f"{self.after.start}, {self.after.goals}")
        return jax.tree.map(lambda b, a: jnp.where(step < self.change_at, b, a),
                            self.before, self.after)

    @property
    def shape(self) -> tuple[int, int]:
        return self.before.shape

    @property
    def num_states(self) -> int:
        return self.before.num_states

    @property
    def num_actions(self) -> int:
        return self.before.num_actions


jax.tree_util.register_dataclass(ChangingMaze, data_fields=["before", "after"],
                                 meta_fields=["change_at"])


# ----- the book's mazes ----------------------------------------------------------------------

DYNA_MAZE = """
.......#G
..#....#.
S.#....#.
..#......
.....#...
.........
"""

# Figures 8.4 and 8.5 draw the same 6x9 grid: S in the bottom row, fourth cell from the left,
# G in the top-right corner, and one wall across the third row from the bottom (row 3) that
# leaves a single one-cell gap at its left or right end.
_WALL_GAP_RIGHT = """
........G
.........
.........
########.
.........
...S.....
"""
_WALL_GAP_LEFT = """
........G
.........
.........
.########
.........
...S.....
"""
_WALL_GAPS_BOTH = """
........G
.........
.........
.#######.
.........
...S.....
"""


def dyna_maze() -> Maze:
    """Example 8.1, the Dyna maze: 6x9, start (2, 0), goal (0, 8), walls at (1..3, 2),
    (0..2, 7) and (4, 5). The shortest path takes 14 steps::

        .......#G
        ..#....#.
        S.#....#.
        ..#......
        .....#...
        .........
    """
    return Maze.from_layout(DYNA_MAZE)


def blocking_maze(*, change_at: int = 1000) -> ChangingMaze:
    """Example 8.2 (Figure 8.4), the blocking maze: 6x9, start (5, 3), goal (0, 8), a wall across
    row 3 over cols 0..7 (the way round is on the right, 10 steps) that after `change_at` = 1000
    steps moves to cols 1..8, blocking that way and opening a longer one on the left (16 steps)::

        before       after
        ........G    ........G
        .........    .........
        .........    .........
        ########.    .########
        .........    .........
        ...S.....    ...S.....
    """
    return ChangingMaze(Maze.from_layout(_WALL_GAP_RIGHT), Maze.from_layout(_WALL_GAP_LEFT),
                        change_at)


def shortcut_maze(*, change_at: int = 3000) -> ChangingMaze:
    """Example 8.3 (Figure 8.5), the shortcut maze: 6x9, start (5, 3), goal (0, 8), a wall across
    row 3 over cols 1..8 (the way round is on the left, 16 steps) that after `change_at` = 3000
    steps shrinks to cols 1..7, opening a shortcut on the right (10 steps) while the long way
    stays open::

        before       after
        ........G    ........G
        .........    .........
        .........    .........
        .########    .#######.
        .........    .........
        ...S.....    ...S.....
    """
    return ChangingMaze(Maze.from_layout(_WALL_GAP_LEFT), Maze.from_layout(_WALL_GAPS_BOTH),
                        change_at)


# ----- Gymnasium ------------------------------------------------------------------------------

class MazeEnv(gymnasium.Env):
    """A `Maze` or `ChangingMaze` as a Gymnasium env.

    Observations are the state index (`Discrete(S)`), actions index `ACTIONS` (`Discrete(4)`);
    the reward is 1 on entering a goal, where the episode terminates, and 0 otherwise. With
    `max_episode_steps` an episode is truncated after that many steps. `info["position"]` is the
    agent's `(row, col)`. The env counts its steps
    across episodes (`total_steps`, never reset), and a `ChangingMaze` uses
    `maze_at(total_steps)` for each step. `reset(seed=...)` is accepted; the world is
    deterministic, so the seed changes nothing.

    Stepping runs on NumPy copies of the arrays (one Python step need not pay for a JAX
    dispatch); it agrees with `Maze.step`.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, maze: Maze | ChangingMaze, max_episode_steps: int | None = None,
                 render_mode: str | None = None):
        if not isinstance(maze, (Maze, ChangingMaze)):
            raise ForethoughtError(
                f"MazeEnv: maze must be a Maze or ChangingMaze, got {type(maze).__name__}")
        if max_episode_steps is not None and (
                not isinstance(max_episode_steps, (int, np.integer)) or max_episode_steps < 1):
            raise ForethoughtError(
                "MazeEnv: max_episode_steps must be None or an integer >= 1, "
                f"got {max_episode_steps!r}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ForethoughtError(
                f"MazeEnv: render_mode must be None or one of {self.metadata['render_modes']}, "
                f"got {render_mode!r}")
        self.world = maze
        self.max_episode_steps = max_episode_steps
        self.render_mode = render_mode
        layouts = (maze,) if isinstance(maze, Maze) else (maze.before, maze.after)
        self._tables = [(np.asarray(m.next_state), np.asarray(m.reward), np.asarray(m.terminal))
                        for m in layouts]
        self.observation_space = spaces.Discrete(maze.num_states)
        self.action_space = spaces.Discrete(maze.num_actions)
        self.total_steps = 0
        self.state = self.maze.start_state
        self.elapsed = 0

    @property
    def maze(self) -> Maze:
        """The layout in force for the next step."""
        if isinstance(self.world, ChangingMaze):
            return self.world.maze_at(self.total_steps)
        return self.world

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.state = self.maze.start_state
        self.elapsed = 0
        return int(self.state), self._info()

    def step(self, action):
        if not self.action_space.contains(action):
            raise ForethoughtError(
                f"MazeEnv.step: action must be an integer in [0, {self.action_space.n}), "
                f"got {action!r}")
        changed = isinstance(self.world, ChangingMaze) and self.total_steps >= self.world.change_at
        next_state, reward, terminal = self._tables[int(changed)]
        a = int(action)
        s = self.state
        self.state = int(next_state[s, a])
        self.total_steps += 1
        self.elapsed += 1
        terminated = bool(terminal[self.state])
        truncated = (not terminated and self.max_episode_steps is not None
                     and self.elapsed >= self.max_episode_steps)
        return self.state, float(reward[s, a]), terminated, bool(truncated), self._info()

    def render(self):
        if self.render_mode is None:
            gymnasium.logger.warn(
                "MazeEnv.render: render_mode is None; pass render_mode='rgb_array'")
            return None
        return self.maze.render(self.state)

    def _info(self) -> dict:
        # Not `total_steps`: Gymnasium expects a reset with the same seed to give the same info.
        return {"position": self.maze.position(self.state)}
