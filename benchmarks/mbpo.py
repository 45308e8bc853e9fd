"""MBPO against SAC on the pendulum swing-up: return against environment steps (issue #6).

    forethought bench mbpo [--agents sac,mbpo] [--seeds 0,1,2] [--episodes sac=150,mbpo=20]
                           [--env pendulum] [--threshold -250] [--window 3]
                           [--max-steps sac=25000,mbpo=5000] [--eval N] [--metric train|eval]
                           [--merge A.json,B.json]

Runs each agent (any name of the agents registry, `forethought list`, with its default `Config`
but for `episodes`) for each seed in this process, one after another, and records return, env
steps and wall seconds per episode. The returns compared are those of the training episodes
(SAC's stochastic policy, random actions during the warm-up), as every run folder's `metrics.csv`
has them, or with `--eval N --metric eval` the mean return of N episodes of the deterministic
policy after each training episode (the agents' `eval_episodes`: on a separate env instance, not
counted as env steps; what MBPO's paper plots). Both are recorded when `--eval` is given.
`--merge a.json,b.json` summarises runs made in several processes (say, one agent per core) into
one `mbpo.json` and figure, without running anything.

Derived: "env steps to reach R", per seed the env steps at the end of the first episode whose
trailing mean return over `--window` episodes is at least `--threshold` (default -250 on this
pendulum: random actions score about -420, the true-dynamics CEM controller about -201), and
the ratio of the first agent's (SAC's) median to each agent's. It also reports the threshold
"SAC's best final return less 10% of its size" (a final return is the mean of a run's last five
episodes).

`--max-steps` caps an agent's env steps: its run stops before the first episode that would
start at or past the cap (the episode under way when the cap is crossed runs to its end). Give
`--episodes` enough episodes never to bind then: on a task whose episodes end early while the
policy fails (`gym:InvertedPendulum-v5`: from a few steps to 1,000), a fixed episode count is
either too few for an agent that learns late or thousands of env steps too many for one that
learns early.

Adding an agent to the comparison later (MVE, SVG, BPTT, PPO on the model, ...) is
`--agents sac,mbpo,mve --episodes sac=150,mbpo=20,mve=40`; an agent with no `--episodes` entry
runs its `Config`'s default number of episodes. Writes `results/mbpo.json` (settings, machine,
per-seed curves, wall times, steps-to-threshold) and `results/mbpo.png` (mean and min-max band
over seeds, against env steps and against wall-clock minutes).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _common import UsageError, machine_info

DEFAULT_EPISODES = {"sac": 150, "mbpo": 20}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forethought bench mbpo")
    parser.add_argument("--agents", default="sac,mbpo", help="agents registry names, comma separated")
    parser.add_argument("--seeds", default="0,1,2", help="seeds, comma separated")
    parser.add_argument("--episodes", default=",".join(f"{k}={v}" for k, v in DEFAULT_EPISODES.items()),
                        help="N for every agent, or NAME=N pairs, comma separated")
    parser.add_argument("--env", default="pendulum", help="a built-in system or gym:ID")
    parser.add_argument("--threshold", type=float, default=-250.0, help="the return R of 'env steps to reach R'")
    parser.add_argument("--window", type=int, default=3, help="episodes in the trailing mean compared with R")
    parser.add_argument("--max-steps", default="", help="NAME=N pairs, comma separated: stop an agent's run "
                        "before the first episode that would start at or past N env steps")
    parser.add_argument("--eval", type=int, default=0, help="episodes of the deterministic policy after each "
                        "training episode (the agents' eval_episodes; not counted as env steps)")
    parser.add_argument("--merge", default="", help="mbpo.json files, comma separated: summarise their runs "
                        "together (runs split over processes or cores) instead of running anything")
    parser.add_argument("--metric", choices=("train", "eval"), default="train",
                        help="the returns compared: the training episodes' or the evaluation episodes' (needs --eval)")
    return parser


def _parse_max_steps(text: str, agents: list[str]) -> dict[str, int | None]:
    text = text.strip()
    if not text:
        return {name: None for name in agents}
    try:
        pairs = dict(item.split("=", 1) for item in text.split(",") if item)
        given = {name.strip(): int(value) for name, value in pairs.items()}
    except ValueError:
        raise UsageError(f"--max-steps must be NAME=N pairs, got {text!r}") from None
    for name, steps in given.items():
        if name not in agents:
            raise UsageError(f"--max-steps names {name!r}, which is not in --agents")
        if steps < 1:
            raise UsageError(f"--max-steps for {name} must be >= 1, got {steps}")
    return {name: given.get(name) for name in agents}


class _BudgetSpent(Exception):
    """Raised by `_step_budget`'s env at the reset of an episode past the cap."""


def _step_budget(env, steps: int):
    """`env` behind a wrapper that counts env steps and raises `_BudgetSpent` at the first reset
    once `steps` have been taken (the agent's loop stops there; its logged rows stay)."""
    import gymnasium

    class StepBudget(gymnasium.Wrapper):
        taken = 0

        def reset(self, **kwargs):
            if self.taken >= steps:
                raise _BudgetSpent
            return self.env.reset(**kwargs)

        def step(self, action):
            self.taken += 1
            return self.env.step(action)

        def __deepcopy__(self, memo):  # an agent's evaluation copy (built-in systems) counts nothing
            return copy.deepcopy(self.env, memo)

    return StepBudget(env)


