"""Discrete-time linear systems with quadratic costs: the problems LQR solves exactly.

    x_{t+1} = A x_t + B u_t,    cost 0.5 x'Q x + 0.5 u'R u,    terminal 0.5 x'Qf x

`LinearSystem` holds what both systems share; each offers `A: [n, n]`, `B: [n, m]`, `Q: [n, n]`,
`R: [m, m]` and `Qf: [n, n]` as attributes, so an LQR solver can read them directly. These are
discrete-time maps (no ODE): `dt` only says how long one step lasts.

- `DoubleIntegrator`: a unit mass pushed along a line, position and velocity, exactly discretized
  with a zero-order hold (`A = [[1, dt], [0, 1]]`, `B = [[dt^2 / 2], [dt]]`).
- `Linear`: a random system of any size drawn from an integer `seed`, with A scaled to spectral
  radius 0.9 (`stable=True`) or 1.1 (`stable=False`).
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from forethought.errors import ForethoughtError, check_array
from forethought.systems import draw
from forethought.systems.base import System


class LinearSystem(System):
    """`x_{t+1} = A x + B u` with cost `0.5 x'Qx + 0.5 u'Ru` and terminal `0.5 x'Qf x`.

    Subclasses provide `A`, `B`, `Q`, `R`, `Qf` (fields or properties), `max_action`,
    `init_std` and `initial_mean`.
    """

    def _next_state(self, x, u, t):
        return self.A @ x + self.B @ u

    def _cost(self, x, u, t):
        return 0.5 * x @ self.Q @ x + 0.5 * u @ self.R @ u

    def _terminal_cost(self, x):
        return 0.5 * x @ self.Qf @ x

    def _action_limit(self):
        return self.max_action

    def initial_state(self, key=None):
        return self._gaussian_start(self.initial_mean, self.init_std, key)

    def render(self, x, size: int = 256) -> np.ndarray:
        """One bar per state component, from zero; bars are clipped at |x_i| = 2."""
        x = np.asarray(x, np.float64)
        n = len(x)
        canvas = draw.Canvas(size, (-1.1, 1.1, -1.1, 1.1))
        canvas.line((-1.0, 0.0), (1.0, 0.0), 0.02, draw.GREY)
        pitch = 2.0 / n
        for i, value in enumerate(np.clip(x / 2.0, -1.0, 1.0)):
            centre = -1.0 + pitch * (i + 0.5)
            canvas.rectangle((centre, value / 2), 0.7 * pitch, abs(value), draw.BLUE)
        return canvas.to_uint8()


class DoubleIntegrator(LinearSystem):
    name: ClassVar[str] = "double-integrator"
    state_dim: ClassVar[int] = 2
    action_dim: ClassVar[int] = 1
    state_names: ClassVar[tuple[str, ...]] = ("position", "velocity")
    action_names: ClassVar[tuple[str, ...]] = ("force",)

    max_action: float = 1.0
    """Force bound (N on the unit mass): actions live in [-max_action, max_action]."""
    start_position: float = 1.0
    """Mean start position (m), at rest."""
    init_std: float = 0.0
    """Standard deviation of the start around `(start_position, 0)`."""
    dt: float = 0.1
    horizon: int = eqx.field(default=50, static=True)
    state_weights: tuple[float, float] = (1.0, 1.0)
    """Diagonal of Q."""
    action_weight: float = 1.0
    """R (with Q = I the LQR force from the start, 0.92, stays within the bound)."""
    terminal_weights: tuple[float, float] = (1.0, 1.0)
    """Diagonal of Qf."""

    def __check_init__(self):
        self._check_positive("max_action", "dt")

    @property
    def A(self):
        dt = jnp.asarray(self.dt, jnp.result_type(float))
        return jnp.array([[1.0, dt], [0.0, 1.0]])

    @property
    def B(self):
        dt = jnp.asarray(self.dt, jnp.result_type(float))
        return jnp.stack([dt**2 / 2, dt])[:, None]

    @property
    def Q(self):
        return jnp.diag(jnp.asarray(self.state_weights, jnp.result_type(float)))

    @property
    def R(self):
        return jnp.asarray(self.action_weight, jnp.result_type(float)).reshape(1, 1)

    @property
    def Qf(self):
        return jnp.diag(jnp.asarray(self.terminal_weights, jnp.result_type(float)))

    @property
    def initial_mean(self):
        return jnp.stack([jnp.asarray(self.start_position, jnp.result_type(float)), 0.0])

    def render(self, x, size: int = 256) -> np.ndarray:
        """A block on a track spanning [-2, 2] m, the origin marked; a block beyond the track is
        drawn at its end, marked orange."""
        position = float(x[0])
        half, block = 2.0, 0.3
        canvas = draw.Canvas(size, (-half, half, -half, half))
        canvas.line((-half, -block / 2), (half, -block / 2), 0.04, draw.GREY)
        canvas.line((0.0, -block / 2 - 0.15), (0.0, -block / 2 + 0.6), 0.03, draw.GREEN)
        limit = half - block / 2 - 0.05
        shown = float(np.clip(position, -limit, limit))
        if shown != position:
            canvas.circle((np.sign(position) * (half - 0.1), -block / 2), 0.1, draw.ACCENT)
        canvas.rectangle((shown, 0.0), block, block, draw.BLUE)
        return canvas.to_uint8()


STABLE_RADIUS = 0.9
UNSTABLE_RADIUS = 1.1


def random_matrices(state_dim: int, action_dim: int, seed: int, stable: bool):
    """`A: [n, n]` with spectral radius 0.9 (stable) or 1.1 (unstable) and `B: [n, m]`, Gaussian.

    Drawn with NumPy in float64 from `seed`, so a seed names the same system on every platform.
    """
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((state_dim, state_dim))
    B = rng.standard_normal((state_dim, action_dim)) / np.sqrt(state_dim)
    radius = STABLE_RADIUS if stable else UNSTABLE_RADIUS
    A *= radius / np.max(np.abs(np.linalg.eigvals(A)))
    return A, B


class Linear(LinearSystem):
    """A random linear system. Its size is per instance, so `state_dim` and `action_dim` are
    static fields here rather than class constants: `Linear(state_dim=6, action_dim=2, seed=3)`.

    `A`, `B`, `Q`, `R`, `Qf` are array fields (so a batch of systems can be `vmap`ped over):
    left as None, `A` and `B` are drawn from `seed` and `Q`, `R`, `Qf` are identities; given,
    they are used as they are and `seed` is ignored. `dataclasses.replace(system, seed=1)` keeps
    the arrays already drawn; build `Linear(seed=1, ...)` for a new draw.
    """

    name: ClassVar[str] = "linear"

    state_dim: int = eqx.field(default=4, static=True)
    """n, the number of state components."""
    action_dim: int = eqx.field(default=2, static=True)
    """m, the number of action components."""
    seed: int = eqx.field(default=0, static=True)
    """Which random system (A and B) to draw."""
    stable: bool = eqx.field(default=True, static=True)
    """Spectral radius of A 0.9 (True) or 1.1 (False)."""
    A: jax.Array | None = None
    B: jax.Array | None = None
    Q: jax.Array | None = None
    R: jax.Array | None = None
    Qf: jax.Array | None = None
    max_action: float = 10.0
    """Action bound, the same for every component."""
    init_std: float = 0.1
    """Standard deviation of the start around all ones."""
    dt: float = 1.0
    horizon: int = eqx.field(default=50, static=True)

    def __post_init__(self):
        # The sizes are checked here, not in `__check_init__`, because drawing A needs them.
        for name, value in (("state_dim", self.state_dim), ("action_dim", self.action_dim)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ForethoughtError(f"linear: {name} must be an integer >= 1, got {value!r}")
        dtype = jnp.result_type(float)
        if self.A is None or self.B is None:
            A, B = random_matrices(self.state_dim, self.action_dim, self.seed, self.stable)
            self.A = A if self.A is None else self.A
            self.B = B if self.B is None else self.B
        self.Q = np.eye(self.state_dim) if self.Q is None else self.Q
        self.R = np.eye(self.action_dim) if self.R is None else self.R
        self.Qf = self.Q if self.Qf is None else self.Qf
        for name in ("A", "B", "Q", "R", "Qf"):
            setattr(self, name, jnp.asarray(getattr(self, name), dtype))

    def __check_init__(self):
        n, m = self.state_dim, self.action_dim
        for name, shape in (("A", (n, n)), ("B", (n, m)), ("Q", (n, n)), ("R", (m, m)),
                            ("Qf", (n, n))):
            check_array(getattr(self, name), name, shape, where="linear")
        self._check_positive("max_action", "dt")

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(f"x{i}" for i in range(self.state_dim))

    @property
    def action_names(self) -> tuple[str, ...]:
        return tuple(f"u{i}" for i in range(self.action_dim))

    @property
    def initial_mean(self):
        return jnp.ones(self.state_dim)
