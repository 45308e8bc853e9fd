"""Sutton & Barto chapter 8 with tabular Dyna-Q and Dyna-Q+: Figures 8.2, 8.4 and 8.5.

    forethought bench dyna_maze [--runs 30] [--changing-runs 30] [--seed 0]

(a) Figure 8.2 (Example 8.1): the Dyna maze, 50 episodes, `--runs` runs, alpha 0.1, epsilon 0.1,
    gamma 0.95, n = 0, 5, 50 planning steps: steps per episode averaged over the runs. The book:
    n = 50 is near the optimum by about episode 3, n = 5 by about 5, n = 0 needs about 25.
(b) Figure 8.4 (Example 8.2): the blocking maze, 3000 steps, the wall moves after 1000.
(c) Figure 8.5 (Example 8.3): the shortcut maze, 6000 steps, a shortcut opens after 3000;
    Dyna-Q+ finds it, Dyna-Q does not.

For (b) and (c) the book gives no settings; these are those of Shangtong Zhang's reproduction of
the book's figures (github.com/ShangtongZhang/reinforcement-learning-an-introduction,
chapter08/maze.py): alpha 1.0 (the world is deterministic), epsilon 0.1, gamma 0.95; blocking
n = 10, kappa 1e-4; shortcut n = 50, kappa 1e-3; the x axis counts real steps, an agent that
reaches the goal starts over, and the curve is the cumulative reward averaged over the runs.

All runs of one setting are one jitted, vmapped call (`forethought.rl.tabular.run_episodes` /
`run_steps`), the same agent as `forethought run dyna-q` (a test checks they take identical
steps). With epsilon = 0.1 even the optimal greedy policy takes more than the 14-step shortest
path on average; that expectation is computed exactly here (a linear solve on the true maze) and
the "near optimal" episode is measured against both.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

FIG_8_2_N = (0, 5, 50)
CHANGING = {
    "blocking": {"figure": "8.4", "steps": 3000, "change_at": 1000, "planning_steps": 10, "kappa": 1e-4},
    "shortcut": {"figure": "8.5", "steps": 6000, "change_at": 3000, "planning_steps": 50, "kappa": 1e-3},
}


def main(out_dir: Path, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="forethought bench dyna_maze")
    parser.add_argument("--runs", type=int, default=30, help="runs of Figure 8.2 (default 30, as the book)")
    parser.add_argument("--changing-runs", type=int, default=30,
                        help="runs of Figures 8.4 and 8.5 (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import jax

    from _common import machine_info
    from forethought._jax import enable_compilation_cache
    from forethought.rl import tabular
    from forethought.systems import mazes

    enable_compilation_cache()
    started = time.perf_counter()
    key = jax.random.key(args.seed)

    # ----- (a) Figure 8.2 ------------------------------------------------------------------------
    maze = mazes.dyna_maze()
    shortest = maze.shortest_path_length()
    eps_optimum = epsilon_greedy_optimum(maze, 0.1)
    book = tabular.Hyper(alpha=0.1, epsilon=0.1, gamma=0.95, kappa=0.0)
    run_keys = jax.random.split(jax.random.fold_in(key, 82), args.runs)
    fig82: dict = {"settings": {"maze": "dyna-maze", "episodes": 50, "runs": args.runs, "alpha": 0.1,
                                "epsilon": 0.1, "gamma": 0.95, "planning_steps": list(FIG_8_2_N)},
                   "shortest_path": shortest, "epsilon_greedy_optimum": round(eps_optimum, 3),
                   "random_walk_first_episode_expected": round(random_walk_steps(maze), 1),
                   "curves": {}}
    firsts = []
    for n in FIG_8_2_N:
        (_, lengths, _), seconds = _timed(lambda: tabular.run_episodes(maze, run_keys, book, n, 50))
        lengths = np.asarray(lengths, np.float64)
        mean = lengths.mean(0)
        firsts.append(lengths[:, 0])
        fig82["curves"][str(n)] = {
            "mean_steps": mean.round(2).tolist(),
            "stderr_steps": (lengths.std(0, ddof=1) / np.sqrt(len(lengths))).round(2).tolist(),
            "first_episode_within_10pct_of_14": _first(mean <= 1.1 * shortest),
            "first_episode_within_10pct_of_epsilon_optimum": _first(mean <= 1.1 * eps_optimum),
            "settled_within_10pct_of_epsilon_optimum": _settled(mean <= 1.1 * eps_optimum),
            "mean_steps_episodes_41_50": round(float(mean[40:].mean()), 2),
            "seconds": seconds,
        }
        near = fig82["curves"][str(n)]["first_episode_within_10pct_of_epsilon_optimum"]
        print(f"Figure 8.2 n={n:>2}: episodes 1-10 {mean[:10].round(1).tolist()}, near optimal from "
              f"episode {near} ({seconds['compile_and_run']:.1f} s with compilation, "
              f"{seconds['run']:.2f} s run)", flush=True)
    fig82["first_episode_same_for_every_n"] = bool(all(np.array_equal(firsts[0], f) for f in firsts))
    fig82["first_episode_mean"] = round(float(firsts[0].mean()), 1)

    # ----- (b), (c) Figures 8.4 and 8.5 ----------------------------------------------------------
    changing = {}
    for name, spec in CHANGING.items():
        world = getattr(mazes, f"{name}_maze")(change_at=spec["change_at"])
        keys = jax.random.split(jax.random.fold_in(key, 80 + int(spec["figure"][-1])),
                                args.changing_runs)
        settings = {k: v for k, v in spec.items() if k != "figure"}
        record = {"settings": {"maze": f"{name}-maze", "runs": args.changing_runs, "alpha": 1.0,
                               "epsilon": 0.1, "gamma": 0.95, **settings},
                  "figure": spec["figure"], "shortest_path_before": world.before.shortest_path_length(),
                  "shortest_path_after": world.after.shortest_path_length(), "methods": {}}
        for method, kappa in (("Dyna-Q", 0.0), ("Dyna-Q+", spec["kappa"])):
            hyper = tabular.Hyper(alpha=1.0, epsilon=0.1, gamma=0.95, kappa=kappa)
            (tables, rewards), seconds = _timed(
                lambda: tabular.run_steps(world, keys, hyper, spec["planning_steps"], spec["steps"]))
            rewards = np.asarray(rewards, np.float64)
            cumulative = rewards.cumsum(1)
            mean = cumulative.mean(0)
            last = rewards[:, -1000:].sum(1)
            entry = {
                "kappa": kappa,
                "cumulative_reward_mean_every_10_steps": mean[9::10].round(2).tolist(),
                "cumulative_reward_at_change": round(float(mean[spec["change_at"] - 1]), 2),
                "cumulative_reward_final": round(float(mean[-1]), 2),
                "goals_in_last_1000_steps_mean": round(float(last.mean()), 2),
                "steps_per_episode_last_1000": (round(1000 / float(last.mean()), 2)
                                                if last.mean() else None),
                "seconds": seconds,
            }
            if name == "shortcut":
                gap_below = maze_index(world.after, 4, 8)
                # The model knows the shortcut if its last step UP from below the gap went through.
                knows = np.asarray(tables.next_state)[:, gap_below, 0] == maze_index(world.after, 3, 8)
                entry["runs_whose_model_knows_the_shortcut"] = int(knows.sum())
                # Fewer steps per episode than the long way's 16 is impossible without the gap.
                long_way = world.before.shortest_path_length()
                entry["runs_faster_than_the_long_way_allows"] = int(
                    (1000 / np.maximum(last, 1) < long_way).sum())
            record["methods"][method] = entry
            print(f"Figure {spec['figure']} {name} {method}: cumulative reward "
                  f"{entry['cumulative_reward_at_change']} at the change, "
                  f"{entry['cumulative_reward_final']} at the end, "
                  f"{entry['steps_per_episode_last_1000']} steps per episode at the end "
                  f"({seconds['compile_and_run']:.1f} s with compilation, {seconds['run']:.2f} s run)",
                  flush=True)
        changing[name] = record

    summary = {
        "benchmark": "Sutton & Barto (2nd ed.) Figures 8.2, 8.4, 8.5 with forethought.rl.tabular",
        "book": {"figure_8_2": "n=50 near the 14-step optimum by about episode 3, n=5 by about 5, "
                               "n=0 about 25; first episode about 1700 steps for every n",
                 "figure_8_5": "Dyna-Q+ finds the shortcut after the change, Dyna-Q never does"},
        "notes": {
            "epsilon_greedy_optimum": "expected steps of the epsilon-greedy policy (epsilon 0.1) around "
                                      "an optimal greedy one: where the curves settle, above 14",
            "first_episode_within_10pct_of_*": "1-based episode at which the mean over runs first "
                                                "is at most 1.1 times the reference; settled_*: from "
                                                "which episode on it stays there",
            "random_walk_first_episode_expected": "with Q all zero and random tie-breaking the first "
                                                  "episode is a uniform random walk; its exact "
                                                  "expectation on this maze (the book's 1700 is more)",
            "seconds": "compile_and_run is the first call; run a second, identical call "
                       "(all runs of one setting in one vmapped call)"},
        "figure_8_2": fig82,
        "figure_8_4": changing["blocking"],
        "figure_8_5": changing["shortcut"],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": {**machine_info(None), "note": "2 cores shared with other jobs; not pinned"},
    }
    (out_dir / "dyna_maze.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(summary, out_dir / "dyna_maze.png")
    print(f"wrote {out_dir / 'dyna_maze.json'} and dyna_maze.png in {summary['wall_seconds']} s")
    return 0


# ----- helpers --------------------------------------------------------------------------------

def maze_index(maze, row: int, col: int) -> int:
    return int(maze.index(row, col))


def _transition_matrix(maze, policy: np.ndarray) -> np.ndarray:
    next_state = np.asarray(maze.next_state)
    P = np.zeros((maze.num_states, maze.num_states))
    for a in range(maze.num_actions):
        np.add.at(P, (np.arange(maze.num_states), next_state[:, a]), policy[:, a])
    return P


def _expected_steps(maze, policy: np.ndarray) -> float:
    """Expected steps from the start to a goal under `policy [S, A]` (a linear solve over the
    states that reach a goal)."""
    distance = maze.goal_distances()
    live = np.flatnonzero(distance > 0)
    P = _transition_matrix(maze, policy)[np.ix_(live, live)]
    steps = np.linalg.solve(np.eye(len(live)) - P, np.ones(len(live)))
    return float(steps[list(live).index(maze.start_state)])


def epsilon_greedy_optimum(maze, epsilon: float) -> float:
    """Expected episode length of the epsilon-greedy policy around an optimal greedy one (ties
    among shortest-path actions broken uniformly): what Figure 8.2's curves settle at."""
    distance = maze.goal_distances()
    next_state = np.asarray(maze.next_state)
    best = (distance[next_state] == distance[:, None] - 1).astype(float)
    best[distance <= 0] = 1.0
    policy = (1 - epsilon) * best / best.sum(1, keepdims=True) + epsilon / maze.num_actions
    return _expected_steps(maze, policy)


