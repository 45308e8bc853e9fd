"""What every agent shares: the episode loop and the run interface agents write to.

An agent module defines a frozen dataclass `Config` (documented fields; every agent has
`episodes`), a result type and `train(config, env, key, run=None) -> result`. `run` is a run
folder (`forethought.experiment.run.Run`) or, when None, an in-memory `MemoryRun`; agents call
only `log`, `event`, `save_checkpoint`, `load_checkpoint` and `progress` on it.

Reproducibility and resume rest on one rule: the randomness of episode `i` comes from
`episode_key(key, i)` and `episode_seed(key, i)` only, so a run resumed after episode `i`
repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable, Protocol

import gymnasium
import jax
import numpy as np


class RunLike(Protocol):
    def log(self, **row: Any) -> None: ...
    def event(self, kind: str, **data: Any) -> None: ...
    def save_checkpoint(self, state: Any, **meta: Any) -> None: ...
    def load_checkpoint(self, like: Any) -> tuple[Any, dict] | None: ...
    def progress(self, total: int, start: int = 0) -> Any: ...
    def close_progress(self) -> None: ...


class MemoryRun:
    """A run that keeps its metric rows in memory and writes nothing (for library use)."""

    def __init__(self):
        self.rows: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def log(self, **row: Any) -> None:
        self.rows.append(row)

    def event(self, kind: str, **data: Any) -> None:
        self.events.append({"event": kind, **data})

    def save_checkpoint(self, state: Any, **meta: Any) -> None:
        pass

    def load_checkpoint(self, like: Any) -> None:
        return None

    def progress(self, total: int, start: int = 0) -> None:
        return None

    def close_progress(self) -> None:
        pass


def episode_key(key: jax.Array, episode: int) -> jax.Array:
    """The JAX key for episode `episode`."""
    return jax.random.fold_in(key, episode)


def episode_seed(key: jax.Array, episode: int) -> int:
    """An integer seed for `env.reset(seed=...)` in episode `episode`."""
    data = jax.random.key_data(jax.random.fold_in(episode_key(key, episode), 0x5EED))
    return int(np.asarray(data).ravel()[-1] % (2**31 - 1))


@dataclasses.dataclass
class Episode:
    """One episode: `observations [T+1, ...]`, `actions [T, ...]`, `rewards [T]`."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool
    truncated: bool

    @property
    def length(self) -> int:
        return len(self.rewards)

    @property
    def total_reward(self) -> float:
        return float(np.sum(self.rewards))


def run_episode(env: gymnasium.Env, policy: Callable[[np.ndarray, int], Any], seed: int,
                max_steps: int | None = None) -> Episode:
    """Roll `policy(observation, t) -> action` in `env` from `reset(seed=seed)` until it ends."""
    obs, _ = env.reset(seed=seed)
    observations, actions, rewards = [obs], [], []
    terminated = truncated = False
    t = 0
    while not (terminated or truncated):
        action = policy(obs, t)
        obs, reward, terminated, truncated, _ = env.step(action)
        observations.append(obs)
        actions.append(action)
        rewards.append(reward)
        t += 1
        if max_steps is not None and t >= max_steps:
            truncated = True
    return Episode(np.asarray(observations), np.asarray(actions), np.asarray(rewards, np.float64),
                   bool(terminated), bool(truncated))


def evaluation_env(env: gymnasium.Env) -> gymnasium.Env:
    """A separate instance of `env` for evaluation episodes, so that they change neither its
    state nor what its wrappers count: for a registered env `gymnasium.make` of its spec (time
    limit and wrappers rebuilt; wrappers that cannot be rebuilt from a spec are peeled off from
    the outside until one can), otherwise (a built-in system's env) a deep copy."""
    if env.unwrapped.spec is None:
        return copy.deepcopy(env)
    while True:
        try:
            return gymnasium.make(env.spec)
        except ValueError:  # "wrapper ... cannot be recreated"
            env = env.env


def evaluate(env: gymnasium.Env, policy: Callable[[np.ndarray, int], Any], episodes: int, key: jax.Array,
             index: int) -> float:
    """Mean return of `episodes` episodes of `policy` in `env` (an `evaluation_env`), the `j`-th
    from `reset(seed=episode_seed(key, index * episodes + j))`."""
    return float(np.mean([run_episode(env, policy, episode_seed(key, index * episodes + j)).total_reward
                          for j in range(episodes)]))


class EpisodeClock:
    """Cumulative wall seconds that survive a resume (the checkpoint stores `elapsed`)."""

    def __init__(self, elapsed: float = 0.0):
        self._offset = elapsed
        self._start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return self._offset + time.perf_counter() - self._start


def save_buffer(run: RunLike, buffer) -> None:
    """Write `buffer` to the run folder's `buffer.npz` (before the checkpoint that counts its
    transitions); a run without a folder (`MemoryRun`) keeps nothing."""
    path = getattr(run, "path", None)
    if path is not None:
        buffer.save(path / "buffer.npz")


def restore_buffer(run: RunLike, meta: dict, buffer):
    """The buffer saved by `save_buffer`, cut back to the `buffer_transitions` the checkpoint
    `meta` covers (it is written first, so it may hold an episode the checkpoint does not);
    `buffer` itself when the run has no saved one."""
    from forethought.rl.buffer import ReplayBuffer

    path = getattr(run, "path", None)
    if path is None or not (path / "buffer.npz").exists():
        return buffer
    saved = ReplayBuffer.load(path / "buffer.npz")
    saved.truncate(int(meta["buffer_transitions"]))
    return saved
