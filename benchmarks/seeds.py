"""Many seeds of one setting, three ways (issue #10): the wall time of the same work, 8 seeds of
PETS on the pendulum by default, run

- `sequential`: one process runs the seeds one after another (`cli.run_trial` per seed, the
  compiled planner and fit reused from the second seed on), its JAX free to use every core;
- `processes`: one process per seed, `forethought sweep pets --seeds ...` on a local Ray with
  `--num-cpus` CPUs, one CPU (one JAX thread) per trial, as many trials at once as CPUs;
- `vectorized`: `forethought sweep pets --seeds ... --vectorize`, all seeds one vmapped program
  in one Ray trial that reserves every CPU (`agents.mpc.train_vectorized`).

    forethought bench seeds [--seeds 0-7] [--episodes 5] [--env pendulum] [--num-cpus N]
                            [--configs default,small]

Two PETS configs: `default` (`PETSConfig()`: 5 members of 3 x 200 units, population 100, 5
particles, horizon 30: on a CPU each seed's planning already keeps the cores busy) and `small`
(2 members of 2 x 32 units, population 50, 2 particles, horizon 15: each step is little work,
so the per-step dispatch that vectorizing removes is a larger share).

Every way writes the same run folders (metrics, checkpoints after every episode, learning curves;
no GIFs) for the same seeds and config; the wall time of each is the whole command, start-up and
compilation included (the compilation cache is cleared before each, so none reuses another's).
The seeds' returns are compared between ways: vectorized and sequential runs should agree up to
floating-point reassociation (planning amplifies such differences over an episode, so the check
reports how many episodes' returns agree to 1e-3 rather than demanding all of them).

Writes results/seeds.json and results/seeds.png (the wall times; the seeds' learning curves).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WAYS = ("sequential", "processes", "vectorized")
CONFIGS = {
    "default": [],
    "small": ["--members", "2", "--particles", "2", "--hidden", "32", "--layers", "2", "--population", "50",
              "--horizon", "15"],
}


def main(out_dir: Path, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="forethought bench seeds")
    parser.add_argument("--seeds", default="0-7", help="seeds (default 0-7)")
    parser.add_argument("--episodes", type=int, default=5, help="episodes per seed, 1 random (default 5)")
    parser.add_argument("--env", default="pendulum", help="built-in system (default pendulum)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1,
                        help="CPUs of the local Ray for the two sweeps (default: all)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"which ways to run (default {','.join(WAYS)})")
    parser.add_argument("--configs", default="default,small", help="PETS configs to time (default: default,small)")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default="default", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from _common import UsageError, machine_info, seed_list

    try:
        seeds = seed_list(args.seeds)
        ways = [w.strip() for w in args.ways.split(",")]
        if any(w not in WAYS for w in ways):
            raise UsageError(f"--ways: expected some of {', '.join(WAYS)}, got {args.ways!r}")
        configs = [c.strip() for c in args.configs.split(",")]
        if any(c not in CONFIGS for c in configs + [args.config]):
            raise UsageError(f"--configs: expected some of {', '.join(CONFIGS)}, got {args.configs!r}")
    except UsageError as error:
        print(f"forethought bench seeds: error: {error}", file=sys.stderr)
        return 2
    if args.worker is not None:  # the sequential way, in its own process
        return _sequential(args.env, seeds, ["--episodes", str(args.episodes), *CONFIGS[args.config]], args.worker)

    spec = f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else ",".join(map(str, seeds))
    results: dict = {"task": f"PETS, {args.episodes} episodes (1 random) on {args.env}, seeds {spec}",
                     "num_cpus": args.num_cpus, "machine": machine_info(None), "configs": {}}
    for config in configs:
        outcome = _time_ways(ways, config, spec, seeds, args)
        if outcome is None:
            return 1
        results["configs"][config] = outcome
    (out_dir / "seeds.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, out_dir / "seeds.png")
    print(json.dumps({c: {w: r["ways"][w]["wall_seconds"] for w in r["ways"]} for c, r in results["configs"].items()}))
    return 0


def _time_ways(ways: list[str], config: str, spec: str, seeds: list[int], args) -> dict | None:
    """Run `config` each of the `ways`; their commands, wall seconds and every seed's metrics."""
    flags = ["--episodes", str(args.episodes), "--no-gif", *CONFIGS[config]]
    cli = [sys.executable, "-m", "forethought.cli"]
    commands = {
        "sequential": [sys.executable, __file__, "--seeds", spec, "--episodes", str(args.episodes), "--env", args.env,
                       "--config", config],
        "processes": [*cli, "sweep", "pets", "--env", args.env, "--seeds", spec, "--num-cpus", str(args.num_cpus),
                      "--cpus-per-trial", "1", *flags],
        "vectorized": [*cli, "sweep", "pets", "--env", args.env, "--seeds", spec, "--num-cpus", str(args.num_cpus),
                       "--cpus-per-trial", str(args.num_cpus), "--vectorize", *flags],
    }
    timed: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for way in ways:
            folder = Path(tmp) / way
            command = [*commands[way], *(["--worker", str(folder)] if way == "sequential" else ["--out", str(folder)])]
            env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(Path(tmp) / f"cache-{way}"))
            print(f"[seeds] {config} {way}: {' '.join(command)}", file=sys.stderr, flush=True)
            started = time.perf_counter()
            code = subprocess.run(command, env=env, stdout=sys.stderr).returncode
            seconds = time.perf_counter() - started
            if code != 0:
                print(f"forethought bench seeds: error: the {way} command exited {code}", file=sys.stderr)
                return None
            runs = {seed: _metrics(folder / ("" if way == "sequential" else "default") / f"seed-{seed}")
                    for seed in seeds}
            timed[way] = {"command": " ".join(command[1:]), "wall_seconds": round(seconds, 1), "runs": runs}
            print(f"[seeds] {config} {way}: {seconds:.1f} s", file=sys.stderr, flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    outcome: dict = {"agent_flags": CONFIGS[config], "ways": timed}
    if "sequential" in timed:
        base = timed["sequential"]["wall_seconds"]
        outcome["speedup_over_sequential"] = {w: round(base / timed[w]["wall_seconds"], 2) for w in timed}
    if {"sequential", "vectorized"} <= set(timed):
        outcome["vectorized_vs_sequential_returns"] = _agreement(timed["sequential"]["runs"],
                                                                 timed["vectorized"]["runs"])
    return outcome


def _sequential(env_name: str, seeds: list[int], flags: list[str], folder: Path) -> int:
    from forethought import agents, cli

    config = cli.parse_config(agents.config_class("pets"), flags, "pets")
    for seed in seeds:
        code = cli.run_trial("pets", env_name, seed, config, folder / f"seed-{seed}", gif=False)
        if code != 0:
            return code
    return 0


def _metrics(path: Path) -> dict:
    from forethought.experiment.run import read_metrics

    metrics = read_metrics(path)
    return {k: metrics[k] for k in ("env_steps", "return", "wall_seconds")}


def _agreement(first: dict, second: dict) -> dict:
    pairs = [(a, b) for seed in first for a, b in zip(first[seed]["return"], second[seed]["return"])]
    close = sum(abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in pairs)
    finals = [(first[s]["return"][-1], second[s]["return"][-1]) for s in first]
    return {"episodes_within_1e-3": close, "episodes": len(pairs),
            "final_return_mean": [round(sum(x) / len(x), 1) for x in zip(*finals)]}


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    configs = results["configs"]
    fig, axes = plt.subplots(len(configs), 2, figsize=(11, 4.2 * len(configs)), dpi=110, squeeze=False)
    for (left, right), (config, outcome) in zip(axes, configs.items()):
        ways = outcome["ways"]
        names = list(ways)
        seconds = [ways[w]["wall_seconds"] for w in names]
        bars = left.bar(names, seconds, color=[f"C{WAYS.index(w)}" for w in names])
        left.bar_label(bars, labels=[f"{s:.0f} s" for s in seconds])
        left.set_ylabel("wall seconds, whole command")
        left.set_title(f"{config} config: {results['task']}\n{results['num_cpus']} CPUs", fontsize=9)
        for way in names:
            runs = ways[way]["runs"]
            for i, run in enumerate(runs.values()):
                right.plot(run["env_steps"], run["return"], color=f"C{WAYS.index(way)}", alpha=0.35,
                           label=way if i == 0 else None)
            mean = np.mean([r["return"] for r in runs.values()], axis=0)
            right.plot(next(iter(runs.values()))["env_steps"], mean, color=f"C{WAYS.index(way)}", linewidth=2)
        right.set_xlabel("env steps")
        right.set_ylabel("return")
        right.set_title(f"{config} config: every seed (thin) and their mean (thick), per way", fontsize=9)
        right.legend(fontsize=8)
        right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":  # the sequential worker
    sys.path.insert(0, str(Path(__file__).parent))
    raise SystemExit(main(Path("."), sys.argv[1:]))
