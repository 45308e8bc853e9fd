"""Gaussian moment propagation: the closed forms PILCO chains through a rollout.

Seed 003, "Uncertainty propagation": the state at every step is approximated by a Gaussian whose
mean and covariance come in closed form. Every piece of a PILCO step (the sin/cos of an angle, a
policy, the saturation of the action, the GP) is a *block* `y = g(x)` that maps a Gaussian input
`x ~ N(m, S)` to

    M = E[y],    S_y = cov[y],    V = S^{-1} cov[x, y]   (computed without inverting S),

and `augment` appends `y` to a joint Gaussian over everything computed so far. For a block fed
with a slice `x_I` of a jointly Gaussian `z`, Stein's lemma gives the cross-covariance with all
of `z` from `V` alone, `cov[z, y] = cov[z, x_I] V` (`V = E[dg/dx]`, the average Jacobian), so the
joint stays consistent however many blocks are chained. The blocks here are exact:

- `linear_block`: `y = W x + b`; `M = W m + b`, `S_y = W S W^T`, `V = W^T`.
- `sin_block`: `y_i = sin(a_i^T x + phi_i)`, with `mu_i = a_i^T m + phi_i`, `s_ij = a_i^T S a_j`:

      E[y_i]     = exp(-s_ii / 2) sin(mu_i)
      E[y_i y_j] = 1/2 [exp(-(s_ii + s_jj - 2 s_ij) / 2) cos(mu_i - mu_j)
                        - exp(-(s_ii + s_jj + 2 s_ij) / 2) cos(mu_i + mu_j)]
      V[:, i]    = a_i exp(-s_ii / 2) cos(mu_i)

  which covers `cos x = sin(x + pi / 2)` (`trig_block`, an angle's (sin, cos) features) and the
  saturation `u_max (9 sin u + sin 3u) / 8` of PILCO's policies (`saturation_block`).

`expected_saturating_cost` is the closed-form expectation of PILCO's cost
`1 - exp(-1/2 (x - t)^T W (x - t))` under `x ~ N(m, S)`:

    E[c] = 1 - |I + S W|^{-1/2} exp(-1/2 (m - t)^T W (I + S W)^{-1} (m - t)).

(Deisenroth, Fox and Rasmussen, TPAMI 2015, sections 4 and 5; PILCO's `gTrig`, `gSat`, `lossSat`.)
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

Block = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]
"""`block(m [D], S [D, D]) -> (M [k], S_y [k, k], V [D, k])`, `V = S^{-1} cov[x, y]`."""


def symmetrize(S: jax.Array) -> jax.Array:
    return (S + S.T) / 2


def augment(m: jax.Array, S: jax.Array, index: Sequence[int] | jax.Array, block: Block
            ) -> tuple[jax.Array, jax.Array]:
    """Append `y = block(z[index])` to the joint Gaussian `z ~ N(m [K], S [K, K])`: returns the
    Gaussian over `[z, y]` (`K + k` dims) with `cov[z, y] = S[:, index] V`."""
    index = jnp.asarray(index)
    mi, Si = m[index], S[jnp.ix_(index, index)]
    M, Sy, V = block(mi, Si)
    cross = S[:, index] @ V
    m_out = jnp.concatenate([m, M])
    S_out = jnp.block([[S, cross], [cross.T, symmetrize(Sy)]])
    return m_out, S_out


def linear_block(W: jax.Array, b: jax.Array | None = None) -> Block:
    """`y = W x + b`, `W [k, D]`."""

    def block(m, S):
        M = W @ m if b is None else W @ m + b
        return M, W @ S @ W.T, W.T

    return block


def sin_moments(m: jax.Array, S: jax.Array, A: jax.Array, phase: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Moments of `y = sin(A x + phase)` for `x ~ N(m, S)`, `A [k, D]`, `phase [k]` (module
    docstring): `E[y] [k]`, `cov[y] [k, k]`, `V = S^{-1} cov[x, y] [D, k]`."""
    mu = A @ m + phase
    s = A @ S @ A.T
    d = jnp.diag(s)
    E = jnp.exp(-d / 2) * jnp.sin(mu)
    minus = jnp.exp(-(d[:, None] + d[None, :] - 2 * s) / 2) * jnp.cos(mu[:, None] - mu[None, :])
    plus = jnp.exp(-(d[:, None] + d[None, :] + 2 * s) / 2) * jnp.cos(mu[:, None] + mu[None, :])
    cov = (minus - plus) / 2 - jnp.outer(E, E)
    V = A.T * (jnp.exp(-d / 2) * jnp.cos(mu))[None, :]
    return E, symmetrize(cov), V


def trig_block(angles: Sequence[int], dim: int) -> Block:
    """`y = [sin x_a for a in angles] + [cos x_a for a in angles]` of `x [dim]` (the order of
    `models.ensemble.state_features`)."""
    k = len(angles)
    rows = jnp.zeros((k, dim)).at[jnp.arange(k), jnp.asarray(angles)].set(1.0)

    def block(m, S):
        A = jnp.concatenate([rows, rows]).astype(m.dtype)
        phase = jnp.concatenate([jnp.zeros(k), jnp.full(k, jnp.pi / 2)]).astype(m.dtype)
        return sin_moments(m, S, A, phase)

    return block


def saturate(u: jax.Array, u_max: jax.Array) -> jax.Array:
    """PILCO's smooth saturation `u_max (9 sin u + sin 3u) / 8`, in `[-u_max, u_max]`."""
    return u_max * (9 * jnp.sin(u) + jnp.sin(3 * u)) / 8


def saturation_block(u_max: jax.Array) -> Block:
    """The moments of `saturate` applied elementwise to `x [k]`."""

    def block(m, S):
        k = m.shape[0]
        eye = jnp.eye(k, dtype=m.dtype)
        E, C, V = sin_moments(m, S, jnp.concatenate([eye, 3 * eye]), jnp.zeros(2 * k, m.dtype))
        L = jnp.concatenate([9 * eye, eye], axis=1) * (jnp.asarray(u_max, m.dtype) / 8)[:, None]
        return L @ E, L @ C @ L.T, V @ L.T

    return block


def saturating_cost(x: jax.Array, W: jax.Array, target: jax.Array) -> jax.Array:
    """`1 - exp(-1/2 (x - t)^T W (x - t))` for `x [..., D]`."""
    e = x - target
    return 1 - jnp.exp(-0.5 * jnp.einsum("...i,ij,...j->...", e, W, e))


def expected_saturating_cost(m: jax.Array, S: jax.Array, W: jax.Array, target: jax.Array
                             ) -> jax.Array:
    """`E[saturating_cost(x)]` for `x ~ N(m, S)`, in closed form (module docstring). `W` may be
    singular (PILCO's cart-pole weights only the tip's position)."""
    eye = jnp.eye(m.shape[0], dtype=m.dtype)
    B = eye + W @ S  # (I + W S)^{-1} W = W (I + S W)^{-1}
    e = m - target
    _, logdet = jnp.linalg.slogdet(B)
    quad = e @ jnp.linalg.solve(B, W @ e)
    return 1 - jnp.exp(-0.5 * logdet - 0.5 * quad)
