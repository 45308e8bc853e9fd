import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought import systems
from forethought.errors import ForethoughtError
from forethought.systems.cartpole import CartPole


def lagrangian_energy(cartpole, l_c, inertia, x):
    """Kinetic + potential energy from the positions of the cart and the pole's centre of mass."""
    M, m, g = cartpole.cart_mass, cartpole.pole_mass, cartpole.gravity

    def positions(q):
        cart, theta = q
        return jnp.stack([cart + l_c * jnp.sin(theta), -l_c * jnp.cos(theta)])

    q, q_dot = x[:2], x[2:]
    _, v_pole = jax.jvp(positions, (q,), (q_dot,))
    kinetic = 0.5 * M * q_dot[0] ** 2 + 0.5 * m * jnp.sum(v_pole**2) + 0.5 * inertia * q_dot[1] ** 2
    return kinetic + m * g * (positions(q)[1] + l_c)


@pytest.mark.parametrize("pole", ["rod", "point"])
def test_energy_is_conserved_without_force_or_friction(pole):
    cartpole = systems.make("cartpole", friction=0.0, pole=pole, substeps=10)
    l = cartpole.pole_length
    l_c, inertia = (l / 2, cartpole.pole_mass * l**2 / 12) if pole == "rod" else (l, 0.0)
    x0 = jnp.array([0.2, 2.5, 0.5, -1.0])
    X = cartpole.rollout(x0, jnp.zeros((30, 1)))
    energy = jax.vmap(lambda x: lagrangian_energy(cartpole, l_c, inertia, x))(X)
    assert np.allclose(jax.vmap(cartpole.energy)(X), energy, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(energy - energy[0]))) < 1e-4 * float(energy[0])


