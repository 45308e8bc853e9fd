"""Cart-pole swing-up with the physics of PILCO (Deisenroth & Rasmussen, 2011) and PETS.

A cart of mass M on a track pushed by a force f, with friction b on the cart, carries a pole of
mass m hinged at its centre. The pole's centre of mass sits at l_c from the pivot and its moment
of inertia about that centre is I; with J = m l_c^2 + I the Lagrangian gives

    [[M + m,           m l_c cos(theta)], [x'' ]   [f - b x' + m l_c theta'^2 sin(theta)]
     [m l_c cos(theta), J              ]] [theta''] = [-m g l_c sin(theta)                ]

`theta = 0` hangs down and `theta = pi` is upright; the state is `[x, theta, x', theta']`.
`pole="rod"` (a uniform rod: l_c = l/2, I = m l^2 / 12) reproduces PILCO's `dynamics_cp.m`,

    x'' = (2 m l theta'^2 sin + 3 m g sin cos + 4 f - 4 b x') / (4 (M + m) - 3 m cos^2),

and `pole="point"` (all the mass at the tip: l_c = l, I = 0) is the textbook cart-pole.

Two costs:

- `cost_kind="saturating"` (PILCO): `1 - exp(-d^2 / (2 w^2))` with `d` the distance of the pole
  tip from where it is upright with the cart at the origin, `(0, l)`, and `w = cost_width`, plus
  a tiny action term `0.5 saturating_action_weight u^2`; the terminal cost is the same state cost.
- `cost_kind="quadratic"` (the control benchmark): stage `0.5 (e' Q e + R u^2)`, terminal
  `0.5 e' Qf e`, with `e = (x, wrap(theta - pi), x', theta')`. `CartPole.control_benchmark()`
  builds that problem (cart 1 kg, point pole 0.1 kg, dt 0.05 s, 100 steps).
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from forethought.errors import check_choice
from forethought.systems import draw
from forethought.systems.base import ContinuousSystem, quadratic, wrap_angle

POLES = ("rod", "point")
COSTS = ("saturating", "quadratic")


class CartPole(ContinuousSystem):
    name: ClassVar[str] = "cartpole"
    state_dim: ClassVar[int] = 4
    action_dim: ClassVar[int] = 1
    state_names: ClassVar[tuple[str, ...]] = ("x", "theta", "x_dot", "theta_dot")
    action_names: ClassVar[tuple[str, ...]] = ("force",)
    angles: ClassVar[tuple[int, ...]] = (1,)

    cart_mass: float = 0.5
    """Cart mass M (kg)."""
    pole_mass: float = 0.5
    """Pole mass m (kg)."""
    pole_length: float = 0.5
    """Full pole length l (m), pivot to tip."""
    friction: float = 0.1
    """Viscous friction b on the cart (N s / m), as in (M + m) x'' + ... = f - b x'."""
    gravity: float = 9.82
    max_force: float = 10.0
    """Action bound (N): actions live in [-max_force, max_force]."""
    init_std: float = 0.1
    """Standard deviation of the start around hanging at rest at the origin."""
    dt: float = 0.1
    horizon: int = eqx.field(default=40, static=True)
    integrator: str = eqx.field(default="rk4", static=True)
    substeps: int = eqx.field(default=1, static=True)
    pole: str = eqx.field(default="rod", static=True)
    """"rod" (uniform rod, PILCO) or "point" (point mass at the tip)."""
    cost_kind: str = eqx.field(default="saturating", static=True)
    """"saturating" (PILCO) or "quadratic" (the control benchmark)."""
    cost_width: float = 0.25
    """Width w of the saturating cost (m)."""
    saturating_action_weight: float = 1e-4
    """Weight of the action term `0.5 weight u^2` of the saturating cost."""
    state_weights: tuple[float, float, float, float] = (1.0, 1.0, 0.1, 0.1)
    """Diagonal of Q in the quadratic cost."""
    terminal_weights: tuple[float, float, float, float] = (100.0, 100.0, 10.0, 10.0)
    """Diagonal of Qf in the quadratic cost."""
    action_weight: float = 0.01
    """R in the quadratic cost."""

    def __check_init__(self):
        self._check_positive("cart_mass", "pole_mass", "pole_length", "gravity", "max_force",
                             "dt", "cost_width")
        check_choice(self.pole, "pole", POLES)
        check_choice(self.cost_kind, "cost_kind", COSTS)

    @classmethod
    def control_benchmark(cls, **overrides) -> CartPole:
        """The quadratic-cost swing-up of the control benchmark: cart 1 kg, point pole 0.1 kg at
        0.5 m, g 9.81, no friction, RK4 dt 0.05, T 100 (the problem trajax was timed on)."""
        params = dict(cart_mass=1.0, pole_mass=0.1, pole="point", gravity=9.81, friction=0.0,
                      dt=0.05, horizon=100, cost_kind="quadratic")
        return cls(**{**params, **overrides})

    def _pole_geometry(self):
        """Centre-of-mass distance l_c from the pivot and moment of inertia J about the pivot."""
        m, l = self.pole_mass, self.pole_length
        if self.pole == "rod":
            l_c, inertia = l / 2, m * l**2 / 12
        else:
            l_c, inertia = l, 0.0
        return l_c, m * l_c**2 + inertia

    def derivatives(self, x, u):
        _, theta, x_dot, theta_dot = x[0], x[1], x[2], x[3]
        M, m, g = self.cart_mass, self.pole_mass, self.gravity
        l_c, J = self._pole_geometry()
        s, c = jnp.sin(theta), jnp.cos(theta)
        # The 2x2 mass matrix solved by Cramer's rule (cheaper and clearer than a linear solve).
        a, off = M + m, m * l_c * c
        rhs_x = u[0] - self.friction * x_dot + m * l_c * theta_dot**2 * s
        rhs_theta = -m * g * l_c * s
        det = a * J - off**2
        x_ddot = (J * rhs_x - off * rhs_theta) / det
        theta_ddot = (a * rhs_theta - off * rhs_x) / det
        return jnp.stack([x_dot, theta_dot, x_ddot, theta_ddot])

    def energy(self, x):
        """Kinetic plus potential energy (J), zero hanging at rest."""
        _, theta, x_dot, theta_dot = x[0], x[1], x[2], x[3]
        M, m = self.cart_mass, self.pole_mass
        l_c, J = self._pole_geometry()
        kinetic = (0.5 * (M + m) * x_dot**2 + m * l_c * jnp.cos(theta) * x_dot * theta_dot
                   + 0.5 * J * theta_dot**2)
        return kinetic + m * self.gravity * l_c * (1 - jnp.cos(theta))

    def tip(self, x):
        """Position `(horizontal, vertical)` of the pole tip, the pivot's height being 0."""
        return jnp.stack([x[0] + self.pole_length * jnp.sin(x[1]),
                          -self.pole_length * jnp.cos(x[1])])

    def error(self, x):
        """Deviation from upright at rest over the origin, angle wrapped to [-pi, pi)."""
        return jnp.stack([x[0], wrap_angle(x[1] - jnp.pi), x[2], x[3]])

    def _state_cost(self, x):
        target = jnp.stack([jnp.zeros_like(x[0]), jnp.full_like(x[0], self.pole_length)])
        d2 = jnp.sum((self.tip(x) - target) ** 2)
        return 1 - jnp.exp(-d2 / (2 * self.cost_width**2))

    def _cost(self, x, u, t):
        if self.cost_kind == "saturating":
            return self._state_cost(x) + 0.5 * self.saturating_action_weight * jnp.sum(u * u)
        action = 0.5 * self.action_weight * jnp.sum(u * u)
        return quadratic(self.error(x), self.state_weights) + action

    def _terminal_cost(self, x):
        if self.cost_kind == "saturating":
            return self._state_cost(x)
        return quadratic(self.error(x), self.terminal_weights)

    def _action_limit(self):
        return self.max_force

    def initial_state(self, key=None):
        return self._gaussian_start(jnp.zeros(4), self.init_std, key)

    def render(self, x, size: int = 256) -> np.ndarray:
        """The view spans x in [-h, h] m with h = max(2, 4 l); a cart beyond it is drawn at the
        track's end, marked orange, so the pole stays in view whatever the state."""
        position, theta = float(x[0]), float(x[1])
        l = float(self.pole_length)
        half = max(2.0, 4.0 * l)
        cart_w, cart_h = 0.5, 0.25
        canvas = draw.Canvas(size, (-half, half, -half, half))
        limit = half - cart_w / 2 - 0.05
        shown = float(np.clip(position, -limit, limit))
        canvas.line((-half, -cart_h / 2), (half, -cart_h / 2), 0.04, draw.GREY)
        if shown != position:
            canvas.circle((np.sign(position) * (half - 0.1), -cart_h / 2), 0.1, draw.ACCENT)
        canvas.rectangle((shown, 0.0), cart_w, cart_h, draw.INK)
        tip = (shown + l * np.sin(theta), -l * np.cos(theta))
        canvas.line((shown, 0.0), tip, 0.06, draw.BLUE)
        canvas.circle(tip, 0.06, draw.ACCENT)
        canvas.circle((shown, 0.0), 0.04, draw.GREY)
        return canvas.to_uint8()
