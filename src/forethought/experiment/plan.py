"""`forethought plan METHOD --system NAME`: solve a system's own problem once and show it.

Open-loop trajectory optimisation over the system's default horizon from its mean initial
state, with the system's `cost` and `terminal_cost`. Writes to the output folder:

    solution.npz     x [T+1, n], u [T, m], per-iteration objective (and K, k where the method has them)
    summary.json     method, system, objective, iterations, converged, seconds (solve and compile)
    trajectory.png   states and actions against time
    cost.png         objective per iteration
    system.gif       the system following the plan
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from forethought._io import atomic_write_text
from forethought.errors import ForethoughtError
from forethought.systems.base import System

# method -> (module, function, knobs for a whole-horizon open-loop solve)
METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ilqr": ("forethought.control.ilqr", "ilqr", {"maxiter": 200}),
    "ddp": ("forethought.control.ilqr", "ddp", {"maxiter": 200}),
    "collocation": ("forethought.control.collocation", "collocation", {}),
    "cem": ("forethought.control.shooting", "cem", {"population": 500, "iterations": 50, "noise_beta": 2.0}),
    "mppi": ("forethought.control.shooting", "mppi", {"population": 500, "iterations": 50, "lambda_": 1.0,
                                                       "noise_beta": 2.0}),
    "random": ("forethought.control.shooting", "random_shooting", {"population": 5000}),
}
SAMPLING = {"cem", "mppi", "random"}


def solver(method: str) -> Callable:
    import importlib

    if method not in METHODS:
        raise ForethoughtError(f"unknown planning method {method!r}; expected one of: {', '.join(METHODS)}")
    module, name, _ = METHODS[method]
    return getattr(importlib.import_module(module), name)


def solve(method: str, system: System, *, seed: int = 0, horizon: int | None = None):
    """Solve `system`'s problem with `method`; returns `(solution, seconds, compile_seconds)`."""
    if not isinstance(system, System):
        raise ForethoughtError(f"plan needs a continuous system, got {type(system).__name__} "
                               "(mazes are planned with MCTS: forethought.control.mcts)")
    T = horizon or system.horizon
    if T < 1:
        raise ForethoughtError(f"--horizon must be >= 1, got {T}")
    fn, knobs = solver(method), dict(METHODS[method][2])
    x0 = system.initial_state()
    U0 = jnp.zeros((T, system.action_dim), x0.dtype)
    args: tuple = (system.cost, system.dynamics, x0, U0)
    if method in SAMPLING:
        args += (jax.random.key(seed),)
        knobs.update(lower=system.action_low, upper=system.action_high)

    def run():
        solution = fn(*args, terminal_cost=system.terminal_cost, **knobs)
        jax.block_until_ready(solution.u)
        return solution

    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    start = time.perf_counter()
    solution = run()
    seconds = time.perf_counter() - start
    return solution, seconds, max(first - seconds, 0.0)


def record(method: str, system: System, out: Path, *, seed: int = 0, horizon: int | None = None) -> dict:
    """Solve and write the folder described in the module docstring; returns the summary."""
    solution, seconds, compile_seconds = solve(method, system, seed=seed, horizon=horizon)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v) for k, v in dataclasses.asdict(solution).items() if v is not None}
    np.savez(out / "solution.npz", **arrays)
    summary = {"method": method, "system": system.name, "horizon": int(solution.u.shape[0]),
               "objective": float(solution.cost), "iterations": int(solution.iterations),
               "converged": bool(solution.converged), "solve_seconds": round(seconds, 6),
               "compile_seconds": round(compile_seconds, 3), "seed": seed}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    from forethought.experiment.plot import cost_history, trajectory
    from forethought.experiment.video import save_gif

    trajectory(system, np.asarray(solution.x), np.asarray(solution.u), out / "trajectory.png",
               title=f"{method} on {system.name}: objective {float(solution.cost):.4g}")
    if solution.history is not None:
        history = np.asarray(solution.history)[: max(int(solution.iterations), 1)]
        cost_history(history, out / "cost.png", title=f"{method} on {system.name}")
    frames = [system.render(x, 192) for x in np.asarray(solution.x)]
    fps = min(max(int(round(1.0 / float(system.dt))), 10), 50)
    save_gif(frames, out / "system.gif", fps=fps)
    return summary
