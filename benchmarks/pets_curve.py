"""PETS learning curves on mbrl-lib's continuous cart-pole (`cartpole-balance`), ours vs mbrl-lib.

    forethought bench pets_curve [--seeds 0,1,2] [--episodes 10]

Runs `forethought run pets --env cartpole-balance` with the default settings for each seed (in
this process, one after another) and records return, env steps and wall seconds per episode.
mbrl-lib's curve is its seed-0 run with its PETS cart-pole settings as measured on this machine
and recorded in `shared/peers/mbrl-lib.md` (returns 12, 26, 13, 19, 13, 19, 52, 85, 200, 200;
4.1 s per action on one core). Re-running it takes about 30 minutes per seed, so it is not
repeated here; its wall-clock axis is that per-action time times the steps it planned (its
first episode is random), which is how its "about 31 minutes to reach 200" was measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

MBRL_RETURNS = [12, 26, 13, 19, 13, 19, 52, 85, 200, 200]
MBRL_SECONDS_PER_ACTION = 4.1


def main(out_dir: Path, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="forethought bench pets_curve")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--episodes", type=int, default=10)
    args = parser.parse_args(argv)

    import jax

    from forethought._jax import enable_compilation_cache
    from forethought.agents import mpc
    from forethought.agents.base import MemoryRun
    from forethought.systems.gym import make_env

    enable_compilation_cache()
    config = mpc.PETSConfig(episodes=args.episodes)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        run = MemoryRun()
        start = time.perf_counter()
        mpc.train(config, make_env("cartpole-balance"), jax.random.key(seed), run)
        runs.append({"seed": seed, "total_seconds": round(time.perf_counter() - start, 1),
                     "returns": [r["return"] for r in run.rows],
                     "env_steps": [r["env_steps"] for r in run.rows],
                     "wall_seconds": [r["wall_seconds"] for r in run.rows]})
        print(f"seed {seed}: returns {runs[-1]['returns']}", flush=True)

    mbrl_steps = np.cumsum(MBRL_RETURNS)  # an episode lasts as many steps as its return
    mbrl_planned = np.maximum(mbrl_steps - MBRL_RETURNS[0], 0)
    mbrl = {"returns": MBRL_RETURNS, "env_steps": mbrl_steps.tolist(),
            "wall_seconds_estimated": (mbrl_planned * MBRL_SECONDS_PER_ACTION).round(1).tolist(),
            "source": "shared/peers/mbrl-lib.md (seed 0, measured on this machine)"}

    def first_max(run):
        hits = [i for i, r in enumerate(run["returns"]) if r >= 200]
        return None if not hits else {"episode": hits[0] + 1, "env_steps": run["env_steps"][hits[0]],
                                      "wall_seconds": run["wall_seconds"][hits[0]]}

    summary = {
        "task": "cartpole-balance (mbrl-lib's continuous cart-pole), 200 steps, reward 1 per step",
        "ours": {"config": {k: v for k, v in vars(config).items()}, "runs": runs,
                 "first_200": [first_max(r) for r in runs]},
        "mbrl_lib": {**mbrl, "first_200": {"episode": 9, "env_steps": int(mbrl_steps[8]),
                                           "wall_seconds_estimated": mbrl["wall_seconds_estimated"][8]}},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "jax": jax.__version__, "note": "2 cores shared with other jobs; ours not pinned"},
    }
    (out_dir / "pets_curve.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(summary, out_dir / "pets_curve.png")
    print(json.dumps({"ours_first_200": summary["ours"]["first_200"],
                      "mbrl_first_200": summary["mbrl_lib"]["first_200"]}, indent=2))
    return 0


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for run in summary["ours"]["runs"]:
        episodes = range(1, len(run["returns"]) + 1)
        left.plot(episodes, run["returns"], marker="o", ms=3, color="C0", alpha=0.8,
                  label="forethought PETS" if run is summary["ours"]["runs"][0] else None)
        right.plot(np.asarray(run["wall_seconds"]) / 60, run["returns"], marker="o", ms=3, color="C0", alpha=0.8,
                   label="forethought PETS (measured)" if run is summary["ours"]["runs"][0] else None)
    m = summary["mbrl_lib"]
    left.plot(range(1, len(m["returns"]) + 1), m["returns"], marker="s", ms=3, color="C1", label="mbrl-lib PETS (seed 0)")
    right.plot(np.asarray(m["wall_seconds_estimated"]) / 60, m["returns"], marker="s", ms=3, color="C1",
               label="mbrl-lib PETS (4.1 s per action)")
    left.set_xlabel("episode")
    right.set_xlabel("wall minutes (log)")
    right.set_xscale("symlog", linthresh=0.5)
    for ax in (left, right):
        ax.set_ylabel("return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center right")
    fig.suptitle("PETS on mbrl-lib's continuous cart-pole (max return 200)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
