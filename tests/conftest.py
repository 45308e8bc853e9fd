import gc
import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# No persistent compilation cache in the tests, nor in the CLI subprocesses and Ray workers they
# start: every test run compiles from scratch, the same on every machine. FORETHOUGHT_CACHE set by
# the user is respected.
os.environ.setdefault("FORETHOUGHT_CACHE", "off")

import jax  # noqa: E402

from forethought._jax import enable_compilation_cache  # noqa: E402

enable_compilation_cache()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop JAX's compiled executables after each test module. Each executable holds a dozen or so
    memory mappings of JIT-compiled code; one pytest-xdist worker that kept every test's reached
    Linux's default limit of 65530 mappings per process (`vm.max_map_count`) after a few hundred
    tests, and XLA then segfaulted while compiling or serialising the next program."""
    yield
    jax.clear_caches()
    gc.collect()
