"""Synthetic data shared by the model tests."""

import numpy as np


def noisy_sine(n, seed, noise=0.1, low=-3.0, high=3.0):
    """Transitions of `x' = x + sin(x) + 0.5 u + noise`: `(x [n, 1], u [n, 1], x' [n, 1])`."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(low, high, (n, 1)).astype(np.float32)
    u = rng.uniform(-1, 1, (n, 1)).astype(np.float32)
    next_x = x + np.sin(x) + 0.5 * u + noise * rng.normal(size=(n, 1)).astype(np.float32)
    return x, u, next_x
