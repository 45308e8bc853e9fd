"""A sweep's results across seeds: per-setting figures, `summary.csv` and a printed table.

    forethought plot SWEEP_DIR [--threshold R] [--out DIR]

For each run (one seed of one setting) three numbers, from its `metrics.csv`:

- final return: the mean return of the last 10% of its episodes (at least one episode);
- AUC: the area under the return curve over env steps (trapezoid rule, from the first episode's
  end to the last's), in return x env steps;
- env steps to threshold (with `--threshold R`): env steps at the end of the first episode whose
  return is >= R; seeds that never reach it are left out of the mean and counted in `reached`.

Each is reported per setting as the mean across seeds with a 95% percentile-bootstrap interval of
that mean (resampling seeds with replacement; NumPy generator with a fixed seed, so the numbers
repeat). The figures show the mean learning curve of each setting with the same bootstrap band,
pointwise over env steps (each seed's curve interpolated, not extrapolated past its last episode).

    OUT/summary.csv              one row per setting
    OUT/plots/<setting>.png      each setting: its seeds, their mean and the 95% band
    OUT/plots/settings.png       all settings' means and bands in one figure

With `--tensorboard`, `forethought run` and `forethought sweep` also write each run's metrics rows,
as they are logged, to a TensorBoard event file beside its metrics.csv (`FollowMetrics`, at the
end of this module).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import socket
import struct
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from forethought._io import atomic_write_text
from forethought.experiment.plot import _pyplot, _save
from forethought.experiment.run import METRICS, read_metrics
from forethought.experiment.sweep import finished, read_sweep, trial_dirs

FINAL_FRACTION = 0.1
RESAMPLES = 2000


@dataclasses.dataclass(frozen=True)
class Summary:
    """What `summarize` wrote: one dict per setting in `rows` (the CSV's columns), `columns` in
    order, the `csv` path and the `figures`."""

    rows: list[dict[str, Any]]
    columns: list[str]
    csv: Path
    figures: list[Path]


def run_scores(metrics: dict[str, list[float]], *, threshold: float | None = None, x: str = "env_steps",
               y: str = "return") -> dict[str, float]:
    """`final` (mean `y` of the last 10% of episodes), `auc` (trapezoid of `y` over `x`) and, with a
    threshold, `steps_to_threshold` (`x` of the first episode with `y >= threshold`, NaN if none)."""
    xs, ys = np.asarray(metrics[x], float), np.asarray(metrics[y], float)
    if xs.size == 0:
        raise ValueError("no episodes")
    tail = max(1, math.ceil(FINAL_FRACTION * ys.size))
    scores = {"final": float(np.mean(ys[-tail:])), "auc": float(np.trapezoid(ys, xs)) if xs.size > 1 else 0.0}
    if threshold is not None:
        hits = np.flatnonzero(ys >= threshold)
        scores["steps_to_threshold"] = float(xs[hits[0]]) if hits.size else math.nan
    return scores


def bootstrap_interval(values: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """Mean of the finite `values` and the percentile-bootstrap `level` interval of that mean.
    Returns (mean, lo, hi); NaNs when no value is finite, lo = hi = mean for a single value."""
    values = np.asarray([v for v in values if np.isfinite(v)], float)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if values.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return mean, float(lo), float(hi)


def bootstrap_band(curves: np.ndarray, *, resamples: int = 1000, seed: int = 0,
                   level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise mean and percentile-bootstrap interval over axis 0 of `curves [seeds, points]`
    (NaN where a seed has no value there). Returns (mean, lo, hi), each `[points]`."""
    curves = np.asarray(curves, float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN is the answer
        mean = np.nanmean(curves, axis=0)
        if curves.shape[0] < 2:
            return mean, mean.copy(), mean.copy()
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, curves.shape[0], size=(resamples, curves.shape[0]))
        means = np.nanmean(curves[picks], axis=1)  # [resamples, points]
        tail = 100 * (1 - level) / 2
        lo, hi = np.nanpercentile(means, [tail, 100 - tail], axis=0)
    return mean, lo, hi


def summarize(sweep_dir: Path, *, threshold: float | None = None, out: Path | None = None,
              x: str = "env_steps", y: str = "return", resamples: int = RESAMPLES, seed: int = 0) -> Summary:
    """Write `summary.csv` and the figures of the sweep in `sweep_dir` to `out` (default: the sweep
    folder) and return them. Runs without metrics (not started) are left out; `seeds` counts the
    runs used, `finished` those that ran to their end."""
    sweep_dir = Path(sweep_dir)
    record = read_sweep(sweep_dir)
    out = Path(out) if out is not None else sweep_dir
    overrides = {s["name"]: s.get("overrides", {}) for s in record["settings"]}
    fields = list(dict.fromkeys(f for o in overrides.values() for f in o))
    rows, curves = [], {}
    for setting, run_dirs in trial_dirs(sweep_dir, record).items():
        runs = [(d, read_metrics(d)) for d in run_dirs if (d / METRICS).is_file()]
        runs = [(d, m) for d, m in runs if m.get(y)]
        scores = [run_scores(m, threshold=threshold, x=x, y=y) for _, m in runs]
        row: dict[str, Any] = {"setting": setting, **{f: overrides[setting].get(f, "") for f in fields},
                               "seeds": len(runs), "finished": sum(finished(d) for d in run_dirs)}
        for name, column in (("final", "final_return"), ("auc", "auc")) + (
                (("steps_to_threshold", "steps_to_threshold"),) if threshold is not None else ()):
            mean, lo, hi = bootstrap_interval([s[name] for s in scores], resamples=resamples, seed=seed)
            row.update({f"{column}_mean": mean, f"{column}_lo": lo, f"{column}_hi": hi})
        if threshold is not None:
            row["reached"] = sum(np.isfinite(s["steps_to_threshold"]) for s in scores)
        rows.append(row)
        curves[setting] = [(m[x], m[y]) for _, m in runs]
    columns = list(rows[0]) if rows else ["setting"]
    csv_path = out / "summary.csv"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(csv_path, _csv_text(rows, columns))
    title = f"{record.get('agent', '?')} on {record.get('env', '?')}"
    figures = _figures(curves, out / "plots", title=title, x=x, y=y, seed=seed)
    return Summary(rows, columns, csv_path, figures)


def format_table(summary: Summary) -> str:
    """The summary as an aligned text table: mean [lo, hi] per score."""
    headers = ["setting", "seeds", "final return", "AUC"]
    threshold = any("steps_to_threshold_mean" in r for r in summary.rows)
    if threshold:
        headers += ["steps to threshold", "reached"]
    lines = []
    for row in summary.rows:
        cells = [row["setting"], f"{row['seeds']}", _interval(row, "final_return"), _interval(row, "auc")]
        if threshold:
            cells += [_interval(row, "steps_to_threshold"), f"{row['reached']}/{row['seeds']}"]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(headers)]
    text = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    text += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(text)


