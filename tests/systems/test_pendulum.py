import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought import systems
from forethought.errors import ForethoughtError


def test_energy_is_conserved_without_torque_or_friction():
    pendulum = systems.make("pendulum", damping=0.0, dt=0.01)
    x0 = jnp.array([2.0, 0.5])
    X = pendulum.rollout(x0, jnp.zeros((500, 1)))
    energy = jax.vmap(pendulum.energy)(X)
    assert float(jnp.max(jnp.abs(energy - energy[0]))) < 1e-4 * float(energy[0])


def test_small_swings_have_the_linear_period():
    pendulum = systems.make("pendulum", damping=0.0, dt=0.001, length=2.0)
    steps = 4000
    X = pendulum.rollout(jnp.array([0.01, 0.0]), jnp.zeros((steps, 1)))
    theta = np.asarray(X[:, 0])
    crossings = np.where((theta[:-1] > 0) & (theta[1:] <= 0))[0]
    period = (crossings[1] - crossings[0]) * pendulum.dt
    assert period == pytest.approx(2 * np.pi * np.sqrt(2.0 / 9.81), rel=1e-3)


def test_torque_accelerates_as_the_equation_says():
    pendulum = systems.make("pendulum", mass=2.0, length=0.5)
    x, u = jnp.array([0.3, -0.2]), jnp.array([1.5])
    expected = -(9.81 / 0.5) * np.sin(0.3) - 0.1 * -0.2 + 1.5 / (2.0 * 0.25)
    assert float(pendulum.derivatives(x, u)[1]) == pytest.approx(expected, rel=1e-6)


def test_cost_is_zero_upright_at_rest_and_wraps_the_angle():
    pendulum = systems.make("pendulum")
    assert float(pendulum.cost(jnp.array([np.pi, 0.0]), jnp.zeros(1))) == pytest.approx(0.0, abs=1e-6)
    assert float(pendulum.cost(jnp.array([3 * np.pi, 0.0]), jnp.zeros(1))) == pytest.approx(0.0, abs=1e-5)
    hanging = float(pendulum.terminal_cost(jnp.zeros(2)))
    assert hanging == pytest.approx(0.5 * 100 * np.pi**2, rel=1e-5)


def test_shape_and_dtype_errors_name_the_argument():
    pendulum = systems.make("pendulum")
    with pytest.raises(ForethoughtError, match=r"pendulum.dynamics: x must have shape \(2,\), got \(3,\)"):
        pendulum.dynamics(jnp.zeros(3), jnp.zeros(1), 0)
    with pytest.raises(ForethoughtError, match="u must be a floating-point array, got dtype int32"):
        pendulum.dynamics(jnp.zeros(2), jnp.zeros(1, jnp.int32), 0)
    with pytest.raises(ForethoughtError, match=r"U must have shape \(T, 1\)"):
        pendulum.rollout(jnp.zeros(2), jnp.zeros(5))
    with pytest.raises(ForethoughtError, match="mass must be > 0"):
        systems.make("pendulum", mass=0.0)
    with pytest.raises(ForethoughtError, match="unknown system"):
        systems.make("pendulm")
