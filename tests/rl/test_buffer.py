import numpy as np
import pytest

from forethought.errors import ForethoughtError
from forethought.rl.buffer import ReplayBuffer


def episode(T, offset=0.0, n=2, m=1):
    obs = offset + np.arange((T + 1) * n, dtype=np.float32).reshape(T + 1, n)
    return obs, np.ones((T, m)), np.arange(T, dtype=np.float32)


def test_every_transition_is_kept_once_in_order_across_growth():
    buffer = ReplayBuffer(2, 1)
    for i in range(30):
        buffer.add_episode(*episode(100, offset=1000.0 * i))
    data = buffer.all()
    assert len(buffer) == 3000
    np.testing.assert_array_equal(data.next_obs[:99], data.obs[1:100])  # within an episode
    assert buffer.episode_starts == list(range(0, 3000, 100))
    assert [len(e) for e in buffer.episodes()] == [100] * 30
    assert len(np.unique(data.obs[:, 0])) == 3000


def test_capacity_drops_the_oldest():
    buffer = ReplayBuffer(2, 1, capacity=250)
    for i in range(4):
        buffer.add_episode(*episode(100, offset=1000.0 * i))
    data = buffer.all()
    assert len(buffer) == 250
    assert data.obs[0, 0] == 1000.0 * 1 + 2 * 50  # the first 150 transitions are gone
    assert data.obs[-1, 0] == 3000.0 + 2 * 99


def test_save_and_load_round_trip(tmp_path):
    buffer = ReplayBuffer(2, 1)
    buffer.add_episode(*episode(5), terminated=True)
    buffer.add_episode(*episode(3, 50.0))
    buffer.save(tmp_path / "b.npz")
    loaded = ReplayBuffer.load(tmp_path / "b.npz")
    for name in ("obs", "action", "reward", "next_obs", "terminated"):
        np.testing.assert_array_equal(getattr(loaded.all(), name), getattr(buffer.all(), name))
    assert loaded.episode_starts == [0, 5]
    assert loaded.all().terminated.tolist() == [False] * 4 + [True] + [False] * 3


def test_bad_input_is_refused():
    buffer = ReplayBuffer(2, 1)
    with pytest.raises(ForethoughtError, match="empty"):
        buffer.sample(np.random.default_rng(0), 4)
    obs, actions, rewards = episode(5)
    with pytest.raises(ForethoughtError, match=r"obs \[T\+1, 2\]"):
        buffer.add_episode(obs[:-1], actions, rewards)
    obs[2, 0] = np.nan
    with pytest.raises(ForethoughtError, match="NaN"):
        buffer.add_episode(obs, actions, rewards)
