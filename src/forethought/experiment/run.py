"""Run folders: everything a run writes, kept consistent under kills.

    RUN_DIR/
      config.json     all that reproduces the run: agent, env, seed, agent config, versions
      metrics.csv     one row per episode: episode, env_steps, return, wall_seconds, + agent columns
      events.jsonl    one JSON object per line: start, resume, checkpoint, finish, errors
      checkpoint.npz  the latest checkpoint (arrays + JSON metadata, no pickle), written atomically
      learning_curve.png

Agents see a `Run` through four methods: `log(**row)`, `event(kind, **data)`,
`save_checkpoint(state, **meta)` and `load_checkpoint(like)`. A checkpoint records how many
metric rows it covers; resuming truncates `metrics.csv` to that many rows, so a killed run loses
at most the episode in progress and never holds rows its checkpoint does not know.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

from forethought._io import atomic_write_text
from forethought.errors import ForethoughtError
from forethought import checkpoint
from forethought.experiment.log import ProgressBar

CONFIG = "config.json"
METRICS = "metrics.csv"
EVENTS = "events.jsonl"
CHECKPOINT = "checkpoint.npz"


def environment_info() -> dict[str, str]:
    """Library versions and the JAX backend, recorded in every config.json."""
    from importlib import metadata

    import jax

    versions = {}
    for package in ("forethought", "jax", "jaxlib", "equinox", "optax", "numpy", "gymnasium"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {"python": platform.python_version(), "platform": platform.platform(),
            "jax_backend": jax.default_backend(), **versions}


class Run:
    """A run folder (see the module docstring). Build one with `Run.create` or `Run.open`."""

    def __init__(self, path: Path, config: dict[str, Any]):
        self.path = Path(path)
        self.config = config
        self._pending: Callable[[Path], None] | None = None  # set by a lazy `create`
        self._columns: list[str] | None = None
        self._rows = 0
        self._progress: ProgressBar | None = None
        if (self.path / METRICS).exists():
            with open(self.path / METRICS, newline="") as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                self._columns = header
                self._rows = sum(1 for _ in reader)

    # ----- creating and opening ----------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, config: dict[str, Any], *,
               lazy: Callable[[Path], None] | None = None) -> "Run":
        """Make a new run folder at `path` (which must not exist or be empty) and write config.json.

        With `lazy`, nothing is written until the agent first writes (a row, an event, a
        checkpoint) or asks for a checkpoint; `lazy(path)` is called then. An agent that refuses
        its env before that leaves no folder behind.
        """
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise ForethoughtError(f"run folder {path} already exists and is not empty; "
                                   "choose another --out or continue it with --resume")
        config = {**config, "created": _dt.datetime.now().isoformat(timespec="seconds"),
                  "environment": environment_info()}
        run = cls(path, config)
        run._pending = lazy or (lambda _: None)
        if lazy is None:
            run._materialize()
        return run

    @property
    def exists(self) -> bool:
        """Whether the folder has been written (a lazy run's is not until the agent writes)."""
        return self._pending is None

    def _materialize(self) -> None:
        if self._pending is None:
            return
        announce, self._pending = self._pending, None
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / CONFIG, json.dumps(self.config, indent=2, default=str) + "\n")
        announce(self.path)
        self.event("start")

    @classmethod
    def open(cls, path: Path) -> "Run":
        """Open an existing run folder to resume it."""
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise ForethoughtError(f"{path} is not a run folder (no {CONFIG} in it)")
        try:
            config = json.loads((path / CONFIG).read_text())
        except (OSError, ValueError) as error:
            raise ForethoughtError(f"{path / CONFIG} is not valid JSON: {error}") from None
        if not isinstance(config, dict):
            raise ForethoughtError(f"{path / CONFIG} must hold a JSON object")
        return cls(path, config)

    # ----- what agents call ----------------------------------------------------------------------
    def log(self, **row: Any) -> None:
        """Append one metrics row (an episode). The first row fixes the columns."""
        if self._columns is None:
            self._columns = list(row)
            self._append(METRICS, self._csv_line(self._columns))
        unknown = set(row) - set(self._columns)
        if unknown:
            raise ForethoughtError(f"metrics row has columns {sorted(unknown)} not in {METRICS}'s "
                                   f"header {self._columns}")
        self._append(METRICS, self._csv_line([_format(row.get(c, "")) for c in self._columns]))
        self._rows += 1
        if self._progress is not None and "episode" in row:
            self._progress.update(int(row["episode"]) + 1, int(row.get("env_steps", 0)),
                                  float(row.get("return", float("nan"))))

    def event(self, kind: str, **data: Any) -> None:
        record = {"time": round(time.time(), 3), "event": kind, **data}
        self._append(EVENTS, json.dumps(record, default=str) + "\n")

    def save_checkpoint(self, state: Any, **meta: Any) -> None:
        """Atomically replace the checkpoint; it covers every metrics row logged so far."""
        self._materialize()
        meta = {**meta, "metric_rows": self._rows}
        checkpoint.save(self.path / CHECKPOINT, state, meta)
        self.event("checkpoint", **{k: v for k, v in meta.items() if isinstance(v, (int, float, str))})

    def load_checkpoint(self, like: Any) -> tuple[Any, dict] | None:
        """The latest checkpoint in the structure of `like`, or None if there is none.

        Metric rows written after the checkpoint (an episode that was cut off) are dropped.
        """
        self._materialize()
        if not (self.path / CHECKPOINT).exists():
            self._truncate_metrics(0)  # rows of a run killed before its first checkpoint
            return None
        state, meta = checkpoint.load(self.path / CHECKPOINT, like)
        self._truncate_metrics(int(meta.get("metric_rows", 0)))
        self.event("resume", **{k: v for k, v in meta.items() if isinstance(v, (int, float, str))})
        return state, meta

    def settle(self) -> None:
        """Make the folder consistent after an interruption: drop the metric rows that the last
        checkpoint does not cover (all of them if there is none)."""
        if not self.exists:
            return
        rows = 0
        if (self.path / CHECKPOINT).exists():
            rows = int(checkpoint.load_meta(self.path / CHECKPOINT).get("metric_rows", 0))
        self._truncate_metrics(rows)

    def progress(self, total: int, start: int = 0) -> ProgressBar:
        """A progress bar fed by `log` (rows with an `episode` column); close it when done."""
        self._materialize()
        label = f"{self.config.get('agent', '')} {self.config.get('env', '')}".strip()
        self._progress = ProgressBar(total, label, start=start)
        return self._progress

    def close_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    # ----- internals -----------------------------------------------------------------------------
    def _append(self, name: str, text: str) -> None:
        self._materialize()
        with open(self.path / name, "a") as handle:
            handle.write(text)
            handle.flush()

    @staticmethod
    def _csv_line(values: list[Any]) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(values)
        return buffer.getvalue()

    def _truncate_metrics(self, rows: int) -> None:
        path = self.path / METRICS
        if not path.exists():
            return
        lines = path.read_text().splitlines(keepends=True)
        # A row cut off by a kill has no newline at its end: it is dropped with the rest.
        complete = [line for line in lines if line.endswith("\n")]
        keep = complete[: rows + 1] if complete else []
        if keep != lines:
            atomic_write_text(path, "".join(keep))
        self._columns = next(csv.reader(keep)) if keep else None
        self._rows = max(len(keep) - 1, 0)


def _format(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value)
    if hasattr(value, "item"):
        return _format(value.item())
    return value


def read_metrics(path: Path) -> dict[str, list[float]]:
    """Columns of a run's metrics.csv as lists of floats (non-numeric cells become NaN)."""
    path = Path(path)
    file = path / METRICS if path.is_dir() else path
    if not file.exists():
        raise ForethoughtError(f"{file} does not exist (is {path} a run folder?)")
    with open(file, newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = float("nan")
            columns.setdefault(key, []).append(number)
    return columns


def default_run_dir(agent: str, env: str, root: Path = Path("runs")) -> Path:
    """`runs/AGENT-ENV-YYYYmmdd-HHMMSS` (with a suffix if that exists)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe_env = env.replace(":", "-").replace("/", "-")
    path = Path(root) / f"{agent}-{safe_env}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(root) / f"{agent}-{safe_env}-{stamp}-{suffix}"
    return path


