"""PETS swing-ups against the true-dynamics controller (issue #5): cart-pole within 15 episodes,
pendulum within 10.

    forethought bench pets_swingup [--envs cartpole,pendulum] [--seeds 0,1,2]
                                   [--episodes cartpole=15,pendulum=10] [--reference-episodes 5]
                                   [--set FIELD=VALUE ...] [--jobs 2]

For each env, the reference is `forethought run pets --model true --random-episodes 0`: the same
CEM planner with the same settings, planning through the system's own dynamics, for
`--reference-episodes` episodes (its return per episode, and their mean). Then for each seed
`forethought run pets --env ENV` (one random episode, then a refit of the ensemble and planning
through it every episode) for the env's episode budget. A seed meets the bar at the first episode
whose return is within 5% of the reference mean (`return >= ref - 0.05 |ref|`; returns are minus
the system's cost, so negative). `--set FIELD=VALUE` changes a field of the PETS config for both
the reference and the learner (the default is the agent's defaults).

`--jobs N` runs every (env, seed) and every reference as its own subprocess pinned to a core,
N at a time, with XLA on one thread, and merges their results (`--merge` does only that).

Writes `results/pets_swingup.json` (settings, per-episode returns, env steps and wall seconds of
every run, the reference runs, the episode each seed first met the bar) and
`results/pets_swingup.png` (return per episode, each seed, with the reference and its 5% band).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from _common import UsageError, machine_info, run_pinned, seed_list

BAR = 0.05


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forethought bench pets_swingup")
    parser.add_argument("--envs", default="cartpole,pendulum", help="built-in systems, comma separated")
    parser.add_argument("--seeds", default="0,1,2", help="PETS seeds (0,1,2 or 0-4)")
    parser.add_argument("--episodes", default="cartpole=15,pendulum=10", help="episodes per env, ENV=N pairs")
    parser.add_argument("--reference-episodes", type=int, default=5,
                        help="episodes of the true-dynamics controller per env (0: no reference run)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a PETS config field for the reference and the learner (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each pinned to its own core")
    parser.add_argument("--only-reference", action="store_true", help="run only the reference (a --jobs part)")
    parser.add_argument("--merge", default=None,
                        help="comma-separated pets_swingup.json files of partial runs to combine; runs nothing")
    return parser


def _config(overrides: list[str], episodes: int, **fields):
    """The PETS config with `--set FIELD=VALUE` overrides, parsed and checked as `forethought run
    pets` parses its flags, then `fields` and `episodes`."""
    from forethought.agents import mpc
    from forethought.cli import parse_config
    from forethought.errors import ForethoughtError

    flags = []
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UsageError(f"--set must be FIELD=VALUE, got {item!r}")
        flag = name.replace("_", "-")
        if value.lower() in ("true", "false"):  # tyro's booleans are --FIELD / --no-FIELD
            flags.append(f"--{flag}" if value.lower() == "true" else f"--no-{flag}")
        else:
            flags += [f"--{flag}", value]
    try:
        config = parse_config(mpc.PETSConfig, flags, "forethought bench pets_swingup --set")
        return dataclasses.replace(config, **fields, episodes=episodes)
    except ForethoughtError as error:
        raise UsageError(f"--set: {error}") from None


def _run(env_name: str, seed: int | None, episodes: int, reference_episodes: int, overrides: list[str]) -> dict:
    """One learner seed (`seed` an int) or the env's reference runs (`seed` None)."""
    import jax

    from forethought.agents import mpc
    from forethought.agents.base import MemoryRun
    from forethought.systems.gym import make_env

    if seed is None:
        config = _config(overrides, reference_episodes, model="true", random_episodes=0)
        key = jax.random.key(10_000)
    else:
        config = _config(overrides, episodes)
        key = jax.random.key(seed)
    run = MemoryRun()
    start = time.perf_counter()
    mpc.train(config, make_env(env_name), key, run)
    return {"env": env_name, "seed": seed, "kind": "reference" if seed is None else "pets",
            "config": dataclasses.asdict(config), "total_seconds": round(time.perf_counter() - start, 1),
            "returns": [round(float(r["return"]), 3) for r in run.rows],
            "env_steps": [int(r["env_steps"]) for r in run.rows],
            "wall_seconds": [round(float(r["wall_seconds"]), 1) for r in run.rows]}


def summarise(results: dict) -> dict:
    summary = {}
    for env_name in results["settings"]["envs"]:
        refs = [r for r in results["runs"] if r["env"] == env_name and r["kind"] == "reference"]
        reference = float(np.mean([x for r in refs for x in r["returns"]])) if refs else None
        bar = None if reference is None else reference - BAR * abs(reference)
        seeds = {}
        for r in (r for r in results["runs"] if r["env"] == env_name and r["kind"] == "pets"):
            hits = [i for i, x in enumerate(r["returns"]) if bar is not None and x >= bar]
            seeds[r["seed"]] = {
                "first_episode_within_5pct": hits[0] + 1 if hits else None,
                "env_steps_then": r["env_steps"][hits[0]] if hits else None,
                "wall_seconds_then": r["wall_seconds"][hits[0]] if hits else None,
                "episodes_within_5pct": len(hits), "best_return": max(r["returns"]),
                "last_3_mean": round(float(np.mean(r["returns"][-3:])), 2), "episodes": len(r["returns"])}
        summary[env_name] = {
            "reference_mean": None if reference is None else round(reference, 3),
            "reference_returns": [x for r in refs for x in r["returns"]],
            "bar": None if bar is None else round(bar, 3), "seeds": seeds,
            "all_seeds_met": bool(seeds) and all(s["first_episode_within_5pct"] is not None for s in seeds.values())}
    return summary


