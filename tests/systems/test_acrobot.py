import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought import systems


def test_zero_torque_objective_is_trajaxs():
    acrobot = systems.make("acrobot")
    assert (acrobot.integrator, acrobot.dt, acrobot.horizon) == ("euler", 0.1, 50)
    objective = acrobot.objective(jnp.zeros(4), jnp.zeros((acrobot.horizon, 1)))
    assert float(objective) == pytest.approx(4959.476212, rel=1e-4)


def lagrangian_energy(acrobot, x):
    """Kinetic + potential energy from the positions of the links' centres of mass."""
    l1, lc1, lc2 = acrobot.link_length_1, acrobot.link_com_1, acrobot.link_com_2
    m1, m2, I1, I2, g = (acrobot.link_mass_1, acrobot.link_mass_2, acrobot.link_moi_1,
                         acrobot.link_moi_2, acrobot.gravity)

    def centres(q):
        th1, th2 = q
        elbow = jnp.stack([l1 * jnp.sin(th1), -l1 * jnp.cos(th1)])
        return jnp.stack([jnp.stack([lc1 * jnp.sin(th1), -lc1 * jnp.cos(th1)]),
                          elbow + lc2 * jnp.stack([jnp.sin(th1 + th2), -jnp.cos(th1 + th2)])])

    q, q_dot = x[:2], x[2:]
    p, v = jax.jvp(centres, (q,), (q_dot,))
    kinetic = (0.5 * m1 * jnp.sum(v[0] ** 2) + 0.5 * m2 * jnp.sum(v[1] ** 2)
               + 0.5 * I1 * q_dot[0] ** 2 + 0.5 * I2 * (q_dot[0] + q_dot[1]) ** 2)
    return kinetic + g * (m1 * (p[0, 1] + lc1) + m2 * (p[1, 1] + l1 + lc2))


def test_energy_is_conserved_without_torque():
    acrobot = systems.make("acrobot", integrator="rk4", substeps=20)
    X = acrobot.rollout(jnp.array([1.0, 0.5, 0.0, 0.0]), jnp.zeros((20, 1)))
    assert float(jnp.max(jnp.abs(X[:, 2:]))) > 1.0  # it really swings
    energy = jax.vmap(lambda x: lagrangian_energy(acrobot, x))(X)
    np.testing.assert_allclose(jax.vmap(acrobot.energy)(X), energy, rtol=1e-5)
    assert float(jnp.max(jnp.abs(energy - energy[0]))) < 1e-4 * float(energy[0])


def test_torque_changes_energy_by_the_work_it_does():
    acrobot = systems.make("acrobot", integrator="rk4", substeps=20)
    x, torque = jnp.array([0.5, -0.3, 0.2, 1.0]), 2.0
    x_next = acrobot.dynamics(x, jnp.array([torque]))
    # Over a short step the elbow's angle changes by ~dtheta2 and the work is torque * that.
    work = torque * float(x_next[1] - x[1])
    gained = float(acrobot.energy(x_next) - acrobot.energy(x))
    assert gained == pytest.approx(work, rel=1e-3)


def test_hanging_at_rest_stays_put():
    acrobot = systems.make("acrobot")
    X = acrobot.rollout(jnp.zeros(4), jnp.zeros((5, 1)))
    # Not exactly: the book's cos(theta1 - pi/2) is -4e-8 at theta1 = 0 in float32.
    np.testing.assert_allclose(X, 0.0, atol=1e-6)


def test_cost_is_zero_at_the_goal_and_not_wrapped():
    acrobot = systems.make("acrobot")
    goal = jnp.array([np.pi, 0.0, 0.0, 0.0])
    assert float(acrobot.terminal_cost(goal)) == pytest.approx(0.0, abs=1e-6)
    assert float(acrobot.cost(goal, jnp.array([2.0]))) == pytest.approx(0.5 * 0.01 * 4.0, rel=1e-6)
    other_side = jnp.array([-np.pi, 0.0, 0.0, 0.0])
    expected = 0.5 * 1000 * (2 * np.pi) ** 2
    assert float(acrobot.terminal_cost(other_side)) == pytest.approx(expected, rel=1e-5)


def test_start_and_bounds():
    acrobot = systems.make("acrobot")
    np.testing.assert_array_equal(acrobot.initial_state(), jnp.zeros(4))
    sample = acrobot.initial_state(jax.random.key(1))
    assert 0 < float(jnp.max(jnp.abs(sample))) < 0.1
    np.testing.assert_array_equal(acrobot.action_high, [10.0])
    assert acrobot.angles == (0, 1)
