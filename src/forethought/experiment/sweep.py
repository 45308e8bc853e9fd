"""Sweeps: many seeds and settings of one agent, each trial a normal run folder, run by Ray Tune.

    forethought sweep dyna-q --env dyna-maze --seeds 0-9 --grid planning-steps=0,5,50 --episodes 50
    forethought sweep pets --env pendulum --seeds 0-7 --address auto --cpus-per-trial 2

    SWEEP_DIR/
      sweep.json                 agent, env, seeds, grid, agent flags, every setting and its config
      <setting>/seed-<s>/        one run folder per trial, exactly what `forethought run` writes
      summary.csv, plots/        per-setting results (`experiment.aggregate`, `forethought plot`)
      .tune/                     Ray Tune's own records of the trials

A setting is one point of the grid (`--grid field=v1,v2` per field, values parsed by the agent's
`Config` through tyro as `forethought run` parses its flags); its folder is named after the
values it sets, `planning-steps=5_episodes=20`, or `default` with no grid. Every setting runs
every seed.

Each trial is a Ray Tune function trainable that calls `forethought.cli.run_trial`, the body of
`forethought run`. Fault tolerance is Tune's retry plus our resume: when a worker dies, Tune starts
the trial again (up to `max_failures` times) and the trial finds its run folder and continues it
from its last checkpoint, so a failure costs at most the episode in progress. A trial whose folder
already finished is not run again, so repeating the same `forethought sweep` command continues an
interrupted sweep.

Without an address Ray starts on this machine with no set-up; with one (`auto`, `HOST:PORT`,
`ray://HOST:10001`) the trials go to that cluster, where SWEEP_DIR must be a path every node
shares and forethought must be installed. Each trial reserves `cpus_per_trial` CPUs and its JAX is
limited to that many threads (`XLA_FLAGS`, `OMP_NUM_THREADS` in Ray's runtime environment), so
concurrent trials do not fight over cores.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import itertools
import json
import os
import socket
import sys
import typing
from pathlib import Path
from typing import Any, Sequence

from forethought._io import atomic_write_text
from forethought.errors import ForethoughtError

SWEEP = "sweep.json"
RAY_HINT = "pip install 'forethought[ray]'"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of the grid: its folder `name`, the `overrides` it sets ({field: value}) and the
    agent's full `config` (the `Config` dataclass)."""

    name: str
    overrides: dict[str, Any]
    config: Any


