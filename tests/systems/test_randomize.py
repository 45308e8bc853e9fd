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


@pytest.mark.parametrize("ranges,message", [
    ({"mas": (0.5, 2.0)}, "unknown parameter 'mas'"),
    ({"mass": (2.0, 0.5)}, "low <= high"),
    ({"mass": (0.5,)}, "pair"),
    ({}, "non-empty"),
])
def test_bad_ranges_are_rejected(ranges, message):
    with pytest.raises(ForethoughtError, match=message):
        check_ranges(ranges, systems.make("pendulum").params())


def test_other_envs_need_a_hook():
    with pytest.raises(ForethoughtError, match="set_params"):
        DomainRandomization(gymnasium.make("Pendulum-v1"), {"g": (5.0, 15.0)})
