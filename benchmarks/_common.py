"""What the benchmarks share: the machine record, the peer process environment, medians.

Benchmarks import this as `_common` (the `forethought bench` command and a benchmark run as a
worker script both have `benchmarks/` on `sys.path`).
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path


def machine_info(core: int | None) -> dict:
    """The CPU, its bfloat16/AMX flags, the pinning, XLA flags and library versions."""
    import equinox
    import jax
    import jaxlib
    import numpy as np
    import optax

    import forethought

    cpu, flags = "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx512_bf16", "amx"))]
    except OSError:
        pass
    return {
        "platform": platform.platform(), "cpu": cpu, "cpu_bf16_flags": flags, "cpu_count": os.cpu_count(),
        "pinned_core": core, "affinity": sorted(os.sched_getaffinity(0)),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "threads_in_process": len(os.listdir("/proc/self/task")),
        "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "equinox": equinox.__version__, "optax": optax.__version__, "numpy": np.__version__,
        "forethought": forethought.__version__, "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def peer_env() -> dict:
    """The environment of a peer's process (another venv): ours, less what points Python at our
    packages, with one BLAS/OpenMP thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    return env


def median(values):
    return statistics.median(values) if values else None


class WorkerFailed(RuntimeError):
    """A benchmark worker process exited non-zero or wrote no result."""

    def __init__(self, side: str, code: int, command: list[str]):
        super().__init__(f"the {side} worker failed (exit {code}); command: {' '.join(command)}")
        self.code = code or 1


def ours_env(xla_flags: str) -> dict:
    """Our worker's environment: the CPU backend with `xla_flags` added before JAX starts."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_alternating(commands, processes: int, env: dict, tag: str, tmp: Path) -> dict[str, list[dict]]:
    """Run each side's worker `processes` times, alternating who goes first each round so
    drifting load hits both sides alike. `commands[side](round_) -> argv` (without `--result`),
    or None to skip that side. Returns each side's parsed JSON results; raises `WorkerFailed`."""
    import json
    import subprocess
    import sys

    sides = list(commands)
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for round_ in range(processes):
        for side in (sides if round_ % 2 == 0 else sides[::-1]):
            command = commands[side](round_)
            if command is None:
                continue
            result = Path(tmp) / f"{side}-{round_}.json"
            command = [*command, "--result", str(result)]
            print(f"[{tag}] process {round_ + 1}/{processes} {side}", file=sys.stderr, flush=True)
            code = subprocess.run(command, env=env if side == "ours" else peer_env(), stdout=sys.stderr).returncode
            if code != 0 or not result.is_file():
                raise WorkerFailed(side, code, command)
            runs[side].append(json.loads(result.read_text()))
    return runs


PINNED_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
"""XLA on one thread: what a process pinned to one core needs (its thread pools otherwise spin
against their neighbours': two unpinned JAX processes on 2 cores ran a GP fit 20-40x slower)."""


def run_pinned(tasks: list[tuple[list[str], Path]], jobs: int, prog: str) -> tuple[list[Path], list[Path]]:
    """Run each `(argv, part_dir)` as a subprocess pinned to a core of its own, `jobs` at a time,
    with XLA on one thread. Returns the part folders of the runs that exited 0 and of those that
    did not (their output goes to this process's)."""
    import subprocess
    import time

    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= jobs <= len(cores):
        raise UsageError(f"{prog}: --jobs must be between 1 and the {len(cores)} usable cores, got {jobs}")
    tasks, free, running, done, failed = list(tasks), list(cores[:jobs]), [], [], []
    while tasks or running:
        while tasks and free:
            (command, part), core = tasks.pop(0), free.pop(0)
            process = subprocess.Popen(["taskset", "-c", str(core), *command], env=ours_env(PINNED_XLA_FLAGS))
            running.append((process, core, part))
        time.sleep(2)
        for item in list(running):
            process, core, part = item
            if process.poll() is not None:
                running.remove(item)
                free.append(core)
                (done if process.returncode == 0 else failed).append(part)
    return done, failed


class UsageError(ValueError):
    """A bad benchmark flag; `main` prints it on one line and exits 2."""


def pick_core(requested: int | None) -> int:
    """The core to pin to: `requested`, else the highest this process may use."""
    allowed = sorted(os.sched_getaffinity(0))
    core = allowed[-1] if requested is None else requested
    if core not in allowed:
        raise UsageError(f"--core {core} is not one of the usable cores {allowed}")
    return core


def peer_path(flag: Path | None, variable: str) -> Path | None:
    """A peer's path from its flag, else from the environment variable `variable`, else None."""
    if flag is not None:
        return flag
    return Path(os.environ[variable]) if os.environ.get(variable) else None


def peer_python(flag: Path | None) -> Path | None:
    """The python of mbrl-lib's venv (`--mbrl-python` or `$MBRL_PYTHON`), checked to be executable."""
    python = peer_path(flag, "MBRL_PYTHON")
    if python is not None and not (python.is_file() and os.access(python, os.X_OK)):
        raise UsageError(f"--mbrl-python {python} is not an executable file")
    return python


def seed_list(text: str) -> list[int]:
    """`"0-4"` -> `[0, 1, 2, 3, 4]`; `"0,3"` -> `[0, 3]` (the benchmarks' `--seeds`)."""
    try:
        if "-" in text:
            lo, hi = text.split("-")
            return list(range(int(lo), int(hi) + 1))
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise UsageError(f"--seeds must look like 0-4 or 0,3; got {text!r}") from None