def parse_seeds(text: str) -> list[int]:
    """`0-9` (inclusive), `0,3,5` or a mix (`0-2,7`) -> sorted distinct seeds >= 0."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        bounds = part.split("-")
        try:
            if len(bounds) == 1:
                values = [int(bounds[0])]
            elif len(bounds) == 2:
                low, high = int(bounds[0]), int(bounds[1])
                if high < low:
                    raise ValueError
                values = list(range(low, high + 1))
            else:
                raise ValueError
        except ValueError:
            raise ForethoughtError(f"--seeds: expected a range like 0-9, a list like 0,3,5 or both (0-2,7) "
                                   f"of integers >= 0, got {text!r}") from None
        seeds.extend(values)
    if len(set(seeds)) != len(seeds):
        raise ForethoughtError(f"--seeds {text}: a seed is given twice")
    return sorted(seeds)


def parse_grid(specs: Sequence[str], config_cls: type, agent_flags: Sequence[str], prog: str) -> list[Setting]:
    """The settings of `--grid field=v1,v2` (one spec per field; every combination is a setting).

    Each setting's config is `agent_flags` plus the setting's values parsed by tyro into
    `config_cls`, as `forethought run` parses its flags; any mistake is one `ForethoughtError`
    naming the flag.
    """
    from forethought.cli import parse_config

    try:
        parse_config(config_cls, list(agent_flags), prog)
    except ForethoughtError as error:
        raise ForethoughtError(f"agent flags {' '.join(agent_flags)}: {error}") from None
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    axes: list[tuple[str, str, list[str]]] = []  # (field, flag name, values)
    for spec in specs:
        name, sep, values_text = spec.partition("=")
        field = name.strip().replace("-", "_")
        flag = field.replace("_", "-")
        values = [v.strip() for v in values_text.split(",")]
        if not sep or not field or not all(values):
            raise ForethoughtError(f"--grid {spec}: expected FIELD=V1,V2,... (for example planning-steps=0,5,50)")
        if field not in fields:
            raise ForethoughtError(f"--grid {spec}: the agent's config has no field {field!r}; fields are: "
                                   f"{', '.join(sorted(f.replace('_', '-') for f in fields))}")
        if any(a[0] == field for a in axes):
            raise ForethoughtError(f"--grid {spec}: field {flag} is already in another --grid")
        if any(arg == f"--{flag}" or arg.startswith(f"--{flag}=") or arg == f"--{field}"
               or arg.startswith(f"--{field}=") for arg in agent_flags):
            raise ForethoughtError(f"--grid {spec}: --{flag} is also given as an agent flag; give it in one place")
        if len(set(values)) != len(values):
            raise ForethoughtError(f"--grid {spec}: a value is given twice")
        axes.append((field, flag, values))

    settings = []
    for combination in itertools.product(*[[(a, v) for v in a[2]] for a in axes]):
        flags, names = list(agent_flags), []
        for (field, flag, _), value in combination:
            flags += _flag_args(flag, value, hints[field])
            names.append(f"{flag}={value}")
        try:
            config = parse_config(config_cls, flags, prog)
        except ForethoughtError as error:
            given = ", ".join(names)
            raise ForethoughtError(f"--grid {given}: {error}") from None
        overrides = {field: getattr(config, field) for (field, _, _), _ in combination}
        settings.append(Setting(_safe_name("_".join(names)) if names else "default", overrides, config))
    return settings


def _flag_args(flag: str, value: str, hint: Any) -> list[str]:
    """Command-line arguments that set `flag` to `value` (tyro's `--x` / `--no-x` for booleans)."""
    if hint is bool:
        lowered = value.lower()
        if lowered in ("true", "1", "yes"):
            return [f"--{flag}"]
        if lowered in ("false", "0", "no"):
            return [f"--no-{flag}"]
        raise ForethoughtError(f"--grid {flag}={value}: {flag} takes true or false, got {value!r}")
    return [f"--{flag}", value]


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "=_-.+" else "-" for c in name)


def plan(agent: str, env: str, seeds: Sequence[int], settings: Sequence[Setting], *, grid: Sequence[str] = (),
         agent_flags: Sequence[str] = (), on_fault: str = "stop", layout: str | None = None) -> dict[str, Any]:
    """The sweep record written to `sweep.json`: what reproduces the sweep and names its trials."""
    record: dict[str, Any] = {
        "agent": agent, "env": env, "seeds": list(seeds), "grid": list(grid),
        "agent_flags": list(agent_flags), "on_fault": on_fault,
        "settings": [{"name": s.name, "overrides": s.overrides, "config": dataclasses.asdict(s.config)}
                     for s in settings],
    }
    if layout is not None:
        record["env_layout_text"] = layout
    return record


def read_sweep(path: Path) -> dict[str, Any]:
    """The record of the sweep folder `path` (its `sweep.json`)."""
    file = Path(path) / SWEEP
    if not file.is_file():
        raise ForethoughtError(f"{path} is not a sweep folder (no {SWEEP} in it)")
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ForethoughtError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), list) \
            or not isinstance(record.get("seeds"), list):
        raise ForethoughtError(f"{file} must hold a JSON object with 'settings' and 'seeds' lists")
    return record


def trial_dirs(sweep_dir: Path, record: dict[str, Any]) -> dict[str, list[Path]]:
    """{setting name: [its run folder per seed]} of a sweep."""
    return {s["name"]: [Path(sweep_dir) / s["name"] / f"seed-{seed}" for seed in record["seeds"]]
            for s in record["settings"]}


def finished(run_dir: Path) -> bool:
    """Whether the run folder's last event is `finish` (a complete trial)."""
    events = Path(run_dir) / "events.jsonl"
    if not events.is_file():
        return False
    lines = [line for line in events.read_text().splitlines() if line.strip()]
    try:
        return bool(lines) and json.loads(lines[-1]).get("event") == "finish"
    except ValueError:
        return False


