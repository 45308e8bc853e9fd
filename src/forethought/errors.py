"""User-facing errors and the checks that raise them.

A `ForethoughtError` is a mistake in what the user passed (a shape, a name, a flag value), not a
bug in the library: the CLI prints its message on one line and exits with status 2. Every message
names the argument, what was expected and what was given.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ForethoughtError(ValueError):
    """Bad input from the user; the message says what was expected and what came."""


def check_array(value: Any, name: str, shape: tuple[int, ...], *, where: str = "") -> None:
    """Raise if `value` is not a floating array of `shape`.

    Works on traced JAX values (the shape and dtype are static), so a check inside a jitted
    function costs nothing at run time.
    """
    prefix = f"{where}: " if where else ""
    got_shape = tuple(np.shape(value))
    if got_shape != tuple(shape):
        raise ForethoughtError(f"{prefix}{name} must have shape {tuple(shape)}, got {got_shape}")
    dtype = np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype
    if not np.issubdtype(dtype, np.floating):
        raise ForethoughtError(f"{prefix}{name} must be a floating-point array, got dtype {dtype}")


def check_finite(value: Any, name: str, *, where: str = "") -> None:
    """Raise if a concrete (NumPy) array holds NaN or inf, saying how many and where the first is."""
    array = np.asarray(value)
    bad = ~np.isfinite(array)
    if bad.any():
        prefix = f"{where}: " if where else ""
        first = tuple(int(i) for i in np.argwhere(bad)[0]) if array.ndim else ()
        raise ForethoughtError(f"{prefix}{name} must be finite, got {int(bad.sum())} NaN or inf "
                               f"value(s), the first at index {first}")


def check_choice(value: str, name: str, choices: list[str] | tuple[str, ...]) -> None:
    if value not in choices:
        raise ForethoughtError(f"unknown {name} {value!r}; expected one of: {', '.join(choices)}")


def check_int(value: Any, name: str, *, minimum: int, where: str = "") -> None:
    """Raise unless `value` is an integer (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        prefix = f"{where}: " if where else ""
        raise ForethoughtError(f"{prefix}{name} must be an integer >= {minimum}, got {value!r}")
