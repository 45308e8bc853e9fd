"""LQR-FLM against iLQR with the true model, and the Bayesian prior against plain regression.

    forethought bench lqr_flm [--envs pendulum,cartpole] [--seeds 0-4] [--episodes 20] [--rollouts 5]
                              [--priors gmm,none] [--out DIR]

For each env, prior and seed: `forethought.agents.lqr_flm.train` for `--episodes` iterations of
`--rollouts` rollouts, from the system's start state. The number that matters is the cost of the
controller's mean run on the true system after each iteration divided by iLQR's cost on the true
model of the same problem (squashed actions, same start, iLQR from zero controls): 1.0 means the
learned local models did as well as the exact one; below 1.0, LQR-FLM found a better local optimum.
Writes `lqr_flm.json` (every run's costs, medians, seconds) and `lqr_flm.png` (median and range of
the ratio against iterations, per env and prior).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(out_dir: Path, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="forethought bench lqr_flm")
    parser.add_argument("--envs", default="pendulum,cartpole")
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--rollouts", type=int, default=5)
    parser.add_argument("--priors", default="gmm,none")
    args = parser.parse_args(argv)

    import jax

    from _common import machine_info, seed_list
    from forethought._jax import enable_compilation_cache
    from forethought.agents import lqr_flm
    from forethought.systems import make_env

    enable_compilation_cache()
    runs = []
    for env_name in args.envs.split(","):
        for prior in args.priors.split(","):
            for seed in seed_list(args.seeds):
                config = lqr_flm.Config(episodes=args.episodes, rollouts=args.rollouts, prior=prior)
                started = time.perf_counter()
                result = lqr_flm.train(config, make_env(env_name), jax.random.key(seed))
                seconds = time.perf_counter() - started
                ratios = [c / result.reference_cost for c in result.costs]
                runs.append({"env": env_name, "prior": prior, "seed": seed, "costs": result.costs,
                             "ilqr_cost": result.reference_cost, "ratios": ratios, "seconds": seconds,
                             "env_steps": result.env_steps})
                print(f"{env_name} prior={prior} seed={seed}: final cost {result.costs[-1]:.1f}, iLQR "
                      f"{result.reference_cost:.1f}, ratio {ratios[-1]:.3f} ({seconds:.0f} s)", flush=True)

    summary = {}
    for env_name in args.envs.split(","):
        for prior in args.priors.split(","):
            group = [r for r in runs if r["env"] == env_name and r["prior"] == prior]
            final = [r["ratios"][-1] for r in group]
            first_within = [next((i + 1 for i, q in enumerate(r["ratios"]) if q <= 1.05), None) for r in group]
            summary[f"{env_name}/{prior}"] = {
                "median_final_ratio": float(np.median(final)), "final_ratios": final,
                "seeds_within_5_percent": int(sum(q <= 1.05 for q in final)), "seeds": len(group),
                "first_iteration_within_5_percent": first_within,
                "median_seconds": float(np.median([r["seconds"] for r in group]))}
    record = {"machine": machine_info(None),
              "settings": {"envs": args.envs, "seeds": seed_list(args.seeds), "episodes": args.episodes,
                           "rollouts": args.rollouts, "priors": args.priors,
                           "config": "forethought.agents.lqr_flm.Config defaults otherwise"},
              "summary": summary, "runs": runs}
    (out_dir / "lqr_flm.json").write_text(json.dumps(record, indent=1))
    _plot(record, out_dir / "lqr_flm.png")
    return _report(summary)


def _report(summary: dict) -> int:
    for name, entry in summary.items():
        print(f"{name}: median final cost / iLQR {entry['median_final_ratio']:.3f}, "
              f"{entry['seeds_within_5_percent']}/{entry['seeds']} seeds within 5%")
    return 0


def replot(json_path: Path, png_path: Path) -> None:
    """Redraw the figure from a saved `lqr_flm.json`."""
    _plot(json.loads(Path(json_path).read_text()), Path(png_path))


def _plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = record["settings"]["envs"].split(",")
    fig, axes = plt.subplots(1, len(envs), figsize=(5.2 * len(envs), 3.8), squeeze=False)
    colours = {"gmm": "C0", "none": "C3"}
    for ax, env_name in zip(axes[0], envs):
        for prior in record["settings"]["priors"].split(","):
            group = np.array([r["ratios"] for r in record["runs"] if r["env"] == env_name and r["prior"] == prior])
            if group.size == 0:
                continue
            it = np.arange(1, group.shape[1] + 1)
            label = "GMM prior (Bayesian regression)" if prior == "gmm" else "plain linear regression"
            ax.plot(it, np.median(group, 0), color=colours.get(prior, "k"), lw=1.8,
                    label=f"{label}, median of {len(group)}")
            ax.fill_between(it, group.min(0), group.max(0), color=colours.get(prior, "k"), alpha=0.15)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.05, color="0.5", lw=0.8, ls="--")
        ax.set_ylim(0.9, None)
        ax.set_xlabel(f"iteration ({record['settings']['rollouts']} rollouts each)")
        ax.set_ylabel("cost / iLQR cost with the true model")
        ax.set_title(f"LQR-FLM on {env_name}", fontsize=10)
        ax.legend(frameon=False, fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