def jax_thread_env(cpus: int) -> dict[str, str]:
    """Environment variables that keep one trial's JAX (and BLAS) to `cpus` threads."""
    flags = (f"--xla_cpu_multi_thread_eigen={'false' if cpus == 1 else 'true'} "
             f"intra_op_parallelism_threads={cpus}")
    inherited = os.environ.get("XLA_FLAGS", "")
    return {"XLA_FLAGS": f"{inherited} {flags}".strip(), "OMP_NUM_THREADS": str(cpus),
            "OPENBLAS_NUM_THREADS": str(cpus), "MKL_NUM_THREADS": str(cpus)}


def require_ray() -> None:
    """Raise the one-line install hint when Ray Tune is not installed."""
    import importlib.util

    try:
        missing = importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.tune") is None
    except (ImportError, ValueError):
        missing = True
    if missing:
        raise ForethoughtError(f"sweep needs Ray Tune, which is not installed: {RAY_HINT}") from None


def run_sweep(sweep_dir: Path, record: dict[str, Any], *, address: str | None = None,
              num_cpus: int | None = None, cpus_per_trial: int = 1, concurrency: int | None = None,
              max_failures: int = 3, tensorboard: bool = False, vectorize: bool = False,
              gif: bool = True) -> dict[str, dict[str, Any]]:
    """Run every (setting, seed) trial of `record` with Ray Tune into `sweep_dir`.

    Writes `sweep.json` first; a `sweep_dir` that holds another sweep is refused, the same sweep is
    continued (finished trials are skipped, started ones resume). With `tensorboard` each run also
    writes its metrics to a TensorBoard event file as they come. With `vectorize` a trial is a
    setting, all its seeds one vmapped program (`cli.run_trials`); `gif=False` skips the GIFs. Returns {trial folder relative to
    `sweep_dir`: outcome}, the outcome holding `exit_code` (0 done, 3 numerical fault) or `error`.
    """
    require_ray()
    import logging
    import warnings

    # Tune's newer console output prints its tables even at verbose=0; the driver prints its own lines
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    from ray import tune

    sweep_dir = Path(sweep_dir).resolve()
    claim(sweep_dir, record, write=False)
    groups = [list(record["seeds"])] if vectorize else [[seed] for seed in record["seeds"]]
    trials = [{"agent": record["agent"], "env": record["env"], "seeds": seeds, "setting": s["name"],
               "config": s["config"], "on_fault": record["on_fault"], "layout": record.get("env_layout_text"),
               "outs": [str(sweep_dir / s["name"] / f"seed-{seed}") for seed in seeds],
               "tensorboard": tensorboard, "vectorize": vectorize, "gif": gif}
              for s in record["settings"] for seeds in groups]
    runtime_env = {"env_vars": jax_thread_env(cpus_per_trial)}
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"address": address} if address else {
            "num_cpus": num_cpus or os.cpu_count() or 1, "include_dashboard": False}
        with warnings.catch_warnings():
            # Ray starts its own processes with fork + exec; nothing of JAX runs in the child
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            try:
                ray.init(runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=False, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as error:
                where = f"the Ray cluster at --address {address}" if address else "a local Ray"
                raise ForethoughtError(f"cannot start or reach {where}: {_one_line(error)}") from None
    try:
        claim(sweep_dir, record)
        tuner = tune.Tuner(
            tune.with_resources(_trainable, {"cpu": cpus_per_trial}),
            param_space={"trial": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=False,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name="tune", storage_path=str(sweep_dir / ".tune"), verbose=0,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                callbacks=[_report_class()()]),
        )
        results = tuner.fit()
    finally:
        if started_here:
            ray.shutdown()
    outcomes: dict[str, dict[str, Any]] = {}
    for result in results:
        trial = result.config["trial"]
        name = f"{trial['setting']}/{_seeds_name(trial['seeds'])}"
        if result.error is not None:
            outcomes[name] = {"error": _one_line(result.error)}
        else:
            outcomes[name] = {k: v for k, v in result.metrics.items() if k in ("exit_code", "error", "resumed")}
    return dict(sorted(outcomes.items()))


def claim(sweep_dir: Path, record: dict[str, Any], *, write: bool = True) -> None:
    """Write `sweep.json` into `sweep_dir` (with `write=False` only check that it could be), or check
    that the one there records the same sweep."""
    sweep_dir = Path(sweep_dir)
    file = sweep_dir / SWEEP
    stamped = {**record, "created": _dt.datetime.now().isoformat(timespec="seconds")}
    if file.exists():
        previous = read_sweep(sweep_dir)
        if {k: v for k, v in previous.items() if k != "created"} != json.loads(json.dumps(record)):
            raise ForethoughtError(f"{sweep_dir} holds another sweep ({SWEEP} differs); choose another --out "
                                   "or repeat that sweep's command to continue it")
        return
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise ForethoughtError(f"{sweep_dir} exists and is not a sweep folder; choose another --out")
    if not write:
        return
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(file, json.dumps(stamped, indent=2, default=str) + "\n")


def _trainable(params: dict[str, Any]) -> None:
    """One trial in a Ray worker: run (or resume) its run folders, then report how it ended.

    A trial interrupted by SIGTERM or SIGINT raises, so that Tune retries it (it resumes); a user
    mistake or a numerical fault is reported, not raised, since a retry would repeat it.
    """
    from ray import tune

    from forethought import agents, cli
    from forethought.experiment.config import config_from_dict

    trial = params["trial"]
    outs = [Path(out) for out in trial["outs"]]
    if all(finished(out) for out in outs):
        tune.report({"exit_code": 0, "resumed": False, "skipped": True})
        return
    resume = any((out / "config.json").is_file() for out in outs)

    def record_worker(run) -> None:
        run.event("trial", pid=os.getpid(), host=socket.gethostname(), resumed=resume,
                  xla_flags=os.environ.get("XLA_FLAGS", ""))

    try:
        config = config_from_dict(agents.config_class(trial["agent"]), trial["config"], f"{SWEEP} config")
        code = cli.run_trials(trial["agent"], trial["env"], trial["seeds"], config, outs, resume=None,
                              vectorize=trial["vectorize"], on_fault=trial["on_fault"], layout=trial["layout"],
                              on_open=record_worker, tensorboard=trial["tensorboard"], gif=trial["gif"])
    except ForethoughtError as error:
        tune.report({"exit_code": 2, "error": str(error), "resumed": resume})
        return
    if code in (130, 143):
        raise RuntimeError(f"trial {outs[0].parent} was interrupted (exit {code}); Tune retries it from its "
                           "checkpoints")
    tune.report({"exit_code": code, "resumed": resume})


def _seeds_name(seeds: Sequence[int]) -> str:
    return f"seed-{seeds[0]}" if len(seeds) == 1 else f"seeds-{'-'.join(map(str, seeds))}"


def _trial_dirname(trial) -> str:
    spec = trial.config["trial"]
    return f"{spec['setting']}-{_seeds_name(spec['seeds'])}"[:100]


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"


def _report_class():
    from ray import tune

    class Report(tune.Callback):
        """Prints one line per finished, failed or retried trial on the driver's stderr."""

        def _name(self, trial) -> str:
            spec = trial.config["trial"]
            return f"{spec['setting']}/{_seeds_name(spec['seeds'])}"

        def on_trial_complete(self, iteration, trials, trial, **info):
            metrics = trial.last_result or {}
            code = metrics.get("exit_code")
            status = "done" if code == 0 else metrics.get("error") or f"exit {code}"
            if metrics.get("skipped"):
                status = "already done"
            print(f"trial {self._name(trial)}: {status}", file=sys.stderr, flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"trial {self._name(trial)}: failed for good", file=sys.stderr, flush=True)

        def on_trial_recover(self, iteration, trials, trial, **info):
            print(f"trial {self._name(trial)}: its worker failed; retrying from its last checkpoint",
                  file=sys.stderr, flush=True)

    return Report

