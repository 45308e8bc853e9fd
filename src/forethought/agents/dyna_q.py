"""Tabular Dyna-Q and Dyna-Q+: Q-learning from real steps plus planning updates from a learned model.

Note 001's tabular Dyna-Q box (also note 003, "Dyna: combining model-free and model-based RL"),
Sutton & Barto (2nd ed.) section 8.2; Dyna-Q+ is section 8.3. At every real step the agent acts
epsilon-greedily (ties broken at random), makes one Q-learning update from the step, records the
step in its deterministic model `Model(s, a) <- r, s'`, and then makes `planning_steps` more
Q-learning updates on transitions drawn from the model alone: a previously visited state, an
action previously taken there. With `kappa > 0` (Dyna-Q+) a planned reward gets the bonus
`kappa sqrt(tau)`, `tau` the real steps since the pair was last tried, and untried actions of
visited states are planned with as "reward 0, back to the same state" (the book's footnote).

    forethought run dyna-q --env dyna-maze --planning-steps 50 --episodes 50
    forethought run dyna-q-plus --env shortcut-maze --episodes 400

Any Gymnasium env with a `Discrete` observation and action space works (the mazes of
`forethought.systems.mazes`, `gym:FrozenLake-v1`, `gym:CliffWalking-v1`, ...). The agent steps
the env in Python with one jitted call per step (`rl.tabular.learn_and_act`: update, model,
planning, next action); `rl.tabular.run_episodes` plays the same agent against a maze entirely in
JAX, many runs at once (`benchmarks/dyna_maze.py`, Figures 8.2, 8.4 and 8.5).

A `MazeEnv` counts its steps across episodes so that a changing maze (blocking, shortcut)
switches layout at the book's step; on resume the agent sets that count to the steps already
taken, so a resumed run meets the change where the uninterrupted one did.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import gymnasium
import jax
import numpy as np

from forethought.agents.base import EpisodeClock, MemoryRun, RunLike, episode_key, episode_seed
from forethought.errors import ForethoughtError
from forethought.rl import tabular
from forethought.systems.gym import describe_spaces
from forethought.systems.mazes import MazeEnv


@dataclasses.dataclass(frozen=True)
class Config:
    """Tabular Dyna-Q: Q-learning plus planning updates from a learned table model (S&B 8.2)."""

    episodes: int = 50
    """Number of episodes to run."""
    planning_steps: int = 50
    """Planning updates from the model after each real step (the book's n; 0 is Q-learning)."""
    alpha: float = 0.1
    """Step size of every Q update, real and planned."""
    epsilon: float = 0.1
    """Probability of a uniformly random action (otherwise greedy, ties broken at random)."""
    gamma: float = 0.95
    """Discount factor."""
    kappa: float = 0.0
    """Dyna-Q+ bonus weight: planned rewards get kappa * sqrt(real steps since the pair was tried).
    Above 0, untried actions are planned with too; 0 is plain Dyna-Q."""

    def __post_init__(self):
        for name, minimum in (("episodes", 1), ("planning_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ForethoughtError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name, low, high, low_open in (("alpha", 0.0, 1.0, True), ("epsilon", 0.0, 1.0, False),
                                          ("gamma", 0.0, 1.0, False)):
            value = getattr(self, name)
            if not _real(value) or not (low < value <= high if low_open else low <= value <= high):
                interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
                raise ForethoughtError(f"{name} must be in {interval}, got {value!r}")
        if not _real(self.kappa) or self.kappa < 0:
            raise ForethoughtError(f"kappa must be a finite number >= 0, got {self.kappa!r}")

    def hyper(self) -> tabular.Hyper:
        """The numeric settings as `rl.tabular` takes them."""
        return tabular.Hyper(alpha=float(self.alpha), epsilon=float(self.epsilon),
                             gamma=float(self.gamma), kappa=float(self.kappa))


@dataclasses.dataclass(frozen=True)
class PlusConfig(Config):
    """Tabular Dyna-Q+: Dyna-Q with an exploration bonus for long-untried actions (S&B 8.3)."""

    kappa: float = 1e-3
    """Dyna-Q+ bonus weight: planned rewards get kappa * sqrt(real steps since the pair was tried).
    Untried actions are planned with too; 1e-3 finds Figure 8.5's shortcut."""

    def __post_init__(self):
        super().__post_init__()
        if self.kappa <= 0:
            raise ForethoughtError(f"kappa must be > 0 for Dyna-Q+, got {self.kappa!r} "
                                   "(kappa 0 is plain Dyna-Q: forethought run dyna-q)")


def _real(value) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclasses.dataclass(frozen=True)
class Result:
    returns: list[float]
    lengths: list[int]
    """Steps of each episode."""
    env_steps: int
    table: tabular.Table
    """What the agent learned: Q and the model (NumPy arrays, states and actions counted from 0)."""
    policy: Callable[[np.ndarray, int], int]
    """`policy(observation, t) -> action`: greedy in the final Q, ties broken at random (a fixed
    tie-break can walk into a wall for ever where Q is still 0)."""


def _env_name(env: gymnasium.Env) -> str:
    inner = env.unwrapped
    system = getattr(inner, "system", None)
    if getattr(system, "name", None):
        return str(system.name)
    if env.spec is not None:
        return env.spec.id
    return type(inner).__name__


def tabular_spaces(env: gymnasium.Env, agent: str = "Dyna-Q") -> tuple[int, int, int, int]:
    """`(num_states, num_actions, first_state, first_action)` of an env with `Discrete` observation
    and action spaces; raises `ForethoughtError` naming the env otherwise."""
    obs_space, action_space = env.observation_space, env.action_space
    if not (isinstance(obs_space, gymnasium.spaces.Discrete)
            and isinstance(action_space, gymnasium.spaces.Discrete)):
        raise ForethoughtError(
            f"{agent} is tabular: it needs an env with a Discrete observation space and a Discrete "
            f"action space (a maze such as dyna-maze, blocking-maze, shortcut-maze, or "
            f"gym:FrozenLake-v1); env {_env_name(env)!r} has {describe_spaces(env)}")
    return int(obs_space.n), int(action_space.n), int(obs_space.start), int(action_space.start)


def train(config: Config, env: gymnasium.Env, key: jax.Array, run: RunLike | None = None) -> Result:
    """Run `config.episodes` episodes of Dyna-Q (Dyna-Q+ when `config.kappa > 0`) in `env`."""
    agent = "Dyna-Q+" if config.kappa > 0 else "Dyna-Q"
    num_states, num_actions, first_state, first_action = tabular_spaces(env, agent)
    run = run or MemoryRun()
    hyper, n, untried = config.hyper(), int(config.planning_steps), config.kappa > 0
    state = {"table": tabular.init_table(num_states, num_actions), "episode": np.int64(0),
             "env_steps": np.int64(0), "elapsed": np.float64(0.0)}
    returns: list[float] = []
    lengths: list[int] = []
    restored = run.load_checkpoint(state)
    if restored is not None:
        state, meta = restored
        returns = [float(r) for r in meta.get("returns", [])]
        lengths = [int(n_) for n_ in meta.get("lengths", [])]
        if isinstance(env.unwrapped, MazeEnv):  # a changing maze switches at the same total step
            env.unwrapped.total_steps = int(state["env_steps"])
    table = state["table"]
    start, env_steps = int(state["episode"]), int(state["env_steps"])
    clock = EpisodeClock(float(state["elapsed"]))
    run.progress(config.episodes, start=start)
    try:
        for episode in range(start, config.episodes):
            ekey = episode_key(key, episode)
            obs, _ = env.reset(seed=episode_seed(key, episode))
            s = _index(obs, first_state, num_states)
            a = tabular.act(table, s, ekey, 0, hyper.epsilon)
            t, total, done = 0, 0.0, False
            while not done:
                obs, reward, terminated, truncated, _ = env.step(int(a) + first_action)
                s_next = _index(obs, first_state, num_states)
                table, a = tabular.learn_and_act(table, s, a, float(reward), s_next, bool(terminated),
                                                 ekey, t, hyper, planning_steps=n, untried=untried)
                s, t, total = s_next, t + 1, total + float(reward)
                done = terminated or truncated
            env_steps += t
            returns.append(total)
            lengths.append(t)
            run.log(episode=episode, env_steps=env_steps, **{"return": total}, length=t,
                    wall_seconds=round(clock.elapsed, 3), model_pairs=int(table.tried.sum()))
            state = {"table": table, "episode": np.int64(episode + 1),
                     "env_steps": np.int64(env_steps), "elapsed": np.float64(clock.elapsed)}
            run.save_checkpoint(state, episode=episode + 1, returns=returns, lengths=lengths)
    finally:
        run.close_progress()
    table = jax.tree.map(np.asarray, table)
    q, rng = table.q, np.random.default_rng(0)

    def policy(observation, t):
        row = q[_index(observation, first_state, num_states)]
        return int(rng.choice(np.flatnonzero(row == row.max()))) + first_action

    return Result(returns, lengths, env_steps, table, policy)


def _index(observation, first: int, count: int) -> int:
    s = int(observation) - first
    if not 0 <= s < count:
        raise ForethoughtError(f"observation {observation!r} is outside the env's Discrete space "
                               f"[{first}, {first + count})")
    return s
