"""PILCO: trials to success and wall time per policy optimisation (seed 003, "PILCO limitations":
"policy optimization (done after every rollout) can take on the order of ~1h").

    forethought bench pilco [--runs cartpole:gp,pendulum:gp,pendulum:bnn] [--seeds 0,1,2] [--jobs 2]

For every `env:model` and seed, runs `forethought run pilco --env ENV --model MODEL` with the
default settings (in this process, one after another) and records per episode the real cost
(sum of the saturating cost over the episode), PILCO's predicted cost of the policy that ran,
success, the seconds spent fitting the model and optimising the policy, and which start of the
policy optimisation won (`policy_start`, `start_costs`: see `Config.policy_restarts`). Trials
to success count the random first episode, as the PILCO paper does. Results are written after
every trial (a run still going has `"finished": false`), so an interrupted benchmark keeps what
it ran.

`--jobs N` runs N (env, model, seed) runs at a time, each a subprocess pinned to its own core
with XLA on one thread, and merges their results. Do not run JAX processes side by side
unpinned on a small machine: XLA's thread pools then spin against each other, and on 2 cores a
GP fit took 75-150 s against 3.7 s alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from _common import UsageError, machine_info, median, run_pinned


def main(out_dir: Path, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="forethought bench pilco")
    parser.add_argument("--runs", default="cartpole:gp,pendulum:gp,pendulum:bnn",
                        help="comma-separated ENV:MODEL pairs")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--episodes", default="cartpole=15,pendulum=8",
                        help="episodes per env, ENV=N pairs")
    parser.add_argument("--stop-after-successes", type=int, default=2,
                        help="end a run once this many trials in a row succeed (0: run every episode)")
    parser.add_argument("--merge", default=None,
                        help="comma-separated pilco.json files of partial runs (e.g. run in parallel with "
                             "--out DIR) to combine into OUT/pilco.json and .png; runs nothing")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, each pinned to its own core (at most the cores there are)")
    args = parser.parse_args(argv)
    if args.jobs > 1:
        return run_in_parallel(args, out_dir)
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge.split(",")]
        results = {**parts[0], "runs": [r for part in parts for r in part["runs"]],
                   "settings": {**parts[0]["settings"], "merged_from": [p["settings"] for p in parts]}}
        summarise(results)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "pilco.json").write_text(json.dumps(results, indent=1))
        plot(results, out_dir / "pilco.png")
        print(json.dumps(results["summary"], indent=1))
        return 0

    import jax

    from forethought._jax import enable_compilation_cache
    from forethought.agents import pilco
    from forethought.systems.gym import make_env

    enable_compilation_cache()
    episodes = {k: int(v) for k, v in (item.split("=") for item in args.episodes.split(","))}
    seeds = [int(s) for s in args.seeds.split(",")]
    pairs = [tuple(item.split(":")) for item in args.runs.split(",")]
    results = {"machine": machine_info(None), "settings": {"runs": args.runs, "seeds": seeds, "episodes": episodes,
                                                        "config": "forethought.agents.pilco.Config defaults"},
               "runs": []}
    out_dir.mkdir(parents=True, exist_ok=True)
    for env_name, model in pairs:
        for seed in seeds:
            config = pilco.Config(episodes=episodes.get(env_name, 15), model=model,
                                  stop_after_successes=args.stop_after_successes)
            start = time.perf_counter()
            done = list(results["runs"])

            def write(rows, finished):
                """Results so far, this run's trials included (`finished` False until it ends), so
                an interrupted run keeps the trials it ran."""
                results["runs"] = done + [_record(env_name, model, seed, rows, time.perf_counter() - start,
                                                  finished)]
                summarise(results)
                (out_dir / "pilco.json").write_text(json.dumps(results, indent=1))
                plot(results, out_dir / "pilco.png")

            run = _printing_run(f"{env_name} {model} seed {seed}", lambda rows: write(rows, False))
            result = pilco.train(config, make_env(env_name), jax.random.key(seed), run)
            write(run.rows, True)
            print(f"{env_name} {model} seed {seed}: trials to success {result.trials_to_success}, "
                  f"costs {[round(r['cost'], 1) for r in run.rows]}", flush=True)
    print(json.dumps(results["summary"], indent=1))
    return 0


def _record(env_name: str, model: str, seed: int, rows: list[dict], seconds: float, finished: bool) -> dict:
    """One run's entry in pilco.json. `policy_start[i]` is the start (0: the previous policy,
    j >= 1: the j-th fresh one) the optimisation after trial i kept, `start_costs[i]` every start's
    predicted cost, ";"-separated."""
    from forethought.agents.pilco import trials_to_success

    return {"env": env_name, "model": model, "seed": seed, "finished": finished,
            "trials_to_success": trials_to_success([r["success"] for r in rows]),
            "total_seconds": round(seconds, 1),
            "cost": [r["cost"] for r in rows], "predicted_cost": [r["predicted_cost"] for r in rows],
            "success": [r["success"] for r in rows], "return": [r["return"] for r in rows],
            "iterations": [r["iterations"] for r in rows],
            "policy_start": [r.get("policy_start") for r in rows],
            "start_costs": [r.get("start_costs") for r in rows],
            "fit_seconds": [r["fit_seconds"] for r in rows],
            "optimise_seconds": [r["optimise_seconds"] for r in rows]}


def _printing_run(label: str, on_row):
    """A `MemoryRun` that prints a line per episode, so a long run shows its progress, and hands
    its rows so far to `on_row`."""
    from forethought.agents.base import MemoryRun

    class PrintingRun(MemoryRun):
        def log(self, **row) -> None:
            super().log(**row)
            print(f"{label} trial {row['episode'] + 1}: cost {row['cost']:.2f}, predicted "
                  f"{row['predicted_cost']:.2f}, success {row['success']}, optimise {row['optimise_seconds']} s, "
                  f"start {row.get('policy_start')} of costs [{row.get('start_costs', '')}], "
                  f"{row['wall_seconds']:.0f} s so far", flush=True)
            on_row(self.rows)

    return PrintingRun()


def run_in_parallel(args: argparse.Namespace, out_dir: Path) -> int:
    """Every (env:model, seed) as its own `forethought bench pilco` subprocess, `args.jobs` at a
    time on cores of their own, then `--merge` of their results."""
    parts_dir = out_dir / "pilco_parts"
    tasks = []
    for pair in args.runs.split(","):
        for seed in args.seeds.split(","):
            part = parts_dir / f"{pair.replace(':', '_')}_{seed}"
            tasks.append(([sys.executable, "-m", "forethought.cli", "bench", "pilco", "--out", str(part),
                           "--runs", pair, "--seeds", seed, "--episodes", args.episodes,
                           "--stop-after-successes", str(args.stop_after_successes)], part))
    try:
        parts, failed = run_pinned(tasks, args.jobs, "forethought bench pilco")
    except UsageError as error:
        raise SystemExit(str(error)) from None
    if failed:
        print(f"failed runs (see their output above): {', '.join(map(str, failed))}")
    done = [str(part / "pilco.json") for part in parts if (part / "pilco.json").exists()]
    if not done:
        return 1
    return main(out_dir, ["--merge", ",".join(done)]) or (1 if failed else 0)


def summarise(results: dict) -> None:
    summary = {}
    for r in results["runs"]:
        s = summary.setdefault(f"{r['env']}:{r['model']}", {"trials_to_success": [], "optimise_seconds": [],
                                                            "fit_seconds": [], "total_seconds": []})
        s["trials_to_success"].append(r["trials_to_success"])
        s["optimise_seconds"] += [x for x in r["optimise_seconds"] if x > 0]
        s["fit_seconds"] += [x for x in r["fit_seconds"] if x > 0]
        s["total_seconds"].append(r["total_seconds"])
    for s in summary.values():
        for name in ("optimise_seconds", "fit_seconds"):
            value = median(s.pop(name))
            s[f"median_{name}"] = None if value is None else round(value, 1)
        s["max_total_minutes"] = round(max(s["total_seconds"]) / 60, 1)
    results["summary"] = summary


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["env"], r["model"]) for r in results["runs"]})
    envs = sorted({env for env, _ in groups})
    fig, axes = plt.subplots(1, len(envs), figsize=(5.5 * len(envs), 4), squeeze=False)
    colours = {"gp": "tab:blue", "bnn": "tab:orange"}
    for ax, env in zip(axes[0], envs):
        for r in (r for r in results["runs"] if r["env"] == env):
            x = np.arange(1, len(r["cost"]) + 1)
            label = f"{r['model']} seed {r['seed']}"
            ax.plot(x, r["cost"], "-", color=colours.get(r["model"]), alpha=0.8, label=label)
            ax.plot(x, r["predicted_cost"], ":", color=colours.get(r["model"]), alpha=0.6)
            ok = np.asarray(r["success"], bool)
            ax.plot(x[ok], np.asarray(r["cost"])[ok], "o", color=colours.get(r["model"]), ms=4)
        ax.set_title(f"PILCO on {env} (dots: success; dotted: predicted)")
        ax.set_xlabel("trial (the first is random)")
        ax.set_ylabel("saturating cost of the episode")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
