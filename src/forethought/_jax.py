"""JAX set-up shared by the CLI and the tests."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path | None:
    """The persistent compilation cache: `$FORETHOUGHT_CACHE`, else `~/.cache/forethought/jax`;
    None when `FORETHOUGHT_CACHE=off`."""
    if os.environ.get("FORETHOUGHT_CACHE") == "off":
        return None
    root = os.environ.get("FORETHOUGHT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "forethought")
    return Path(root) / "jax"


def enable_compilation_cache() -> None:
    """Turn on JAX's persistent compilation cache so a second run skips most compiling."""
    import jax

    path = cache_dir()
    if path is None:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # a read-only home: run without the cache rather than fail
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
