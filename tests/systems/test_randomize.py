import gymnasium
import jax
import numpy as np
import pytest

from forethought import systems
from forethought.errors import ForethoughtError
from forethought.systems.gym import make_env
from forethought.systems.randomize import DomainRandomization, check_ranges, sample

RANGES = {"mass": (0.5, 2.0), "length": (0.8, 1.2)}


def test_vmapped_samples_respect_the_ranges_and_vary():
    pendulum = systems.make("pendulum")
    batch = jax.vmap(lambda k: sample(pendulum, RANGES, k))(jax.random.split(jax.random.key(0), 200))
    for name, (low, high) in RANGES.items():
        values = np.asarray(getattr(batch, name))
        assert values.shape == (200,)
        assert values.min() >= low and values.max() <= high
        assert values.std() > 0.1 * (high - low)
    np.testing.assert_allclose(batch.gravity, pendulum.gravity)  # untouched parameters keep their value


def test_randomized_systems_step_with_their_own_parameters():
    pendulum = systems.make("pendulum", damping=0.0)
    batch = jax.vmap(lambda k: sample(pendulum, {"gravity": (1.0, 20.0)}, k))(
        jax.random.split(jax.random.key(1), 4))
    x, u = jax.numpy.array([1.0, 0.0]), jax.numpy.zeros(1)
    nxt = jax.vmap(lambda s: s.dynamics(x, u, 0))(batch)
    for i in range(4):
        single = systems.make("pendulum", damping=0.0, gravity=float(batch.gravity[i]))
        np.testing.assert_allclose(nxt[i], single.dynamics(x, u, 0), rtol=1e-5)


def test_wrapper_draws_new_parameters_each_reset_within_range():
    env = DomainRandomization(make_env("pendulum"), RANGES)
    draws = [env.reset(seed=s)[1]["params"] for s in range(30)]
    for name, (low, high) in RANGES.items():
        values = [d[name] for d in draws]
        assert min(values) >= low and max(values) <= high and len(set(values)) == 30
    assert env.unwrapped.system.mass == draws[-1]["mass"]
    again = DomainRandomization(make_env("pendulum"), RANGES)
    assert again.reset(seed=29)[1]["params"] == draws[-1]  # seeded draws repeat


def test_wrapper_uses_the_hook_for_other_gymnasium_envs():
    def set_params(env, params):
        env.g = params["g"]

    env = DomainRandomization(gymnasium.make("Pendulum-v1"), {"g": (5.0, 15.0)}, set_params=set_params)
    _, info = env.reset(seed=0)
    assert env.unwrapped.g == info["params"]["g"] and 5.0 <= env.unwrapped.g <= 15.0


def test_log_scale_draws_are_uniform_in_the_logarithm():
    """scale='log': log p uniform on [log low, log high], so as many draws below the geometric
    mean as above it, and the mean of log p is its midpoint (both ways of drawing)."""
    ranges = {"mass": (0.25, 4.0)}
    pendulum = systems.make("pendulum")
    batch = jax.vmap(lambda k: sample(pendulum, ranges, k, scale="log"))(jax.random.split(jax.random.key(2), 4000))
    env = DomainRandomization(make_env("pendulum"), ranges, scale="log")
    wrapped = np.array([env.reset(seed=s)[1]["params"]["mass"] for s in range(4000)])
    for values in (np.asarray(batch.mass), wrapped):
        assert values.min() >= 0.25 and values.max() <= 4.0
        logs = np.log(values)
        assert abs(logs.mean()) < 4 * np.log(16) / np.sqrt(12 * 4000)  # 4 standard errors of the midpoint 0
        assert abs(np.mean(values < 1.0) - 0.5) < 0.035
        # quartiles of a uniform log: 0.5, 1, 2
        np.testing.assert_allclose(np.quantile(values, [0.25, 0.5, 0.75]), [0.5, 1.0, 2.0], rtol=0.08)


@pytest.mark.parametrize("ranges,message", [
    ({"mas": (0.5, 2.0)}, "unknown parameter 'mas'"),
    ({"mass": (2.0, 0.5)}, "low <= high"),
    ({"mass": (0.5,)}, "pair"),
    ({}, "non-empty"),
])
def test_bad_ranges_are_rejected(ranges, message):
    with pytest.raises(ForethoughtError, match=message):
        check_ranges(ranges, systems.make("pendulum").params())


def test_log_scale_needs_positive_bounds_and_a_known_scale():
    with pytest.raises(ForethoughtError, match="positive for scale='log'"):
        check_ranges({"mass": (0.0, 2.0)}, scale="log")
    with pytest.raises(ForethoughtError, match="scale must be"):
        DomainRandomization(make_env("pendulum"), RANGES, scale="logarithmic")


def test_other_envs_need_a_hook():
    with pytest.raises(ForethoughtError, match="set_params"):
        DomainRandomization(gymnasium.make("Pendulum-v1"), {"g": (5.0, 15.0)})
