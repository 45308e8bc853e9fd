"""Mountain car with a continuous force: the physics of Gymnasium's MountainCarContinuous-v0.

A car in a valley with the hill `height = 0.45 sin(3 p) + 0.55` is too weak to drive up the
right slope directly and must first back up the left one. One step (a discrete-time map, dt = 1):

    v <- clip(v + power u - 0.0025 cos(3 p), -0.07, 0.07)
    p <- clip(p + v, -1.2, 0.6),   and v <- 0 if the car hit the left wall moving left

Gymnasium clips the force to [-1, 1] inside its step; here, as for every system, the dynamics
take the action as given (environments and sampling planners keep it within the bounds), so a
step with `|u| <= 1` is exactly Gymnasium's.

The task ends when `p >= 0.45` (`is_terminal`). The goal is absorbing: from there the state no
longer moves and costs nothing. Before it, each step costs `1 + 0.1 u^2`, so the total cost is the
number of steps taken to reach the goal plus Gymnasium's action penalty, which suits planners that
sum costs over a fixed horizon (Gymnasium's reward, +100 at the goal and -0.1 u^2 per step,
instead pays a planner nothing until one of its samples happens to reach the goal). The episode
lasts at most 200 steps here (Gymnasium allows 999); a good policy needs about 100.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from forethought.systems import draw
from forethought.systems.base import System


class MountainCar(System):
    name: ClassVar[str] = "mountain-car"
    state_dim: ClassVar[int] = 2
    action_dim: ClassVar[int] = 1
    state_names: ClassVar[tuple[str, ...]] = ("position", "velocity")
    action_names: ClassVar[tuple[str, ...]] = ("force",)
    terminates: ClassVar[bool] = True

    power: float = 0.0015
    """Velocity gained per step per unit of force."""
    gravity: float = 0.0025
    """The hill's pull, as in v <- v - gravity cos(3 p)."""
    max_speed: float = 0.07
    min_position: float = -1.2
    max_position: float = 0.6
    goal_position: float = 0.45
    max_action: float = 1.0
    """Force bound: actions live in [-max_action, max_action]."""
    init_low: float = -0.6
    init_high: float = -0.4
    """The start position is uniform in [init_low, init_high], at rest (as Gymnasium's)."""
    step_cost: float = 1.0
    """Cost of each step before the goal."""
    action_weight: float = 0.1
    """Weight of `u^2` in the stage cost (Gymnasium's action penalty)."""
    dt: float = 1.0
    horizon: int = eqx.field(default=200, static=True)

    def __check_init__(self):
        self._check_positive("power", "max_speed", "max_action", "dt")

    def is_terminal(self, x):
        """Whether the car is at or past the goal position."""
        return x[0] >= self.goal_position

    def _next_state(self, x, u, t):
        position, velocity = x[0], x[1]
        velocity = velocity + u[0] * self.power - self.gravity * jnp.cos(3 * position)
        velocity = jnp.clip(velocity, -self.max_speed, self.max_speed)
        position = jnp.clip(position + velocity, self.min_position, self.max_position)
        velocity = jnp.where((position <= self.min_position) & (velocity < 0), 0.0, velocity)
        x_next = jnp.stack([position, velocity]).astype(x.dtype)
        return jnp.where(self.is_terminal(x), x, x_next)

    def _cost(self, x, u, t):
        running = self.step_cost + self.action_weight * jnp.sum(u * u)
        return jnp.where(self.is_terminal(x), 0.0, running).astype(x.dtype)

    def _action_limit(self):
        return self.max_action

    def initial_state(self, key=None):
        dtype = jnp.result_type(float)
        if key is None:
            return jnp.array([(self.init_low + self.init_high) / 2, 0.0], dtype)
        position = jax.random.uniform(key, (), dtype, self.init_low, self.init_high)
        return jnp.stack([position, jnp.zeros((), dtype)])

    def height(self, position):
        """Height of the hill at `position` (NumPy, for drawing)."""
        return 0.45 * np.sin(3 * position) + 0.55

    def render(self, x, size: int = 256) -> np.ndarray:
        position = float(x[0])
        low, high = float(self.min_position), float(self.max_position)
        half = 0.55 * (high - low)
        centre_x, centre_y = (low + high) / 2, 0.55
        canvas = draw.Canvas(size, (centre_x - half, centre_x + half,
                                    centre_y - half, centre_y + half))
        xs = np.linspace(low, high, 40)
        canvas.polyline(list(zip(xs, self.height(xs))), 0.02, draw.INK)
        goal = float(self.goal_position)
        canvas.line((goal, self.height(goal)), (goal, self.height(goal) + 0.15), 0.015, draw.GREEN)
        slope = np.arctan(1.35 * np.cos(3 * position))
        normal = (-np.sin(slope), np.cos(slope))
        radius = 0.05
        car = (position + radius * normal[0], self.height(position) + radius * normal[1])
        canvas.circle(car, radius, draw.ACCENT)
        return canvas.to_uint8()