def main(out_dir: Path, argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        envs = [e for e in args.envs.split(",") if e]
        seeds = seed_list(args.seeds)
        try:
            budget = {k: int(v) for k, v in (item.split("=") for item in args.episodes.split(",") if item)}
        except ValueError:
            raise UsageError(f"--episodes must be ENV=N pairs, got {args.episodes!r}") from None
        if args.reference_episodes < 0:
            raise UsageError(f"--reference-episodes must be >= 0, got {args.reference_episodes}")
        _config(args.set, 2)
        if args.merge:
            return _merge(out_dir, [Path(p) for p in args.merge.split(",")])
        if args.jobs > 1:
            return _in_parallel(args, envs, seeds, out_dir)
    except UsageError as error:
        print(f"forethought bench pets_swingup: error: {error}", file=sys.stderr)
        return 2

    from forethought._jax import enable_compilation_cache

    enable_compilation_cache()
    settings = {"envs": envs, "seeds": seeds, "episodes": {e: budget.get(e, 15) for e in envs},
                "reference_episodes": args.reference_episodes, "set": args.set, "bar": f"within {BAR:.0%}"}
    results = {"settings": settings, "runs": [], "machine": machine_info(None)}
    out_dir.mkdir(parents=True, exist_ok=True)
    for env_name in envs:
        jobs = ([None] if args.reference_episodes else []) + ([] if args.only_reference else seeds)
        for seed in jobs:
            results["runs"].append(_run(env_name, seed, settings["episodes"][env_name], args.reference_episodes,
                                        args.set))
            r = results["runs"][-1]
            print(f"{env_name} {r['kind']} seed {seed}: returns {[round(x, 1) for x in r['returns']]} "
                  f"({r['total_seconds']:.0f} s)", file=sys.stderr, flush=True)
            _write(results, out_dir)
    print(json.dumps(results["summary"], indent=1))
    return 0


def _write(results: dict, out_dir: Path) -> None:
    results["summary"] = summarise(results)
    (out_dir / "pets_swingup.json").write_text(json.dumps(results, indent=1) + "\n")
    _plot(results, out_dir / "pets_swingup.png")


def _merge(out_dir: Path, paths: list[Path]) -> int:
    parts = [json.loads(p.read_text()) for p in paths]
    settings = dict(parts[0]["settings"])
    settings["envs"] = list(dict.fromkeys(e for p in parts for e in p["settings"]["envs"]))
    settings["seeds"] = sorted({s for p in parts for s in p["settings"]["seeds"]})
    settings["episodes"] = {k: v for p in parts for k, v in p["settings"]["episodes"].items()}
    results = {"settings": settings, "runs": [r for p in parts for r in p["runs"]],
               "machine": {**parts[0]["machine"], "note": "each run a subprocess pinned to its own core"}}
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(results, out_dir)
    print(json.dumps(results["summary"], indent=1))
    return 0


def _in_parallel(args, envs: list[str], seeds: list[int], out_dir: Path) -> int:
    parts_dir = out_dir / "pets_swingup_parts"
    tasks = []
    for env_name in envs:
        runs = ([("reference", "--seeds", "0", "--reference-episodes", str(args.reference_episodes), "--only-reference")]
                if args.reference_episodes else [])
        runs += [(f"seed{s}", "--seeds", str(s), "--reference-episodes", "0") for s in seeds]
        for name, *flags in runs:
            part = parts_dir / f"{env_name}_{name}"
            command = [sys.executable, "-m", "forethought.cli", "bench", "pets_swingup", "--out", str(part),
                       "--envs", env_name, "--episodes", args.episodes, *flags,
                       *(f"--set={item}" for item in args.set)]
            tasks.append((command, part))
    done, failed = run_pinned(tasks, args.jobs, "forethought bench pets_swingup")
    if failed:
        print(f"failed runs (see their output above): {', '.join(map(str, failed))}", file=sys.stderr)
    files = [part / "pets_swingup.json" for part in done if (part / "pets_swingup.json").exists()]
    if not files:
        return 1
    return _merge(out_dir, files) or (1 if failed else 0)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = results["settings"]["envs"]
    fig, axes = plt.subplots(1, len(envs), figsize=(5.5 * len(envs), 4), dpi=110, squeeze=False)
    for ax, env_name in zip(axes[0], envs):
        s = results["summary"][env_name]
        runs = sorted((r for r in results["runs"] if r["env"] == env_name and r["kind"] == "pets"),
                      key=lambda r: r["seed"])
        for i, r in enumerate(runs):
            x = np.arange(1, len(r["returns"]) + 1)
            ax.plot(x, r["returns"], marker="o", ms=3, color=f"C{i}", label=f"PETS seed {r['seed']}")
            first = s["seeds"][r["seed"]]["first_episode_within_5pct"]
            if first is not None:
                ax.plot(first, r["returns"][first - 1], "*", ms=13, color=f"C{i}", mec="black", mew=0.5)
        if s["reference_mean"] is not None:
            ref, bar, refs = s["reference_mean"], s["bar"], s["reference_returns"]
            ax.axhline(ref, color="black", lw=1.2, label=f"true-dynamics CEM, mean of {len(refs)} ({ref:.1f})")
            ax.axhline(bar, color="black", lw=0.8, ls="--", label=f"5% below it ({bar:.1f})")
            ax.axhspan(min(refs), max(refs), color="black", alpha=0.07, label="true-dynamics CEM, min-max")
        ax.set_title(f"PETS on {env_name}, {len(runs)} seeds (star: first episode within 5%)", fontsize=9)
        ax.set_xlabel("episode (the first is random)")
        ax.set_ylabel("return (minus the system's cost)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
