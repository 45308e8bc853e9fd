"""Distillation: one student for the pendulum and the cart-pole swing-up, against its teachers.

    forethought bench distill [--seeds 0-2] [--episodes 8] [--no-bc] [--out DIR]

`forethought.agents.distill` with its defaults (tasks pendulum and cartpole, iLQR Gaussian teachers
with the true model, DAgger, temperature 1), `--seeds` seeds; and, unless `--no-bc`, the same with
`dagger=False` (behaviour cloning on the teachers' own rollouts), the comparison the notes' DAgger
argument predicts. The issue's bar: the student's return within 10% of each teacher's, i.e. the
ratio student cost / teacher cost (the same start states, mean actions) at most 1.1.

Writes `distill.json` (every iteration's per-task returns and ratios; the final ratio per task per
seed and their medians) and `distill.png` (ratio against iteration per task, median and range over
seeds, DAgger solid, behaviour cloning dashed, the 1.1 bar dotted).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(out_dir: Path, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="forethought bench distill")
    parser.add_argument("--seeds", default="0-2", help="seeds (default 0-2)")
    parser.add_argument("--episodes", type=int, default=None, help="iterations (default: the agent's)")
    parser.add_argument("--no-bc", action="store_true", help="skip the behaviour-cloning runs")
    args = parser.parse_args(argv)

    import jax

    from _common import machine_info, median, seed_list
    from forethought._jax import enable_compilation_cache
    from forethought.agents import distill
    from forethought.agents.base import MemoryRun
    from forethought.systems import make_env

    enable_compilation_cache()
    seeds = seed_list(args.seeds)
    overrides = {} if args.episodes is None else {"episodes": args.episodes}
    modes = {"dagger": True} if args.no_bc else {"dagger": True, "bc": False}
    runs = []
    for mode, dagger in modes.items():
        for seed in seeds:
            config = distill.Config(dagger=dagger, **overrides)
            run = MemoryRun()
            started = time.perf_counter()
            result = distill.train(config, make_env(config.tasks[0]), jax.random.key(seed), run)
            seconds = time.perf_counter() - started
            columns = [c for c in run.rows[0] if c.startswith(("return", "teacher_return", "ratio_"))]
            runs.append({"mode": mode, "seed": seed, "tasks": list(config.tasks),
                         "rows": [{"episode": row["episode"], "env_steps": row["env_steps"], "kl": row["kl"],
                                   **{c: row[c] for c in columns}} for row in run.rows],
                         "ratios": result.ratios, "student_returns": result.student_returns,
                         "teacher_returns": result.teacher_returns, "env_steps": result.env_steps,
                         "seconds": seconds})
            print(f"{mode} seed {seed}: " + ", ".join(f"{task} {ratio:.3f}" for task, ratio in result.ratios.items())
                  + f" (student cost / teacher cost; {seconds:.0f} s)", flush=True)
    summary = {}
    for mode in modes:
        group = [r for r in runs if r["mode"] == mode]
        summary[mode] = {task: {"median_ratio": median([r["ratios"][task] for r in group]),
                                "worst_ratio": max(r["ratios"][task] for r in group),
                                "within_10_percent": sum(r["ratios"][task] <= 1.1 for r in group),
                                "seeds": len(group)} for task in group[0]["tasks"]}
        for task, s in summary[mode].items():
            print(f"{mode} {task}: median ratio {s['median_ratio']:.3f}, worst {s['worst_ratio']:.3f}, "
                  f"{s['within_10_percent']}/{s['seeds']} seeds within 10%", flush=True)
    record = {"machine": machine_info(None),
              "settings": {"seeds": seeds, "config": {k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in vars(distill.Config(**overrides)).items()}},
              "summary": summary, "runs": runs}
    (out_dir / "distill.json").write_text(json.dumps(record, indent=1))
    _plot(record, out_dir / "distill.png")
    return 0


def _plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = record["runs"][0]["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.9), squeeze=False)
    styles = {"dagger": ("C0", "-", "DAgger (student's states)"), "bc": ("C1", "--", "behaviour cloning")}
    for ax, task in zip(axes[0], tasks):
        column = f"ratio_{task.replace('-', '_')}"
        for mode, (colour, style, label) in styles.items():
            group = [r for r in record["runs"] if r["mode"] == mode]
            if not group:
                continue
            curves = np.array([[row[column] for row in r["rows"]] for r in group])
            it = np.arange(1, curves.shape[1] + 1)
            ax.plot(it, np.median(curves, 0), color=colour, ls=style, lw=1.7, label=label)
            if len(group) > 1:
                ax.fill_between(it, curves.min(0), curves.max(0), color=colour, alpha=0.12)
        ax.axhline(1.1, color="k", ls=":", lw=1, label="within 10% of the teacher")
        ax.set_xlabel("iteration")
        ax.set_ylabel("student cost / teacher cost")
        seeds = len(record["settings"]["seeds"])
        ax.set_title(f"{task} (median and range of {seeds} seeds)", fontsize=10)
        ax.legend(frameon=False, fontsize=7)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle("one multi-task student distilled from iLQR teachers", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