def _interval(row: dict[str, Any], column: str) -> str:
    mean, lo, hi = row[f"{column}_mean"], row[f"{column}_lo"], row[f"{column}_hi"]
    if not np.isfinite(mean):
        return "-"
    return f"{mean:.4g} [{lo:.4g}, {hi:.4g}]"


def _csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue()


def _band(runs: list[tuple[list[float], list[float]]], seed: int):
    grid = np.unique(np.concatenate([np.asarray(xs, float) for xs, _ in runs]))
    curves = np.array([np.interp(grid, xs, ys, left=np.nan, right=np.nan) for xs, ys in runs])
    return grid, bootstrap_band(curves, seed=seed)


def _figures(curves: dict[str, list], folder: Path, *, title: str, x: str, y: str, seed: int) -> list[Path]:
    plt = _pyplot()
    paths = []
    overview, ax_all = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, (setting, runs) in enumerate(curves.items()):
        if not runs:
            continue
        color = f"C{i % 10}"
        grid, (mean, lo, hi) = _band(runs, seed)
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for xs, ys in runs:
            ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8)
        for axis, label in ((ax, f"mean of {len(runs)} seeds, 95% bootstrap band"),
                            (ax_all, f"{setting} ({len(runs)} seeds)")):
            axis.plot(grid, mean, color=color, label=label)
            axis.fill_between(grid, lo, hi, color=color, alpha=0.2, linewidth=0)
        _finish(ax, f"{title}: {setting}", x, y)
        paths.append(_save(fig, folder / f"{setting}.png"))
    _finish(ax_all, f"{title}: mean and 95% bootstrap band across seeds", x, y)
    paths.append(_save(overview, folder / "settings.png"))
    return paths


