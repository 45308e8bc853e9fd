"""Latent-space MPC on the pendulum swing-up from pixels alone, against PETS on the states.

    forethought bench latent [--seeds 0,1,2] [--episodes 24] [--image-size 32] [--model deterministic]

For each seed runs `forethought run latent-mpc --env pendulum --pixels` (the settings below:
32x32 frames, two stacked, for the CPU budget) and `forethought run pets --env pendulum` (its
defaults, on the 2-d state), in this process one after the other, and records return, env steps
and wall seconds per episode. Writes `latent.json` (the curves, the settings, the machine),
`latent.png` (return against episode and against wall minutes) and `latent.gif` (open-loop video
prediction of the last seed's final model over a whole fresh episode of its own policy: real
frames left, predicted right, from the first frame and the actions alone).

The pendulum's episode is 100 steps (5 s) from hanging at rest; reward is minus the quadratic cost
on the wrapped angle error (see `systems/pendulum.py`); hanging still costs about 4.9 a step
(return about -490), and pushing one way at full torque, which holds the pendulum some 25 degrees
out, about -390.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from _common import seed_list

LATENT = dict(pixels=True, image_size=32, frames=2, action_repeat=2, random_episodes=3, depth=8, latent=16,
              hidden=128, chunk=10, batch_size=16, train_steps=100, horizon=15, population=100, iterations=4,
              explore_noise=0.2, learning_rate=1e-3)


def main(out_dir: Path, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="forethought bench latent")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--episodes", type=int, default=24)
    parser.add_argument("--image-size", type=int, default=32, choices=(32, 64))
    parser.add_argument("--model", default="deterministic", choices=("deterministic", "rssm"))
    parser.add_argument("--skip-pets", action="store_true", help="only the latent runs")
    args = parser.parse_args(argv)

    import jax

    from forethought._jax import enable_compilation_cache
    from forethought.agents import latent_mpc, mpc
    from forethought.agents.base import MemoryRun, run_episode
    from forethought.experiment.video import save_gif
    from forethought.systems.gym import make_env

    enable_compilation_cache()
    out_dir = Path(out_dir)
    latent_config = latent_mpc.Config(episodes=args.episodes, model=args.model,
                                      **{**LATENT, "image_size": args.image_size})
    pets_config = mpc.PETSConfig(episodes=min(args.episodes, 10))

    class PrintRun(MemoryRun):
        def log(self, **row):
            super().log(**row)
            print(f"  episode {row['episode']}: return {row['return']:.1f} ({row['wall_seconds']:.0f} s)", flush=True)

    def curve(train, config, seed):
        run = PrintRun()
        start = time.perf_counter()
        result = train(config, make_env("pendulum"), jax.random.key(seed), run)
        return result, {"seed": seed, "total_seconds": round(time.perf_counter() - start, 1),
                        "returns": [round(r["return"], 2) for r in run.rows],
                        "env_steps": [r["env_steps"] for r in run.rows],
                        "wall_seconds": [r["wall_seconds"] for r in run.rows],
                        **({"prediction_error": [r["prediction_error"] for r in run.rows],
                            "copy_error": [r["copy_error"] for r in run.rows]} if "copy_error" in run.rows[0] else {})}

    runs = {"latent": [], "pets": []}
    last = None
    for seed in seed_list(args.seeds):
        last, row = curve(latent_mpc.train, latent_config, seed)
        runs["latent"].append(row)
        print(f"latent seed {seed}: returns {row['returns']} ({row['total_seconds']} s)", flush=True)
        if not args.skip_pets:
            _, row = curve(mpc.train, pets_config, seed)
            runs["pets"].append(row)
            print(f"pets seed {seed}: returns {row['returns']} ({row['total_seconds']} s)", flush=True)

    # open-loop prediction on a fresh episode of the final latent policy
    env = latent_mpc.prepare_env(make_env("pendulum"), latent_config)
    episode = run_episode(env, last.policy, seed=12345)
    steps = len(episode.actions) - latent_config.context + 1
    frames = latent_mpc.prediction_frames(last.model, episode.observations, episode.actions,
                                          latent_config.context, steps)
    save_gif(frames, out_dir / "latent.gif", fps=10)
    video_error, copy_error = latent_mpc.prediction_errors(last.model, episode.observations, episode.actions,
                                                           latent_config.context, steps)

    def summary_of(rows, k=3):
        finals = [float(np.mean(r["returns"][-k:])) for r in rows]
        best = [float(np.max(r["returns"])) for r in rows]
        return {"mean_of_last_3_episodes": [round(f, 1) for f in finals], "best_episode": [round(b, 1) for b in best],
                "cpu_minutes": round(sum(r["total_seconds"] for r in rows) / 60, 1)}

    summary = {
        "task": "pendulum swing-up (100 steps, reward = -quadratic cost); latent-mpc sees only pixels, PETS the state",
        "command": f"forethought bench latent --seeds {args.seeds} --episodes {args.episodes} "
                   f"--image-size {args.image_size} --model {args.model}",
        "latent": {"config": {k: v for k, v in vars(latent_config).items()}, "runs": runs["latent"],
                   "summary": summary_of(runs["latent"])},
        "pets": {"config": {k: v for k, v in vars(pets_config).items()}, "runs": runs["pets"],
                 "summary": summary_of(runs["pets"]) if runs["pets"] else None},
        "video_prediction": {"steps": len(frames) - latent_config.context, "context": latent_config.context,
                             "episode_return": round(episode.total_reward, 2),
                             "mse_model": round(video_error, 5), "mse_copy_first_frame": round(copy_error, 5)},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
                    "note": "2 CPU cores shared with other jobs, nothing pinned"},
    }
    (out_dir / "latent.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(summary, out_dir / "latent.png")
    print(json.dumps({"latent": summary["latent"]["summary"], "pets": summary["pets"]["summary"],
                      "video": summary["video_prediction"]}, indent=2))
    return 0


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for name, color, label in (("latent", "C0", "latent MPC from 32x32 pixels"), ("pets", "C1", "PETS on states")):
        for i, run in enumerate(summary[name]["runs"]):
            episodes = range(1, len(run["returns"]) + 1)
            left.plot(episodes, run["returns"], marker="o", ms=3, color=color, alpha=0.8, label=label if i == 0 else None)
            right.plot(np.asarray(run["wall_seconds"]) / 60, run["returns"], marker="o", ms=3, color=color, alpha=0.8,
                       label=label if i == 0 else None)
    left.set_xlabel("episode")
    right.set_xlabel("wall minutes (2 shared CPU cores)")
    for ax in (left, right):
        ax.set_ylabel("return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Pendulum swing-up: latent-space MPC from pixels vs PETS on states (one line per seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
