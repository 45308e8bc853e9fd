"""A replay buffer of transitions with episode boundaries (NumPy; agents orchestrate episodes).

Transitions are `(observation, action, reward, next_observation, terminated)`; `episode_starts`
marks where each episode begins, so whole episodes can be read back (`episodes()`), as the
local-model and latent-model agents need. Saved as `.npz` without pickle.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from forethought.errors import ForethoughtError, check_finite


@dataclasses.dataclass(frozen=True)
class Transitions:
    """A batch of transitions: `obs [N, n]`, `action [N, m]`, `reward [N]`, `next_obs [N, n]`,
    `terminated [N]`."""

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray

    def __len__(self) -> int:
        return len(self.reward)


class ReplayBuffer:
    """Transitions in arrays that grow (by doubling) as data comes; nothing is ever dropped unless
    `capacity` is set, in which case the oldest transitions go first."""

    def __init__(self, obs_dim: int, action_dim: int, capacity: int | None = None):
        if obs_dim < 1 or action_dim < 1:
            raise ForethoughtError(f"ReplayBuffer: obs_dim and action_dim must be >= 1, got {obs_dim}, {action_dim}")
        if capacity is not None and capacity < 1:
            raise ForethoughtError(f"ReplayBuffer: capacity must be >= 1 or None, got {capacity}")
        self.obs_dim, self.action_dim, self.capacity = obs_dim, action_dim, capacity
        self._size = 0
        self._data = self._allocate(1024 if capacity is None else min(capacity, 1024))
        self._episode_starts: list[int] = []

    def _allocate(self, n: int) -> dict[str, np.ndarray]:
        return {"obs": np.zeros((n, self.obs_dim), np.float32),
                "action": np.zeros((n, self.action_dim), np.float32),
                "reward": np.zeros((n,), np.float32),
                "next_obs": np.zeros((n, self.obs_dim), np.float32),
                "terminated": np.zeros((n,), bool)}

    def __len__(self) -> int:
        return self._size

    @property
    def episode_starts(self) -> list[int]:
        return list(self._episode_starts)

    def add_episode(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
                    terminated: bool = False) -> None:
        """Add an episode: `obs [T+1, n]`, `actions [T, m]`, `rewards [T]`; `terminated` says
        whether its last transition ended the task (rather than a time limit)."""
        obs = np.asarray(obs, np.float32)
        actions = np.asarray(actions, np.float32).reshape(len(actions), -1)
        rewards = np.asarray(rewards, np.float32).reshape(-1)
        T = len(rewards)
        if obs.shape != (T + 1, self.obs_dim) or actions.shape != (T, self.action_dim):
            raise ForethoughtError(
                f"add_episode: expected obs [T+1, {self.obs_dim}] and actions [T, {self.action_dim}] "
                f"with T = len(rewards) = {T}, got obs {obs.shape} and actions {actions.shape}")
        for name, array in (("obs", obs), ("actions", actions), ("rewards", rewards)):
            check_finite(array, name, where="add_episode")
        done = np.zeros(T, bool)
        done[-1:] = terminated
        self._episode_starts.append(self._size)
        self._append(obs[:-1], actions, rewards, obs[1:], done)

    def _append(self, obs, action, reward, next_obs, terminated) -> None:
        n = len(reward)
        if self.capacity is not None and self._size + n > self.capacity:
            drop = self._size + n - self.capacity
            keep = max(self._size - drop, 0)
            for key in self._data:
                self._data[key][:keep] = self._data[key][self._size - keep:self._size]
            self._episode_starts = [s - drop for s in self._episode_starts if s - drop >= 0]
            self._size = keep
            obs, action, reward, next_obs, terminated = (
                a[-self.capacity:] for a in (obs, action, reward, next_obs, terminated))
            n = len(reward)
        needed = self._size + n
        if needed > len(self._data["reward"]):
            size = len(self._data["reward"])
            while size < needed:
                size *= 2
            if self.capacity is not None:
                size = min(size, self.capacity)
            grown = self._allocate(size)
            for key in grown:
                grown[key][: self._size] = self._data[key][: self._size]
            self._data = grown
        for key, value in zip(("obs", "action", "reward", "next_obs", "terminated"),
                              (obs, action, reward, next_obs, terminated)):
            self._data[key][self._size: self._size + n] = value
        self._size += n

    def truncate(self, transitions: int) -> None:
        """Keep only the first `transitions` transitions (and the episodes that start before)."""
        if not 0 <= transitions <= self._size:
            raise ForethoughtError(f"truncate: transitions must be in [0, {self._size}], got {transitions}")
        self._size = transitions
        self._episode_starts = [s for s in self._episode_starts if s < transitions]

    def all(self) -> Transitions:
        """Every transition, oldest first (views, do not modify)."""
        return Transitions(**{k: v[: self._size] for k, v in self._data.items()})

    def sample(self, rng: np.random.Generator, batch_size: int) -> Transitions:
        if self._size == 0:
            raise ForethoughtError("cannot sample from an empty replay buffer")
        index = rng.integers(0, self._size, batch_size)
        return Transitions(**{k: v[index] for k, v in self._data.items()})

    def episodes(self) -> list[Transitions]:
        """The stored episodes in order (the first may be partial if `capacity` dropped data)."""
        bounds = [*self._episode_starts, self._size]
        if bounds[0] != 0:
            bounds.insert(0, 0)
        return [Transitions(**{k: v[a:b] for k, v in self._data.items()})
                for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def save(self, path: Path) -> None:
        import io

        from forethought._io import atomic_write_bytes

        buffer = io.BytesIO()
        np.savez(buffer, **{k: v[: self._size] for k, v in self._data.items()},
                 episode_starts=np.asarray(self._episode_starts, np.int64),
                 dims=np.asarray([self.obs_dim, self.action_dim, self.capacity or 0], np.int64))
        atomic_write_bytes(Path(path), buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> "ReplayBuffer":
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            obs_dim, action_dim, capacity = (int(v) for v in arrays.pop("dims"))
            starts = arrays.pop("episode_starts").tolist()
        except FileNotFoundError:
            raise ForethoughtError(f"replay buffer {path} does not exist") from None
        except (OSError, ValueError, KeyError, EOFError) as error:
            raise ForethoughtError(f"replay buffer {path} is corrupt ({type(error).__name__}: {error})") from None
        buffer = cls(obs_dim, action_dim, capacity or None)
        buffer._append(arrays["obs"], arrays["action"], arrays["reward"], arrays["next_obs"], arrays["terminated"])
        buffer._episode_starts = starts
        return buffer
