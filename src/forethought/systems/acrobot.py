"""Acrobot swing-up: trajax's test problem, the "book" dynamics of Sutton & Barto (and Gymnasium).

Two links hang from a fixed pivot and only the elbow is actuated (torque `a`). With
`theta1 = 0` hanging down, `theta2` the elbow angle relative to the first link, lengths `l`,
centre-of-mass distances `lc`, masses `m` and moments of inertia `I` about the centres:

    d1   = m1 lc1^2 + m2 (l1^2 + lc2^2 + 2 l1 lc2 cos th2) + I1 + I2
    d2   = m2 (lc2^2 + l1 lc2 cos th2) + I2
    phi2 = m2 lc2 g cos(th1 + th2 - pi/2)
    phi1 = -m2 l1 lc2 th2'^2 sin th2 - 2 m2 l1 lc2 th2' th1' sin th2
           + (m1 lc1 + m2 l1) g cos(th1 - pi/2) + phi2
    th2'' = (a + d2/d1 phi1 - m2 l1 lc2 th1'^2 sin th2 - phi2) / (m2 lc2^2 + I2 - d2^2/d1)
    th1'' = -(d2 th2'' + phi1) / d1

The defaults are exactly trajax's `testAcrobotSolve`: Euler steps of 0.1 s, 50 steps, goal
`(pi, 0, 0, 0)`, stage cost `0.5 (0.1 |x - goal|^2 + 0.01 |u|^2)`, terminal cost
`0.5 * 1000 |x_T - goal|^2`. The angles are *not* wrapped in the cost (as in trajax), so only
`theta1 = +pi` counts as upright, not `-pi`. Zero torque from rest at the bottom costs 4959.476212
in total; trajax's iLQR brings that below 51.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from forethought.systems import draw
from forethought.systems.base import ContinuousSystem


class Acrobot(ContinuousSystem):
    name: ClassVar[str] = "acrobot"
    state_dim: ClassVar[int] = 4
    action_dim: ClassVar[int] = 1
    state_names: ClassVar[tuple[str, ...]] = ("theta1", "theta2", "theta1_dot", "theta2_dot")
    action_names: ClassVar[tuple[str, ...]] = ("elbow_torque",)
    angles: ClassVar[tuple[int, ...]] = (0, 1)

    link_mass_1: float = 1.0
    """m1 (kg)."""
    link_mass_2: float = 1.0
    """m2 (kg)."""
    link_length_1: float = 1.0
    """l1 (m), shoulder to elbow."""
    link_length_2: float = 1.0
    """l2 (m), elbow to tip; only drawn (the dynamics need lc2, not l2)."""
    link_com_1: float = 0.5
    """lc1 (m), shoulder to the first link's centre of mass."""
    link_com_2: float = 0.5
    """lc2 (m), elbow to the second link's centre of mass."""
    link_moi_1: float = 1.0
    """I1 (kg m^2), about the first link's centre of mass."""
    link_moi_2: float = 1.0
    """I2 (kg m^2), about the second link's centre of mass."""
    gravity: float = 9.8
    max_torque: float = 10.0
    """Action bound (N m) for environments and sampling planners; trajax's unconstrained
    problem has none, and its constrained variant uses 5."""
    init_std: float = 0.01
    """Standard deviation of the start around hanging at rest (the mean start is trajax's x0)."""
    dt: float = 0.1
    horizon: int = eqx.field(default=50, static=True)
    integrator: str = eqx.field(default="euler", static=True)
    substeps: int = eqx.field(default=1, static=True)
    state_weight: float = 0.1
    action_weight: float = 0.01
    terminal_weight: float = 1000.0

    def __check_init__(self):
        self._check_positive("link_mass_1", "link_mass_2", "link_length_1", "link_length_2",
                             "link_com_1", "link_com_2", "link_moi_1", "link_moi_2", "gravity",
                             "max_torque", "dt")

    def derivatives(self, x, u):
        m1, m2, l1 = self.link_mass_1, self.link_mass_2, self.link_length_1
        lc1, lc2, I1, I2, g = (self.link_com_1, self.link_com_2, self.link_moi_1, self.link_moi_2,
                               self.gravity)
        th1, th2, th1d, th2d = x[0], x[1], x[2], x[3]
        a = u[0]
        d1 = m1 * lc1**2 + m2 * (l1**2 + lc2**2 + 2 * l1 * lc2 * jnp.cos(th2)) + I1 + I2
        d2 = m2 * (lc2**2 + l1 * lc2 * jnp.cos(th2)) + I2
        phi2 = m2 * lc2 * g * jnp.cos(th1 + th2 - jnp.pi / 2)
        phi1 = (-m2 * l1 * lc2 * th2d**2 * jnp.sin(th2)
                - 2 * m2 * l1 * lc2 * th2d * th1d * jnp.sin(th2)
                + (m1 * lc1 + m2 * l1) * g * jnp.cos(th1 - jnp.pi / 2) + phi2)
        th2dd = ((a + d2 / d1 * phi1 - m2 * l1 * lc2 * th1d**2 * jnp.sin(th2) - phi2)
                 / (m2 * lc2**2 + I2 - d2**2 / d1))
        th1dd = -(d2 * th2dd + phi1) / d1
        return jnp.stack([th1d, th2d, th1dd, th2dd])

    @property
    def goal(self):
        """Both links upright at rest: `(pi, 0, 0, 0)`."""
        return jnp.array([jnp.pi, 0.0, 0.0, 0.0])

    def energy(self, x):
        """Kinetic plus potential energy (J), zero hanging at rest."""
        m1, m2, l1 = self.link_mass_1, self.link_mass_2, self.link_length_1
        lc1, lc2, I1, I2, g = (self.link_com_1, self.link_com_2, self.link_moi_1, self.link_moi_2,
                               self.gravity)
        th1, th2, th1d, th2d = x[0], x[1], x[2], x[3]
        # Velocity of the second link's centre of mass, squared.
        v2 = (l1**2 * th1d**2 + lc2**2 * (th1d + th2d) ** 2
              + 2 * l1 * lc2 * th1d * (th1d + th2d) * jnp.cos(th2))
        kinetic = 0.5 * (m1 * lc1**2 + I1) * th1d**2 + 0.5 * m2 * v2 + 0.5 * I2 * (th1d + th2d) ** 2
        height1 = -lc1 * jnp.cos(th1)
        height2 = -l1 * jnp.cos(th1) - lc2 * jnp.cos(th1 + th2)
        bottom = m1 * lc1 + m2 * (l1 + lc2)
        return kinetic + g * (m1 * height1 + m2 * height2 + bottom)

    def _cost(self, x, u, t):
        delta = x - self.goal.astype(x.dtype)
        state = 0.5 * self.state_weight * jnp.dot(delta, delta)
        return state + 0.5 * self.action_weight * jnp.dot(u, u)

    def _terminal_cost(self, x):
        delta = x - self.goal.astype(x.dtype)
        return 0.5 * self.terminal_weight * jnp.dot(delta, delta)

    def _action_limit(self):
        return self.max_torque

    def initial_state(self, key=None):
        return self._gaussian_start(jnp.zeros(4), self.init_std, key)

    def render(self, x, size: int = 256) -> np.ndarray:
        th1, th2 = float(x[0]), float(x[1])
        l1, l2 = float(self.link_length_1), float(self.link_length_2)
        reach = 1.15 * (l1 + l2)
        canvas = draw.Canvas(size, (-reach, reach, -reach, reach))
        elbow = (l1 * np.sin(th1), -l1 * np.cos(th1))
        tip = (elbow[0] + l2 * np.sin(th1 + th2), elbow[1] - l2 * np.cos(th1 + th2))
        width = 0.06 * (l1 + l2)
        canvas.line((-reach, l1 + l2), (reach, l1 + l2), 0.2 * width, draw.GREY)  # the goal height
        canvas.line((0.0, 0.0), elbow, width, draw.BLUE)
        canvas.line(elbow, tip, width, draw.GREEN)
        canvas.circle(elbow, 0.6 * width, draw.ACCENT)
        canvas.circle((0.0, 0.0), 0.6 * width, draw.INK)
        return canvas.to_uint8()