def _parse_episodes(text: str, agents: list[str]) -> dict[str, int | None]:
    text = text.strip()
    try:
        if "=" not in text:
            return {name: int(text) for name in agents}
        pairs = dict(item.split("=", 1) for item in text.split(",") if item)
        given = {name.strip(): int(value) for name, value in pairs.items()}
    except ValueError:
        raise UsageError(f"--episodes must be N or NAME=N pairs, got {text!r}") from None
    return {name: given.get(name, DEFAULT_EPISODES.get(name)) for name in agents}


def steps_to_reach(returns: list[float], env_steps: list[int], threshold: float, window: int) -> int | None:
    """Env steps at the end of the first episode whose trailing `window`-episode mean return is
    >= `threshold` (None if no episode gets there)."""
    for i in range(window - 1, len(returns)):
        if np.mean(returns[i - window + 1: i + 1]) >= threshold:
            return int(env_steps[i])
    return None


def main(out_dir: Path, argv: list[str]) -> int:
    options = _parser().parse_args(argv)
    try:
        from forethought import agents as registry
        from forethought.errors import ForethoughtError

        agents = [a.strip() for a in options.agents.split(",") if a.strip()]
        for name in agents:
            if name not in registry.names():
                raise UsageError(f"--agents: unknown agent {name!r}; expected names from: "
                                 f"{', '.join(registry.names())}")
        try:
            seeds = [int(s) for s in options.seeds.split(",") if s.strip()]
        except ValueError:
            raise UsageError(f"--seeds must be integers separated by commas, got {options.seeds!r}") from None
        if not agents or not seeds:
            raise UsageError("--agents and --seeds must each name at least one")
        if options.window < 1:
            raise UsageError(f"--window must be >= 1, got {options.window}")
        if options.eval < 0:
            raise UsageError(f"--eval must be >= 0, got {options.eval}")
        if options.metric == "eval" and not options.eval:
            raise UsageError("--metric eval needs --eval N (N >= 1 evaluation episodes)")
        episodes = _parse_episodes(options.episodes, agents)
        max_steps = _parse_max_steps(options.max_steps, agents)
        configs = {}
        for name in agents:
            cls = registry.config_class(name)
            fields = {} if episodes[name] is None else {"episodes": episodes[name]}
            if options.eval:
                if "eval_episodes" not in {f.name for f in dataclasses.fields(cls)}:
                    raise UsageError(f"--eval: agent {name!r} has no evaluation episodes (eval_episodes)")
                fields["eval_episodes"] = options.eval
            try:
                configs[name] = cls(**fields)
            except ForethoughtError as error:
                raise UsageError(f"--episodes for {name}: {error}") from None
    except UsageError as error:
        print(f"forethought bench mbpo: error: {error}", file=sys.stderr)
        return 2

    import jax

    from forethought._jax import enable_compilation_cache
    from forethought.agents.base import MemoryRun
    from forethought.systems.gym import make_env

    enable_compilation_cache()
    started = time.perf_counter()
    results: dict[str, dict] = {}
    compared = "eval_returns" if options.metric == "eval" else "training_returns"  # --metric
    if options.merge:
        for path in options.merge.split(","):
            for name, entry in json.loads(Path(path).read_text())["agents"].items():
                if name in agents:
                    merged = results.setdefault(name, {"config": entry["config"], "runs": []})
                    merged["runs"] += entry["runs"]
        for name in agents:
            runs = results.get(name, {}).get("runs", [])
            for r in runs:
                r.setdefault("training_returns", r["returns"])  # files written before --eval
            if not runs or any(compared not in r for r in runs):
                print(f"forethought bench mbpo: error: --merge files have no {options.metric} runs of {name!r}",
                      file=sys.stderr)
                return 2
            runs.sort(key=lambda r: r["seed"])
        seeds = sorted({r["seed"] for name in agents for r in results[name]["runs"]})
    for name in [] if options.merge else agents:
        module = registry.load(name)
        runs = []
        for seed in seeds:
            run = MemoryRun()
            start = time.perf_counter()
            env = make_env(options.env)
            if max_steps[name] is not None:
                env = _step_budget(env, max_steps[name])
            try:
                module.train(configs[name], env, jax.random.key(seed), run)
            except _BudgetSpent:
                pass
            runs.append({"seed": seed, "total_seconds": round(time.perf_counter() - start, 1),
                         "training_returns": [round(float(r["return"]), 3) for r in run.rows],
                         **({"eval_returns": [round(float(r["eval_return"]), 3) for r in run.rows]}
                            if options.eval else {}),
                         "env_steps": [int(r["env_steps"]) for r in run.rows],
                         "wall_seconds": [float(r["wall_seconds"]) for r in run.rows]})
            final = np.mean(runs[-1][compared][-5:])
            print(f"{name} seed {seed}: final return {final:.1f} after {runs[-1]['env_steps'][-1]} env steps, "
                  f"{runs[-1]['total_seconds']} s", file=sys.stderr, flush=True)
        results[name] = {"config": dataclasses.asdict(configs[name]), "runs": runs}

    for name in agents:  # "returns": what the summary compares
        for r in results[name]["runs"]:
            r["returns"] = r[compared]

    summary_steps = _steps_to_reach(results, agents, options, "returns")
    for name in agents:
        runs = results[name]["runs"]
        results[name]["final_return"] = {"per_seed": [round(float(np.mean(r["returns"][-5:])), 1) for r in runs],
                                         "mean": round(float(np.mean([np.mean(r["returns"][-5:]) for r in runs])), 1)}
        results[name]["total_seconds"] = [r["total_seconds"] for r in runs]

    summary = {
        "task": f"{options.env}: return of each " + ("training episode" if options.metric == "train" else
                                                     f"episode's {options.eval} evaluation episodes (deterministic "
                                                     "policy, mean)") + " against env steps",
        "settings": {"agents": agents, "seeds": seeds, "episodes": episodes, "max_steps": max_steps,
                     "env": options.env,
                     "threshold": options.threshold, "window": options.window, "eval": options.eval,
                     "metric": options.metric,
                     "steps_to_reach": "env steps at the end of the first episode whose trailing "
                                       f"{options.window}-episode mean return >= threshold"},
        "steps_to_reach": summary_steps,
        **({"steps_to_reach_training_returns": _steps_to_reach(results, agents, options, "training_returns")}
           if options.metric == "eval" else {}),
        "agents": results,
        "wall_seconds": (round(sum(r["total_seconds"] for name in agents for r in results[name]["runs"]), 1)
                         if options.merge else round(time.perf_counter() - started, 1)),
        **({"merged_from": options.merge.split(",")} if options.merge else {}),
        "machine": {**machine_info(None), "note": "2 cores shared with other jobs; not pinned"},
    }
    (out_dir / "mbpo.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(summary, out_dir / "mbpo.png")
    print(json.dumps({"steps_to_reach": summary_steps,
                      "final_return": {n: results[n]["final_return"]["mean"] for n in agents},
                      "seconds_per_run": {n: results[n]["total_seconds"] for n in agents}}, indent=2))
    return 0


def _steps_to_reach(results: dict, agents: list[str], options, key: str) -> dict[str, dict]:
    """Per threshold (the fixed one; the first agent's best final return less 10%), each agent's
    env steps to reach it per seed, their median, and the first agent's median over it."""
    first = agents[0]
    best_final = max(np.mean(r[key][-5:]) for r in results[first]["runs"])
    thresholds = {"fixed": options.threshold,
                  f"{first}'s best final return less 10%": round(float(best_final - 0.1 * abs(best_final)), 3)}
    summary: dict[str, dict] = {}
    for label, threshold in thresholds.items():
        per_agent = {}
        for name in agents:
            steps = [steps_to_reach(r[key], r["env_steps"], threshold, options.window) for r in results[name]["runs"]]
            reached = [s for s in steps if s is not None]
            per_agent[name] = {"per_seed": steps,
                               "median": statistics.median(reached) if len(reached) == len(steps) else None}
        base = per_agent[first]["median"]
        for name in agents:
            mine = per_agent[name]["median"]
            per_agent[name][f"{first}_steps_over_these"] = (round(base / mine, 2) if base and mine else None)
        summary[label] = {"threshold": threshold, "agents": per_agent}
    return summary


def _band(runs: list[dict], key: str):
    """Mean, min and max over seeds on the first run's grid (`key` is the x axis)."""
    x = np.asarray(runs[0][key], float)
    ys = np.stack([np.interp(x, np.asarray(r[key], float), np.asarray(r["returns"], float)) for r in runs])
    return x, ys.mean(0), ys.min(0), ys.max(0)


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    fixed = summary["steps_to_reach"]["fixed"]
    for i, (name, result) in enumerate(summary["agents"].items()):
        runs = result["runs"]
        median = fixed["agents"][name]["median"]
        label = f"{name} ({len(runs)} seeds; reaches {fixed['threshold']:g} at " + (
            f"{median:g} steps)" if median is not None else "never)")
        for ax, key, scale in ((left, "env_steps", 1.0), (right, "wall_seconds", 60.0)):
            x, mean, low, high = _band(runs, key)
            ax.plot(x / scale, mean, color=f"C{i}", label=label if ax is left else name)
            ax.fill_between(x / scale, low, high, color=f"C{i}", alpha=0.2, linewidth=0)
    for ax in (left, right):
        ax.axhline(fixed["threshold"], color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylabel("return (training episode)" if summary["settings"].get("metric", "train") == "train"
                      else "return (evaluation, deterministic policy)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    left.set_xlabel("environment steps (log)")
    left.set_xscale("log")
    right.set_xlabel("wall minutes")
    settings = summary["settings"]
    fig.suptitle(f"{settings['env']}: mean and min-max over seeds {settings['seeds']}; dashed: R = "
                 f"{fixed['threshold']:g}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
