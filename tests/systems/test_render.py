import numpy as np
import pytest

from forethought import systems

# Two clearly different states of every continuous system.
STATES = {
    "pendulum": ([0.0, 0.0], [2.0, 0.0]),
    "cartpole": ([0.0, 0.0, 0.0, 0.0], [0.5, 2.0, 0.0, 0.0]),
    "cartpole-balance": ([0.0, 0.0, 0.0, 0.0], [0.5, 0.2, 0.0, 0.0]),
    "acrobot": ([0.0, 0.0, 0.0, 0.0], [1.0, 0.8, 0.0, 0.0]),
    "double-integrator": ([0.0, 0.0], [1.0, 0.0]),
    "linear": ([1.0, 1.0, 1.0, 1.0], [-1.0, 0.5, 2.0, 0.0]),
    "mountain-car": ([-0.5, 0.0], [0.3, 0.0]),
}


@pytest.mark.parametrize("name", sorted(STATES))
@pytest.mark.parametrize("size", [32, 64])
def test_render_draws_the_state(name, size):
    system = systems.make(name)
    first, second = (np.asarray(x, np.float32) for x in STATES[name])
    image = system.render(first, size=size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 2  # not blank
    assert np.abs(image.astype(int) - system.render(second, size=size)).sum() > 0


def is_continuous(name):
    try:
        factory = systems.get_class(name)
    except ImportError:  # a module still being written is not ours to test here
        return False
    return isinstance(factory, type) and issubclass(factory, systems.System)


def test_every_continuous_system_is_covered():
    assert {name for name in systems.names() if is_continuous(name)} == set(STATES)


@pytest.mark.parametrize("name, far", [("cartpole", [10.0, 1.0, 0.0, 0.0]),
                                       ("double-integrator", [-10.0, 0.0])])
def test_a_cart_off_the_track_stays_in_view(name, far):
    system = systems.make(name)
    image = system.render(np.asarray(far, np.float32), size=64)
    assert image.shape == (64, 64, 3)
    assert np.any(image != system.render(np.zeros(len(far), np.float32), size=64))
