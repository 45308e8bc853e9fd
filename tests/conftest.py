import os
import tempfile

os.environ.setdefault("MPLBACKEND", "Agg")
# Each test process gets its own persistent compilation cache (shared with the CLI subprocesses and
# Ray workers it starts): a cache shared with other test workers, benchmarks and earlier versions
# once gave a segfault while reading an entry. FORETHOUGHT_CACHE set by the user is respected.
if "FORETHOUGHT_CACHE" not in os.environ:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    os.environ["FORETHOUGHT_CACHE"] = tempfile.mkdtemp(prefix=f"forethought-test-cache-{worker}-")

from forethought._jax import enable_compilation_cache  # noqa: E402

enable_compilation_cache()
