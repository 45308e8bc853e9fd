"""Learning curves: one run, or many runs overlaid with the mean and a 95% interval across seeds.

Runs are grouped by everything in their config.json except the seed (and the time and
environment records), so `forethought plot runs/*` draws one band per setting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from forethought.errors import ForethoughtError
from forethought.experiment.run import CONFIG, read_metrics

# Two-sided 95% Student-t quantiles by degrees of freedom (1..30); the normal value beyond.
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t95(dof: int) -> float:
    return _T95[dof - 1] if 1 <= dof <= len(_T95) else 1.96


def mean_interval(curves: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and 95% t-interval over axis 0 of `[seeds, points]` (NaN-aware). Returns (mean, lo, hi)."""
    curves = np.asarray(curves, float)
    n = np.sum(np.isfinite(curves), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(curves, axis=0)
        std = np.nanstd(curves, axis=0, ddof=1) if curves.shape[0] > 1 else np.zeros_like(mean)
        half = np.array([t95(int(k) - 1) if k > 1 else 0.0 for k in n]) * std / np.sqrt(np.maximum(n, 1))
    half = np.nan_to_num(half)
    return mean, mean - half, mean + half


def _label(config: dict) -> str:
    agent, env = config.get("agent", "?"), config.get("env", "?")
    return f"{agent} on {env}"


def _group_key(config: dict) -> str:
    ignored = {"seed", "created", "environment", "out", "resume"}
    return json.dumps({k: v for k, v in config.items() if k not in ignored}, sort_keys=True, default=str)


def load_runs(run_dirs: Sequence[Path]) -> list[tuple[dict, dict[str, list[float]]]]:
    runs = []
    for run_dir in map(Path, run_dirs):
        config_path = run_dir / CONFIG
        if not config_path.is_file():
            raise ForethoughtError(f"{run_dir} is not a run folder (no {CONFIG})")
        runs.append((json.loads(config_path.read_text()), read_metrics(run_dir)))
    return runs


def learning_curves(run_dirs: Sequence[Path], out: Path, *, x: str = "env_steps",
                    y: str = "return", title: str | None = None) -> Path:
    """Plot `y` against `x` for `run_dirs` to the PNG `out`; returns `out`."""
    plt = _pyplot()
    runs = load_runs(run_dirs)
    groups: dict[str, list[tuple[dict, dict]]] = {}
    for config, metrics in runs:
        if y not in metrics or x not in metrics:
            raise ForethoughtError(f"run {config.get('agent')}/{config.get('env')} has no column "
                                   f"{y if y not in metrics else x!r}; columns: {', '.join(metrics)}")
        groups.setdefault(_group_key(config), []).append((config, metrics))

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    labels = [_label(g[0][0]) for g in groups.values()]
    for (members, label) in zip(groups.values(), labels):
        if labels.count(label) > 1:  # same agent and env, other settings: say which run
            label = f"{label} ({members[0][0].get('created', '')})"
        if len(members) == 1:
            metrics = members[0][1]
            ax.plot(metrics[x], metrics[y], marker="o", markersize=3, label=label)
            continue
        grid = np.unique(np.concatenate([m[x] for _, m in members]))
        curves = np.array([np.interp(grid, m[x], m[y], right=np.nan) for _, m in members])
        mean, lo, hi = mean_interval(curves)
        (line,) = ax.plot(grid, mean, label=f"{label} (mean of {len(members)} seeds)")
        ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    ax.set_title(title or "learning curve" + ("s" if len(groups) > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def metric_figure(run_dir: Path, figure: dict[str, Any], out: Path | None = None) -> Path:
    """One of an agent's own figures (`module.FIGURES`): columns of a run's metrics.csv against
    the episode. `figure` has `name` (the PNG in the run folder), `title`, `ylabel`, `lines`
    (`(column, label, matplotlib style)`, columns the run lacks are skipped) and optional `log`
    (a log y axis) and `x` (the x column, default "episode")."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    x_column = figure.get("x", "episode")
    lines = [line for line in figure["lines"] if line[0] in metrics]
    if x_column not in metrics or not lines:
        raise ForethoughtError(f"{run_dir}: metrics.csv lacks the columns of figure {figure['name']!r}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    x = np.asarray(metrics[x_column]) + (1 if x_column == "episode" else 0)
    for column, label, style in lines:
        ax.plot(x, metrics[column], style, label=label, marker="o", markersize=3)
    if figure.get("log"):
        ax.set_yscale("log")
    ax.set_xlabel("iteration" if x_column == "episode" else x_column.replace("_", " "))
    ax.set_ylabel(figure["ylabel"])
    ax.set_title(figure["title"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out or run_dir / figure["name"])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    _pyplot().close(fig)
    tmp.replace(out)
    return out


def trajectory(system, X: np.ndarray, U: np.ndarray, out: Path, title: str = "") -> Path:
    """States (one panel each) and actions against time, in seconds."""
    plt = _pyplot()
    n, m = X.shape[1], U.shape[1]
    t = np.arange(len(X)) * float(system.dt)
    fig, axes = plt.subplots(n + m, 1, figsize=(7, 1.6 * (n + m) + 0.6), dpi=110, sharex=True)
    names = list(getattr(system, "state_names", [f"x{i}" for i in range(n)]))
    for i in range(n):
        axes[i].plot(t, X[:, i], color="C0")
        axes[i].set_ylabel(names[i], fontsize=8)
    action_names = list(getattr(system, "action_names", [f"u{j}" for j in range(m)]))
    for j in range(m):
        ax = axes[n + j]
        ax.step(t[:-1], U[:, j], where="post", color="C3")
        ax.axhline(float(system.action_low[j]), color="grey", lw=0.8, ls="--")
        ax.axhline(float(system.action_high[j]), color="grey", lw=0.8, ls="--")
        ax.set_ylabel(action_names[j], fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("time (s)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def cost_history(history: np.ndarray, out: Path, title: str = "") -> Path:
    """Objective per solver iteration (log scale when it spans more than a decade)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(np.arange(1, len(history) + 1), history, marker="o", markersize=3)
    positive = history[np.isfinite(history)]
    if positive.size and positive.min() > 0 and positive.max() / positive.min() > 10:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("objective")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)
