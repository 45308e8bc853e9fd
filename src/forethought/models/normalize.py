"""Input and output normalisation with statistics from the buffer (seed 002, section 4.2, trick 4)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp


class Normalizer(eqx.Module):
    """`(x - mean) / std` per feature; `inverse` maps back. Refit as the buffer grows."""

    mean: jax.Array
    std: jax.Array

    @classmethod
    def identity(cls, dim: int, dtype=jnp.float32) -> "Normalizer":
        return cls(jnp.zeros(dim, dtype), jnp.ones(dim, dtype))

    @classmethod
    def fit(cls, data: jax.Array, min_std: float = 1e-6) -> "Normalizer":
        """Statistics of `data [N, d]`; features with (near) zero spread get std 1."""
        mean = jnp.mean(data, axis=0)
        std = jnp.std(data, axis=0)
        return cls(mean, jnp.where(std < min_std, 1.0, std))

    def __call__(self, x: jax.Array) -> jax.Array:
        return (x - self.mean) / self.std

    def inverse(self, z: jax.Array) -> jax.Array:
        return z * self.std + self.mean