def random_state_and_force(seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform([-1, -np.pi, -2, -5], [1, np.pi, 2, 5])
    return x, rng.uniform(-10, 10)


@pytest.mark.parametrize("seed", [0, 1])
def test_rod_accelerations_are_pilcos(seed):
    cartpole = systems.make("cartpole", cart_mass=0.7, pole_mass=0.3, friction=0.2)
    (_, th, xd, thd), f = random_state_and_force(seed)
    M, m, l, b, g = 0.7, 0.3, 0.5, 0.2, 9.82
    s, c = np.sin(th), np.cos(th)
    x_dd = ((2 * m * l * thd**2 * s + 3 * m * g * s * c + 4 * f - 4 * b * xd)
            / (4 * (M + m) - 3 * m * c**2))
    th_dd = ((-3 * m * l * thd**2 * s * c - 6 * (M + m) * g * s - 6 * (f - b * xd) * c)
             / (4 * l * (m + M) - 3 * m * l * c**2))
    x = jnp.asarray(random_state_and_force(seed)[0], jnp.float32)
    dx = cartpole.derivatives(x, jnp.array([f], jnp.float32))
    np.testing.assert_allclose(dx, [xd, thd, x_dd, th_dd], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_point_mass_accelerations_are_the_textbooks(seed):
    cartpole = systems.make("cartpole", pole="point", cart_mass=1.0, pole_mass=0.1, friction=0.3)
    (_, th, xd, thd), f = random_state_and_force(seed)
    M, m, l, b, g = 1.0, 0.1, 0.5, 0.3, 9.82
    s, c = np.sin(th), np.cos(th)
    push = f - b * xd + m * l * thd**2 * s
    x_dd = (push + m * g * s * c) / (M + m * s**2)
    th_dd = -((M + m) * g * s + c * push) / (l * (M + m * s**2))
    x = jnp.asarray(random_state_and_force(seed)[0], jnp.float32)
    dx = cartpole.derivatives(x, jnp.array([f], jnp.float32))
    np.testing.assert_allclose(dx, [xd, thd, x_dd, th_dd], rtol=1e-5, atol=1e-5)


def test_hanging_at_rest_stays_put():
    cartpole = systems.make("cartpole")
    X = cartpole.rollout(jnp.zeros(4), jnp.zeros((5, 1)))
    np.testing.assert_array_equal(X, 0.0)


def test_upright_is_an_unstable_equilibrium():
    cartpole = systems.make("cartpole")
    upright = jnp.array([0.0, np.pi, 0.0, 0.0])
    np.testing.assert_allclose(cartpole.derivatives(upright, jnp.zeros(1)), 0.0, atol=1e-5)
    jacobian = jax.jacfwd(cartpole.derivatives)(upright, jnp.zeros(1))
    assert np.max(np.linalg.eigvals(np.asarray(jacobian)).real) > 1.0
    # ...whereas hanging down no eigenvalue grows (friction only damps the cart).
    jacobian = jax.jacfwd(cartpole.derivatives)(jnp.zeros(4), jnp.zeros(1))
    assert np.max(np.linalg.eigvals(np.asarray(jacobian)).real) < 1e-6


def test_saturating_cost_measures_the_tip_distance():
    cartpole = systems.make("cartpole")
    upright = jnp.array([0.0, np.pi, 0.0, 0.0])
    assert float(cartpole.terminal_cost(upright)) == pytest.approx(0.0, abs=1e-6)
    # Hanging, the tip is 2 l = 1 m below its target: 1 - exp(-1 / (2 * 0.25^2)).
    assert float(cartpole.terminal_cost(jnp.zeros(4))) == pytest.approx(1 - np.exp(-8.0), rel=1e-6)
    # Shifting the cart by d with the pole upright moves the tip by d.
    shifted = float(cartpole.terminal_cost(jnp.array([0.25, np.pi, 0.0, 0.0])))
    assert shifted == pytest.approx(1 - np.exp(-0.5), rel=1e-5)
    with_force = float(cartpole.cost(upright, jnp.array([10.0])))
    assert with_force == pytest.approx(0.5 * 1e-4 * 100, rel=1e-4)


def test_quadratic_cost_is_the_control_benchmarks():
    cartpole = CartPole.control_benchmark()
    assert (cartpole.cart_mass, cartpole.pole_mass, cartpole.pole) == (1.0, 0.1, "point")
    assert (cartpole.dt, cartpole.horizon) == (0.05, 100)
    x, u = jnp.array([0.5, 3 * np.pi + 0.1, 1.0, -2.0]), jnp.array([3.0])
    e = np.array([0.5, 0.1, 1.0, -2.0])
    stage = 0.5 * (e @ np.diag([1, 1, 0.1, 0.1]) @ e + 0.01 * 9.0)
    assert float(cartpole.cost(x, u)) == pytest.approx(stage, rel=1e-5)
    terminal = 0.5 * e @ np.diag([100, 100, 10, 10]) @ e
    assert float(cartpole.terminal_cost(x)) == pytest.approx(terminal, rel=1e-5)


def test_start_and_bounds():
    cartpole = systems.make("cartpole")
    np.testing.assert_array_equal(cartpole.initial_state(), jnp.zeros(4))
    starts = jax.vmap(cartpole.initial_state)(jax.random.split(jax.random.key(0), 2000))
    assert float(jnp.std(starts)) == pytest.approx(0.1, rel=0.05)
    np.testing.assert_array_equal(cartpole.action_high, [10.0])
    np.testing.assert_array_equal(cartpole.action_low, [-10.0])
    assert cartpole.horizon == 40 and cartpole.angles == (1,)


def test_bad_settings_name_themselves():
    with pytest.raises(ForethoughtError, match="unknown pole 'stick'"):
        systems.make("cartpole", pole="stick")
    with pytest.raises(ForethoughtError, match="unknown cost_kind"):
        systems.make("cartpole", cost_kind="linear")
    with pytest.raises(ForethoughtError, match="pole_length must be > 0"):
        systems.make("cartpole", pole_length=0.0)
