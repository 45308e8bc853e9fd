import os

os.environ.setdefault("MPLBACKEND", "Agg")

from forethought._jax import enable_compilation_cache  # noqa: E402

enable_compilation_cache()