def _finish(ax, title: str, x: str, y: str) -> None:
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.figure.tight_layout()



# ----- TensorBoard event files ------------------------------------------------------------------
# `--tensorboard` writes a run's metrics rows, as they are logged, to an event file in the run
# folder, beside metrics.csv: `tensorboard --logdir SWEEP_DIR` (or RUN_DIR) shows every run live.
# The format is TensorBoard's own (TFRecord framing around `Event` protocol buffers holding scalar
# `Summary` values), written here in a few lines so that no TensorFlow or tensorboard package is
# needed to write it.

def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
    """An `Event` message: wall_time (1, double), step (2, int64), file_version (3) or summary (5),
    the summary a list of `Value`s with tag (1) and simple_value (2, float)."""
    message = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        message += _field(3, file_version.encode())
    if scalars:
        values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                          for tag, value in scalars.items())
        message += _field(5, values)
    return message


class EventWriter:
    """Appends scalar events to one new TensorBoard event file in `folder`."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = folder / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(self.path, "ab")
        self._write(_event(now, 0, file_version="brain.Event:2"))

    def scalars(self, step: int, values: dict[str, float], wall_time: float | None = None) -> None:
        """Write `values` ({tag: number}) at `step`; flushed at once, for a live TensorBoard."""
        self._write(_event(time.time() if wall_time is None else wall_time, int(step), scalars=values))

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._file.write(header + _masked_crc(header) + data + _masked_crc(data))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class FollowMetrics:
    """While a run trains, copy each new row of its metrics.csv into a TensorBoard event file in the
    run folder (a background thread polling every `interval` seconds; `stop()` copies the rest).

    Rows go in at step `env_steps` (or `episode`) with the tag `metrics/<column>` for each numeric
    column. A resumed run starts after the rows its checkpoint covers: the earlier process wrote
    those (all but the rows logged within `interval` of a kill), and TensorBoard shows a step that
    comes again after a resume as its latest value.
    """

    def __init__(self, run_dir: Path, interval: float = 1.0):
        from forethought import checkpoint
        from forethought.experiment.run import CHECKPOINT

        self.run_dir = Path(run_dir)
        self.interval = interval
        self._done = 0
        if (self.run_dir / CHECKPOINT).is_file():
            self._done = int(checkpoint.load_meta(self.run_dir / CHECKPOINT).get("metric_rows", 0))
        self._writer: EventWriter | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tensorboard", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._copy()

    def _copy(self) -> None:
        file = self.run_dir / METRICS
        if not file.is_file():
            return
        with open(file, newline="") as handle:
            text = handle.read()
        lines = [line for line in text.splitlines(keepends=True) if line.endswith("\n")]  # whole rows only
        rows = list(csv.DictReader(lines))
        for row in rows[self._done:]:
            values = {}
            for column, cell in row.items():
                try:
                    values[column] = float(cell)
                except (TypeError, ValueError):
                    continue
            step = values.pop("env_steps", values.get("episode", self._done))
            values.pop("episode", None)
            values = {f"metrics/{column}": value for column, value in values.items() if math.isfinite(value)}
            if self._writer is None:
                self._writer = EventWriter(self.run_dir)
            self._writer.scalars(int(step), values)
            self._done += 1

    def stop(self) -> None:
        """End the thread after copying every row written so far."""
        self._stop.set()
        self._thread.join()
        self._copy()
        if self._writer is not None:
            self._writer.close()
