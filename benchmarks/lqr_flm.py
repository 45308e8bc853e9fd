"""LQR-FLM against iLQR with the true model, and the Bayesian prior against plain regression.

    forethought bench lqr_flm [--envs pendulum,cartpole] [--seeds 0-9] [--episodes 20] [--rollouts 5]
                              [--priors gmm,gmm-gps,none] [--out DIR]

For each env, fit and seed: `forethought.agents.lqr_flm.train` for `--episodes` iterations of
`--rollouts` rollouts, from the system's start state. The fits (`--priors`):

- `gmm`: the agent's default, Bayesian regression on the last 10 rollouts with the GMM prior
  placed on their own spread (`local_prior`);
- `gmm-gps`: GPS's fit and step bound, this iteration's rollouts alone with the GMM prior (over
  the last 20) as it is, multiplier at most 10 (`fit_rollouts=rollouts, local_prior=False,
  prior_rollouts=20, max_multiplier=10`): the agent's defaults before issue #8;
- `none`: plain linear regression on the last 10 rollouts.
 The number that matters is the cost of the
controller's mean run on the true system after each iteration divided by iLQR's cost on the true
model of the same problem (squashed actions, same start, iLQR from zero controls): 1.0 means the
learned local models did as well as the exact one; below 1.0, LQR-FLM found a better local optimum.
Both are deterministic runs. What LQR-FLM optimises is the expected cost of the controller with its
noise; the final controller's, on the true system by Monte Carlo (500 runs), is recorded beside
(`final_noisy_cost`, `final_noisy_ratio`). iLQR from zero controls is itself a local optimum: the
ratio to the cheapest of 16 iLQR runs (zero and random controls, `lqr_flm.reference_solution`) is
recorded too (`best_ratios`, `median_final_ratio_to_best`) and drawn dotted.
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
    parser.add_argument("--seeds", default="0-9")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--rollouts", type=int, default=5)
    parser.add_argument("--priors", default="gmm,gmm-gps,none")
    args = parser.parse_args(argv)
    unknown = [p for p in args.priors.split(",") if p not in _FITS]
    if unknown:
        parser.error(f"unknown --priors {', '.join(unknown)}; expected some of {', '.join(_FITS)}")

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
                config = lqr_flm.Config(episodes=args.episodes, rollouts=args.rollouts, **_FITS[prior](args))
                started = time.perf_counter()
                result = lqr_flm.train(config, make_env(env_name), jax.random.key(seed))
                seconds = time.perf_counter() - started
                ratios = [c / result.reference_cost for c in result.costs]
                best_ratios = [c / result.best_reference_cost for c in result.costs]
                # what the agent optimises: the final controller with its noise, on the true system
                with jax.enable_x64(True):
                    problem = lqr_flm.Problem(config, make_env(env_name))
                noisy = lqr_flm.sampled_cost(problem, result.controller, jax.random.key(10_000 + seed), samples=500)
                runs.append({"env": env_name, "prior": prior, "seed": seed, "costs": result.costs,
                             "ilqr_cost": result.reference_cost, "ratios": ratios, "seconds": seconds,
                             "ilqr_best_cost": result.best_reference_cost, "best_ratios": best_ratios,
                             "env_steps": result.env_steps, "final_noisy_cost": noisy,
                             "final_noisy_ratio": noisy / result.reference_cost})
                # each run compiles its own programs; without dropping them, 60 runs in one process
                # exhaust the kernel's memory-map limit (LLVM "Cannot allocate memory", then a crash)
                jax.clear_caches()
                print(f"{env_name} prior={prior} seed={seed}: final cost {result.costs[-1]:.1f} (with the "
                      f"controller's noise {noisy:.1f}), iLQR {result.reference_cost:.1f} (best of "
                      f"{config.reference_starts} starts {result.best_reference_cost:.1f}), ratio {ratios[-1]:.3f} "
                      f"({seconds:.0f} s)", flush=True)

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
                "final_noisy_ratios": [r["final_noisy_ratio"] for r in group],
                "median_final_ratio_to_best": float(np.median([r["best_ratios"][-1] for r in group])),
                "final_ratios_to_best": [r["best_ratios"][-1] for r in group],
                "median_seconds": float(np.median([r["seconds"] for r in group]))}
    record = {"machine": machine_info(None),
              "settings": {"envs": args.envs, "seeds": seed_list(args.seeds), "episodes": args.episodes,
                           "rollouts": args.rollouts, "priors": args.priors,
                           "config": "forethought.agents.lqr_flm.Config defaults otherwise",
                           "fits": {p: _LABELS[p] for p in args.priors.split(",")}},
              "summary": summary, "runs": runs}
    (out_dir / "lqr_flm.json").write_text(json.dumps(record, indent=1))
    _plot(record, out_dir / "lqr_flm.png")
    return _report(summary)


_FITS = {
    "gmm": lambda args: dict(prior="gmm"),
    "gmm-gps": lambda args: dict(prior="gmm", fit_rollouts=args.rollouts, local_prior=False, prior_rollouts=20,
                                 max_multiplier=10.0),
    "none": lambda args: dict(prior="none"),
}
"""`--priors` names -> `lqr_flm.Config` fields (module docstring)."""

_LABELS = {"gmm": "GMM prior on the data's spread, last 10 rollouts",
           "gmm-gps": "GMM prior as GPS, this iteration's rollouts",
           "none": "plain regression, last 10 rollouts"}


def _report(summary: dict) -> int:
    for name, entry in summary.items():
        print(f"{name}: median final cost / iLQR {entry['median_final_ratio']:.3f}, "
              f"{entry['seeds_within_5_percent']}/{entry['seeds']} seeds within 5%; against the best of several "
              f"iLQR starts {entry['median_final_ratio_to_best']:.3f}")
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
    colours = {"gmm": "C0", "gmm-gps": "C2", "none": "C3"}
    for ax, env_name in zip(axes[0], envs):
        for prior in record["settings"]["priors"].split(","):
            group = np.array([r["ratios"] for r in record["runs"] if r["env"] == env_name and r["prior"] == prior])
            if group.size == 0:
                continue
            it = np.arange(1, group.shape[1] + 1)
            label = _LABELS.get(prior, prior)
            ax.plot(it, np.median(group, 0), color=colours.get(prior, "k"), lw=1.8,
                    label=f"{label}, median of {len(group)}")
            ax.fill_between(it, group.min(0), group.max(0), color=colours.get(prior, "k"), alpha=0.15)
            best = np.array([r["best_ratios"] for r in record["runs"] if r["env"] == env_name and r["prior"] == prior
                             and "best_ratios" in r])
            if best.size:
                ax.plot(it, np.median(best, 0), color=colours.get(prior, "k"), lw=1.2, ls=":")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.05, color="0.5", lw=0.8, ls="--")
        # the first iterations' costs reach several times iLQR's; the end is what is compared
        ax.set_ylim(0.9, 1.6)
        ax.set_xlabel(f"iteration ({record['settings']['rollouts']} rollouts each)")
        ax.set_ylabel("cost / iLQR cost with the true model")
        ax.set_title(f"LQR-FLM on {env_name} (axis cut at 1.6; dashed: within 5%;\n"
                     "dotted: against the best of 16 iLQR starts)", fontsize=9)
        ax.legend(frameon=False, fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
