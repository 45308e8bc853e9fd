"""Cart-pole balancing with a continuous force: mbrl-lib's continuous cart-pole.

Gymnasium's CartPole physics (Barto, Sutton & Anderson 1983; point-mass-free pole of half-length
`half_length`, explicit Euler with `tau = 0.02 s`) driven by a continuous action `a` in [-1, 1]
that pushes with `force = force_scale * a`. The episode ends when the cart leaves
`|x| <= 2.4` or the pole tilts past 12 degrees; until then every step earns reward 1 (cost -1),
for at most 200 steps: returns run from about 10 (random) to 200 (balanced). This is the task of
mbrl-lib's PETS example, rebuilt here so the two can be compared on equal terms.

State `[x, theta, x_dot, theta_dot]` (the order of `cartpole`), but here, as in Gymnasium,
`theta = 0` is upright.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from forethought.systems.base import System


class CartPoleBalance(System):
    name: ClassVar[str] = "cartpole-balance"
    state_dim: ClassVar[int] = 4
    action_dim: ClassVar[int] = 1
    state_names: ClassVar[tuple[str, ...]] = ("x", "theta", "x_dot", "theta_dot")
    action_names: ClassVar[tuple[str, ...]] = ("push",)
    angles: ClassVar[tuple[int, ...]] = (1,)
    terminates: ClassVar[bool] = True

    cart_mass: float = 1.0
    pole_mass: float = 0.1
    half_length: float = 0.5
    """Half the pole's length (m), Gymnasium's `length`."""
    gravity: float = 9.8
    force_scale: float = 10.0
    """Newtons per unit of action."""
    x_limit: float = 2.4
    theta_limit: float = 12 * 2 * np.pi / 360
    init_range: float = 0.05
    """Each state component starts uniform in [-init_range, init_range]."""
    dt: float = 0.02
    horizon: int = eqx.field(default=200, static=True)

    def __check_init__(self):
        self._check_positive("cart_mass", "pole_mass", "half_length", "force_scale", "dt")

    def _next_state(self, x, u, t):
        position, theta, velocity, omega = x[0], x[1], x[2], x[3]
        force = self.force_scale * u[0]
        total = self.cart_mass + self.pole_mass
        pole_ml = self.pole_mass * self.half_length
        sin, cos = jnp.sin(theta), jnp.cos(theta)
        temp = (force + pole_ml * omega**2 * sin) / total
        alpha = (self.gravity * sin - cos * temp) / (
            self.half_length * (4.0 / 3.0 - self.pole_mass * cos**2 / total))
        accel = temp - pole_ml * alpha * cos / total
        return jnp.stack([position + self.dt * velocity, theta + self.dt * omega,
                          velocity + self.dt * accel, omega + self.dt * alpha])

    def is_terminal(self, x):
        return (jnp.abs(x[0]) > self.x_limit) | (jnp.abs(x[1]) > self.theta_limit)

    def _cost(self, x, u, t):
        return -jnp.ones((), x.dtype)  # reward 1 for every step the episode lasts

    def _action_limit(self):
        return 1.0

    def initial_state(self, key=None):
        if key is None:
            return jnp.zeros(4)
        return jax.random.uniform(key, (4,), minval=-self.init_range, maxval=self.init_range)

    def render(self, x, size: int = 256) -> np.ndarray:
        from forethought.systems.cartpole import CartPole

        shown = CartPole(pole_length=2 * float(self.half_length))
        return shown.render(np.asarray([x[0], float(x[1]) + np.pi, x[2], x[3]]), size)
