"""Problems shared by the control tests.

A small system with everything the solvers must get right: state-control cross terms, dynamics
nonlinear in u (so the DDP term f_uu is not zero), a time-dependent cost and a separate final
cost. States are 3-dimensional, actions 2-dimensional.
"""

import jax.numpy as jnp


def toy_dynamics(x, u, t):
    return x + 0.1 * jnp.stack([jnp.sin(x[1]) * u[0] + x[2],
                                jnp.cos(x[0]) * u[0] * u[1],
                                x[0] * x[1] + u[1] ** 2 + 0.1 * t])


def toy_cost(x, u, t):
    return ((1.0 + 0.1 * t) * (0.5 * x @ x + 0.01 * jnp.sum(x**4)) + 0.1 * u @ u
            + 0.05 * x[0] * u[1] + 0.1 * jnp.sin(x[2]) * u[0])


def toy_final(x):
    return 0.5 * x @ x + jnp.sum(jnp.sin(x))
