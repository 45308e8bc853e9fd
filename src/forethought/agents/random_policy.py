"""The random agent: uniformly random actions. A baseline, and the pipe from env to plot.

    forethought run random --env pendulum --episodes 5
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import gymnasium
import jax
import numpy as np

from forethought.agents.base import EpisodeClock, MemoryRun, RunLike, episode_key, episode_seed, run_episode
from forethought.errors import ForethoughtError


@dataclasses.dataclass(frozen=True)
class Config:
    """Uniformly random actions from the env's action space."""

    episodes: int = 10
    """Number of episodes to run."""

    def __post_init__(self):
        if self.episodes < 1:
            raise ForethoughtError(f"episodes must be >= 1, got {self.episodes}")


@dataclasses.dataclass(frozen=True)
class Result:
    returns: list[float]
    env_steps: int
    policy: Callable[[np.ndarray, int], np.ndarray]
    """`policy(observation, t) -> action`: what the agent ended with (here: random actions)."""


def train(config: Config, env: gymnasium.Env, key: jax.Array, run: RunLike | None = None) -> Result:
    run = run or MemoryRun()
    state = {"episode": np.int64(0), "env_steps": np.int64(0), "elapsed": np.float64(0.0)}
    returns: list[float] = []
    restored = run.load_checkpoint(state)
    if restored is not None:
        state, meta = restored
        returns = list(meta.get("returns", []))
    start, env_steps = int(state["episode"]), int(state["env_steps"])
    clock = EpisodeClock(float(state["elapsed"]))
    run.progress(config.episodes, start=start)
    try:
        for episode in range(start, config.episodes):
            env.action_space.seed(episode_seed(episode_key(key, episode), 1))
            result = run_episode(env, lambda obs, t: env.action_space.sample(), episode_seed(key, episode))
            env_steps += result.length
            returns.append(result.total_reward)
            run.log(episode=episode, env_steps=env_steps, **{"return": result.total_reward},
                    length=result.length, wall_seconds=round(clock.elapsed, 3))
            state = {"episode": np.int64(episode + 1), "env_steps": np.int64(env_steps),
                     "elapsed": np.float64(clock.elapsed)}
            run.save_checkpoint(state, episode=episode + 1, returns=returns)
    finally:
        run.close_progress()
    return Result(returns, env_steps, lambda obs, t: env.action_space.sample())