def random_walk_steps(maze) -> float:
    """Expected length of the first episode: with Q all zero and ties broken at random, a uniform
    random walk."""
    return _expected_steps(maze, np.full((maze.num_states, maze.num_actions), 1 / maze.num_actions))


def _timed(fn):
    """(result, seconds): the first call includes compilation; a second, identical call is timed
    alone."""
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    return result, {"compile_and_run": round(first, 2), "run": round(time.perf_counter() - start, 3)}


def _first(hits: np.ndarray) -> int | None:
    """The 1-based episode of the first True, or None."""
    where = np.flatnonzero(hits)
    return int(where[0]) + 1 if len(where) else None


def _settled(hits: np.ndarray) -> int | None:
    """The 1-based episode from which every later one is True, or None."""
    if not hits[-1]:
        return None
    misses = np.flatnonzero(~hits)
    return int(misses[-1]) + 2 if len(misses) else 1


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), dpi=110)
    ink = {"0": "0.55", "5": "0.3", "50": "0.0"}

    # (a) Figure 8.2: episodes 2..50 (the book leaves out the first, the same for every n).
    ax = axes[0]
    fig82 = summary["figure_8_2"]
    for n, curve in fig82["curves"].items():
        steps = curve["mean_steps"]
        label = "0 planning steps (direct RL only)" if n == "0" else f"{n} planning steps"
        ax.plot(np.arange(2, len(steps) + 1), steps[1:], color=ink[n], lw=1.6, label=label)
    ax.axhline(fig82["shortest_path"], color="0.6", lw=0.8, ls=":")
    ax.text(50, fig82["shortest_path"] + 12, "14 (shortest path)", fontsize=7, ha="right", color="0.4")
    ax.set_xlim(1, 51)
    ax.set_ylim(0, 800)
    ax.set_xticks([2, 10, 20, 30, 40, 50])
    ax.set_xlabel("Episodes")
    ax.set_ylabel("Steps per episode")
    ax.legend(frameon=False, fontsize=8)
    ax.set_title(f"Figure 8.2: Dyna maze, mean of {fig82['settings']['runs']} runs", fontsize=9)

    # (b), (c) Figures 8.4 and 8.5: cumulative reward against time steps.
    for ax, key in ((axes[1], "figure_8_4"), (axes[2], "figure_8_5")):
        record = summary[key]
        steps = record["settings"]["steps"]
        for method, entry in record["methods"].items():
            curve = np.concatenate([[0.0], entry["cumulative_reward_mean_every_10_steps"]])
            ax.plot(np.arange(0, steps + 1, 10), curve, color="0.0" if method == "Dyna-Q+" else "0.5", lw=1.6,
                    label=f"{method}" + (f" (kappa {entry['kappa']:g})" if entry["kappa"] else ""))
        ax.axvline(record["settings"]["change_at"], color="0.6", lw=0.8, ls="--")
        ax.set_xlim(0, steps)
        ax.set_ylim(0, None)
        ax.set_xlabel("Time steps")
        ax.set_ylabel("Cumulative reward")
        ax.legend(frameon=False, fontsize=8, loc="upper left")
        ax.text(record["settings"]["change_at"], ax.get_ylim()[1] * 0.02, " the maze changes", fontsize=7,
                color="0.4")
        name = record["settings"]["maze"].replace("-", " ")
        ax.set_title(f"Figure {record['figure']}: {name}, mean of {record['settings']['runs']} runs "
                     f"(n={record['settings']['planning_steps']})", fontsize=9)
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
