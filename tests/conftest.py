import os

os.environ.setdefault("MPLBACKEND", "Agg")
# No persistent compilation cache in the tests (nor in the CLI subprocesses and Ray workers they
# start): after a few hundred tests in one xdist worker, JAX segfaulted while serialising an
# executable into the cache (three fresh-clone checks and CI, always the distill reproducibility
# test, never when that test runs alone), with a shared and with a per-process cache folder.
# FORETHOUGHT_CACHE set by the user is respected.
os.environ.setdefault("FORETHOUGHT_CACHE", "off")

from forethought._jax import enable_compilation_cache  # noqa: E402

enable_compilation_cache()
