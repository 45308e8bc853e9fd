"""Guided policy search: local and global costs per iteration, on training and on new starts.

    forethought bench gps [--seeds 0-2] [--episodes 12] [--out DIR]

Two tasks, each with `forethought.agents.gps` defaults otherwise:

- the pendulum (4 training starts at the corners of +-0.6 rad x +-1.5 rad/s about hanging, 4 test
  starts at the edges' midpoints), `--seeds` seeds;
- the double integrator with a force bound it never meets (a linear-quadratic problem, so iLQR's
  costs are LQR's optimum), starts at 1 +- 0.5 m x +-0.5 m/s, seed 0: where the best global policy is
  known to be (nearly) linear, the check that the machinery is right.

Writes `gps.json` (every iteration's costs; final global costs per start against iLQR's with the
true model) and `gps.png` (local, global-train, global-test cost against iteration, iLQR dotted).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

COLUMNS = ("local_cost", "global_train_cost", "global_test_cost", "ilqr_train_cost", "ilqr_test_cost")


def main(out_dir: Path, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="forethought bench gps")
    parser.add_argument("--seeds", default="0-2", help="pendulum seeds (default 0-2)")
    parser.add_argument("--episodes", type=int, default=12)
    args = parser.parse_args(argv)

    import jax

    from _common import machine_info, seed_list
    from forethought import systems
    from forethought._jax import enable_compilation_cache
    from forethought.agents import gps
    from forethought.agents.base import MemoryRun
    from forethought.systems import make_env
    from forethought.systems.gym import SystemEnv

    enable_compilation_cache()
    tasks = [("pendulum", seed, lambda: make_env("pendulum"), {}) for seed in seed_list(args.seeds)]
    linear = systems.make("double-integrator", start_position=1.0, max_action=100.0, horizon=30)
    tasks.append(("double-integrator", 0, lambda: SystemEnv(linear),
                  dict(spread=(0.5, 0.5), hidden=32, policy_steps=500, kl_step=1.0)))
    runs = []
    for name, seed, env, overrides in tasks:
        config = gps.Config(episodes=args.episodes, **overrides)
        run = MemoryRun()
        started = time.perf_counter()
        result = gps.train(config, env(), jax.random.key(seed), run)
        seconds = time.perf_counter() - started
        # ends near upright: the pendulum's goal test (other systems have none)
        at_goal = result.test_at_goal if name == "pendulum" else None
        runs.append({"env": name, "seed": seed, "overrides": {k: list(v) if isinstance(v, tuple) else v
                                                              for k, v in overrides.items()},
                     "rows": [{k: row[k] for k in ("episode", "env_steps", *COLUMNS, "kl", "lam", "policy_loss")}
                              | ({"test_at_goal": row["test_at_goal"]} if name == "pendulum" else {})
                              for row in run.rows],
                     "train_costs": result.train_costs, "test_costs": result.test_costs,
                     "ilqr_train": result.reference_train, "ilqr_test": result.reference_test,
                     "test_at_goal": at_goal,
                     "test_ratio": float(np.mean(result.test_costs) / np.mean(result.reference_test)),
                     "train_ratio": float(np.mean(result.train_costs) / np.mean(result.reference_train)),
                     "seconds": seconds})
        print(f"{name} seed {seed}: global/iLQR {runs[-1]['train_ratio']:.3f} on training starts, "
              f"{runs[-1]['test_ratio']:.3f} on test starts"
              + (f", {at_goal}/4 test starts end upright" if at_goal is not None else "")
              + f" ({seconds:.0f} s)", flush=True)
    record = {"machine": machine_info(None), "settings": {"seeds": seed_list(args.seeds), "episodes": args.episodes},
              "runs": runs}
    (out_dir / "gps.json").write_text(json.dumps(record, indent=1))
    _plot(record, out_dir / "gps.png")
    return 0


def _plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(r["env"] for r in record["runs"]))
    fig, axes = plt.subplots(1, len(envs), figsize=(5.4 * len(envs), 3.9), squeeze=False)
    styles = {"local_cost": ("C0", "-", "local controllers, training starts"),
              "global_train_cost": ("C1", "-", "global policy, training starts"),
              "global_test_cost": ("C2", "-", "global policy, new starts"),
              "ilqr_train_cost": ("C1", ":", "iLQR with the true model, training starts"),
              "ilqr_test_cost": ("C2", ":", "iLQR with the true model, new starts")}
    for ax, env_name in zip(axes[0], envs):
        group = [r for r in record["runs"] if r["env"] == env_name]
        for column, (colour, style, label) in styles.items():
            curves = np.array([[row[column] for row in r["rows"]] for r in group])
            it = np.arange(1, curves.shape[1] + 1)
            ax.plot(it, np.median(curves, 0), color=colour, ls=style, lw=1.7, label=label)
            if len(group) > 1 and style == "-":
                ax.fill_between(it, curves.min(0), curves.max(0), color=colour, alpha=0.12)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("cost, mean over 4 starts")
        seeds = f"median and range of {len(group)} seeds" if len(group) > 1 else "one seed"
        ax.set_title(f"GPS on {env_name} ({seeds})", fontsize=10)
        ax.legend(frameon=False, fontsize=7)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
