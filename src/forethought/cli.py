"""The `forethought` command.

    forethought list                          systems and agents
    forethought run AGENT --env ENV [--seed S] [--episodes N] [--out DIR] [agent flags]
    forethought run AGENT --resume RUN_DIR    continue a killed run from its last checkpoint
    forethought run --config RUN_DIR/config.json [--out DIR] [flags]   repeat a run (flags override)
    forethought sweep AGENT --env ENV --seeds 0-9 [--grid FIELD=V1,V2 ...] [--address auto|HOST:PORT|ray://...]
                                              seeds x settings as Ray Tune trials, one run folder each
    forethought plot RUN_DIR... [--out PNG] [--x env_steps|episode] [--y return]
    forethought plot SWEEP_DIR [--threshold R] per-setting figures, summary.csv and a table of a sweep
    forethought plan METHOD --system NAME     solve a system's problem: trajectory, GIF, cost per iteration
    forethought bench [NAME] [benchmark flags] run benchmarks/NAME.py -> benchmarks/results/NAME.{json,png}

Agent flags come from the agent's `Config` dataclass (`forethought run AGENT --help` lists them).
User mistakes print one line on stderr and exit with status 2; nothing half-written is left.
A numerical fault under `--on-fault stop` prints one line and exits with status 3; SIGINT and
SIGTERM exit with 130 and 143. In each case the run folder is left consistent (its metrics are
those its last checkpoint covers), ready for `--resume`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from forethought import faults
from forethought.errors import ForethoughtError

PROG = "forethought"


class UsageError(ForethoughtError):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Model-based RL and optimal control in JAX.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("list", help="list the built-in systems and the agents")

    run = commands.add_parser("run", help="train an agent on an env", add_help=False)
    run.add_argument("agent", nargs="?", help="agent name (see `forethought list`)")
    run.add_argument("--env", default=None,
                     help="built-in system name or gym:<Gymnasium id> (default: pendulum)")
    run.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    run.add_argument("--seeds", default=None, metavar="SEEDS",
                     help="several seeds (0-3 or 0,1,2,3): a run folder each, OUT/seed-S, and their mean "
                          "with a 95%% band in OUT/learning_curve.png; agents with a vectorized form "
                          "(pets, mpc) run them on a built-in system as one vmapped program. Repeat the "
                          "command to continue a killed run")
    run.add_argument("--config", type=Path, default=None, metavar="CONFIG_JSON",
                     help="repeat the run recorded in this config.json (agent, env, seed, agent "
                          "config); flags given here override it")
    run.add_argument("--on-fault", choices=faults.POLICIES, default=None,
                     help="on NaN or inf in a model, critic, Cholesky or planner: stop with an error "
                          "(default) or skip the update and keep the last good values")
    run.add_argument("--out", type=Path, default=None,
                     help="run folder (default: runs/AGENT-ENV-TIME)")
    run.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                     help="continue this run folder from its last checkpoint")
    run.add_argument("--env-layout", type=Path, default=None, metavar="FILE",
                     help="maze layout file for --env maze (# wall, . free, S start, G goal)")
    run.add_argument("--no-gif", action="store_true",
                     help="skip the GIF of an episode of the final policy")
    run.add_argument("--tensorboard", action="store_true",
                     help="also write the metrics rows, as they are logged, to a TensorBoard event file "
                          "in the run folder")
    run.add_argument("-h", "--help", action="store_true", help="show this help and the agent's flags")

    sweep = commands.add_parser("sweep", help="run seeds x settings of an agent as Ray Tune trials", add_help=False)
    sweep.add_argument("agent", nargs="?", help="agent name (see `forethought list`)")
    sweep.add_argument("--env", default="pendulum",
                       help="built-in system name or gym:<Gymnasium id> (default: pendulum)")
    sweep.add_argument("--seeds", default="0", help="seeds: a range 0-9, a list 0,3,5 or both (default: 0)")
    sweep.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                       help="agent config field and the values to try (repeat for more fields; every "
                            "combination is a setting); agent flags given as usual apply to all settings")
    sweep.add_argument("--address", default=None,
                       help="Ray cluster to use: auto, HOST:PORT or ray://HOST:10001 (default: start Ray "
                            "on this machine)")
    sweep.add_argument("--num-cpus", type=_positive("--num-cpus"), default=None,
                       help="CPUs of the local Ray (default: all of this machine's)")
    sweep.add_argument("--cpus-per-trial", type=_positive("--cpus-per-trial"), default=1,
                       help="CPUs each trial reserves; its JAX uses that many threads (default: 1)")
    sweep.add_argument("--concurrency", type=_positive("--concurrency"), default=None,
                       help="most trials at once (default: as many as the CPUs allow)")
    sweep.add_argument("--max-failures", type=_positive("--max-failures", minimum=0), default=3,
                       help="retries of a trial whose worker died; each resumes its run folder (default: 3)")
    sweep.add_argument("--on-fault", choices=faults.POLICIES, default="stop",
                       help="numerical faults in a trial: stop it (default) or skip the update")
    sweep.add_argument("--threshold", type=float, default=None,
                       help="return for the summary's 'env steps to threshold' column")
    sweep.add_argument("--out", type=Path, default=None,
                       help="sweep folder (default: runs/sweep-AGENT-ENV-TIME); the same command with the "
                            "same --out continues an interrupted sweep")
    sweep.add_argument("--env-layout", type=Path, default=None, metavar="FILE",
                       help="maze layout file for --env maze")
    sweep.add_argument("--vectorize", action="store_true",
                       help="run the seeds of each setting as one vmapped program (one trial per setting; "
                            "built-in systems, agents that have a vectorized form)")
    sweep.add_argument("--no-gif", action="store_true",
                       help="skip each run's GIF of an episode of its final policy")
    sweep.add_argument("--tensorboard", action="store_true",
                       help="each run also writes its metrics live to a TensorBoard event file "
                            "(tensorboard --logdir SWEEP_DIR)")
    sweep.add_argument("-h", "--help", action="store_true", help="show this help and the agent's flags")

    plan = commands.add_parser("plan", help="solve a system's control problem and plot it")
    plan.add_argument("method", help="ilqr, ddp, collocation, cem, mppi or random")
    plan.add_argument("--system", default="pendulum", help="built-in continuous system (default: pendulum)")
    plan.add_argument("--horizon", type=int, default=None, help="steps (default: the system's horizon)")
    plan.add_argument("--seed", type=int, default=0, help="random seed of the sampling planners")
    plan.add_argument("--out", type=Path, default=None, help="output folder (default: runs/plan-METHOD-SYSTEM-TIME)")

    bench = commands.add_parser("bench", help="run a benchmark from benchmarks/ (JSON and plot to benchmarks/results/)")
    bench.add_argument("name", nargs="?", help="benchmark name (benchmarks/NAME.py); none lists them")
    bench.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")

    plot = commands.add_parser("plot", help="plot learning curves of run folders, or summarise a sweep")
    plot.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                      help="run folders, or one sweep folder (it holds sweep.json)")
    plot.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN_DIR/learning_curve.png "
                      "for one run, learning_curves.png for several); for a sweep, the folder for "
                      "summary.csv and plots/ (default: SWEEP_DIR)")
    plot.add_argument("--threshold", type=float, default=None,
                      help="sweeps only: return whose first crossing the summary reports in env steps")
    plot.add_argument("--x", default="env_steps", help="x column (default: env_steps)")
    plot.add_argument("--y", default="return", help="y column (default: return)")
    return parser


def _positive(flag: str, minimum: int = 1):
    """An argparse type: an integer >= `minimum`, the error naming `flag`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    parse.__name__ = flag
    return parse


def _tyro_message(text: str) -> str:
    """The one informative line of tyro's boxed error output."""
    lines = [re.sub(r"[│╭╮╰╯─]+", " ", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not set(line) <= set("-─ ")]
    for line in lines[1:]:
        if not line.lower().startswith(("argument helptext", "for full helptext")):
            return line
    return lines[0] if lines else "invalid arguments"


def parse_config(config_cls: type, args: Sequence[str], prog: str, defaults: Any = None) -> Any:
    """Build the agent's `Config` from command-line flags with tyro; errors become one line."""
    import tyro

    kwargs = {"default": defaults} if defaults is not None else {}
    if "-h" in args or "--help" in args:
        return tyro.cli(config_cls, args=list(args), prog=prog, **kwargs)  # prints help, exits 0
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            return tyro.cli(config_cls, args=list(args), prog=prog, **kwargs)
    except SystemExit as stop:
        if stop.code in (0, None):
            raise
        raise UsageError(_tyro_message(captured.getvalue())) from None


def cmd_list() -> int:
    from forethought import agents, systems

    print("systems:")
    for name in systems.names():
        factory = systems.get_class(name)
        # A system class's own docstring is Equinox's signature; its module says what it is.
        doc = sys.modules[factory.__module__].__doc__ if isinstance(factory, type) else factory.__doc__
        first = (doc or "").strip().split("\n\n")[0].replace("\n", " ")
        print(f"  {name:<18} {first.split(': ')[0].split('. ')[0].rstrip('.')}")
    print("agents:")
    for name in agents.names():
        print(f"  {name:<18} {agents.summary(name)}")
    return 0


def cmd_run(options: argparse.Namespace, rest: list[str]) -> int:
    from forethought import agents
    from forethought.experiment.config import config_from_dict, read_record
    from forethought.experiment.run import Run, default_run_dir

    if options.agent is None and options.config is not None:
        options.agent = read_record(options.config)["agent"]
    if options.agent is None:
        if options.help:
            print(_run_help())
            return 0
        raise UsageError(f"run: missing AGENT; expected one of: {', '.join(agents.names())}")
    config_cls = agents.config_class(options.agent)
    prog = f"{PROG} run {options.agent}"
    if options.help:
        print(_run_help())
        print(f"\nflags of the {options.agent} agent:")
        parse_config(config_cls, ["--help"], prog)
        return 0

    if options.resume is not None:
        if options.config is not None or options.env is not None or options.seed is not None or rest:
            raise UsageError("--resume continues a run as recorded; it takes no --config, --env, --seed "
                             "or agent flags (only --on-fault)")
        run = Run.open(options.resume)
        record = read_record(run.path)
        if record["agent"] != options.agent:
            raise UsageError(f"--resume {options.resume} is a run of agent {record['agent']!r}, "
                             f"not {options.agent!r}")
        config = config_from_dict(config_cls, record["config"], f"{run.path / 'config.json'} config")
        env_name, seed = record["env"], record["seed"]
        layout, on_fault = record.get("env_layout_text"), _first(options.on_fault, record.get("on_fault"), "stop")
    else:
        record = {}
        if options.config is not None:
            record = read_record(options.config)
            if record["agent"] != options.agent:
                raise UsageError(f"--config {options.config} records agent {record['agent']!r}, "
                                 f"not {options.agent!r}")
            defaults = config_from_dict(config_cls, record["config"], f"{options.config} config")
            config = parse_config(config_cls, rest, prog, defaults=defaults)
        else:
            config = parse_config(config_cls, rest, prog)
        env_name = _first(options.env, record.get("env"), "pendulum")
        seed = _first(options.seed, record.get("seed"), 0)
        on_fault = _first(options.on_fault, record.get("on_fault"), "stop")
        layout = _read_layout(options.env_layout) if options.env_layout else record.get("env_layout_text")
    if on_fault not in faults.POLICIES:
        raise UsageError(f"on_fault must be one of {', '.join(faults.POLICIES)}, got {on_fault!r}")

    out = run.path if options.resume is not None else options.out or default_run_dir(options.agent, env_name)
    if options.seeds is not None:
        return _run_seeds(options, config, env_name, out, on_fault, layout)
    return run_trial(options.agent, env_name, seed, config, out, resume=options.resume is not None,
                     on_fault=on_fault, layout=layout, tensorboard=options.tensorboard, gif=not options.no_gif)


def _run_seeds(options: argparse.Namespace, config: Any, env_name: str, out: Path, on_fault: str,
               layout: str | None) -> int:
    """`forethought run AGENT --seeds ...`: a run folder per seed under `out` (vectorized where the
    agent and env allow it, else one seed after another), then their aggregate learning curve.
    Folders that exist are continued from their checkpoints, so repeating the command resumes."""
    from forethought import agents
    from forethought.experiment.plot import learning_curves
    from forethought.experiment.sweep import parse_seeds

    if options.seed is not None or options.resume is not None:
        raise UsageError("--seeds takes no --seed or --resume (repeat the --seeds command with its --out "
                         "to continue it)")
    seeds = parse_seeds(options.seeds)
    outs = [Path(out) / f"seed-{seed}" for seed in seeds]
    vectorize = (len(seeds) > 1 and hasattr(agents.load(options.agent), "train_vectorized")
                 and not env_name.startswith("gym:") and not getattr(config, "terminal_value", False))
    common = dict(resume=None, on_fault=on_fault, layout=layout, tensorboard=options.tensorboard,
                  gif=not options.no_gif)
    if vectorize:
        status = run_trials(options.agent, env_name, seeds, config, outs, vectorize=True, **common)
    else:
        status = 0
        for seed, seed_out in zip(seeds, outs):
            status = run_trial(options.agent, env_name, seed, config, seed_out, **common)
            if status:
                break
    done = [o for o in outs if (o / "metrics.csv").is_file()]
    if done:
        path = learning_curves(done, Path(out) / "learning_curve.png", x="env_steps")
        print(f"{len(done)} seed(s){' as one vectorized program' if vectorize else ''}: {path}", file=sys.stderr)
    return status


def run_trial(agent: str, env_name: str, seed: int, config: Any, out: Path, *, resume: bool | None = False,
              **options: Any) -> int:
    """Train `agent` on `env_name` with `config` (its `Config`) and `seed` into the run folder `out`,
    exactly as `forethought run` does; with `resume`, continue `out` from its last checkpoint
    (None: if it has one). `options` are those of `run_trials`."""
    return run_trials(agent, env_name, [seed], config, [out], resume=resume, **options)


def run_trials(agent: str, env_name: str, seeds: Sequence[int], config: Any, outs: Sequence[Path], *,
               resume: bool | None = False, vectorize: bool = False, on_fault: str = "stop",
               layout: str | None = None, on_open: Callable[[Any], None] | None = None,
               tensorboard: bool = False, gif: bool = True) -> int:
    """Train `agent` on `env_name` with `config` once per seed, into run folder `outs[i]` for
    `seeds[i]`: one seed as `forethought run` does, several only with `vectorize` (the agent's
    `train_vectorized`, all seeds as one vmapped program).

    Builds the env first (a bad one fails before any folder is made), writes metrics, events and
    checkpoints as the agent goes, then each run's learning curve, the agent's figures and (with
    `gif`) a GIF of the final policy. `resume=True` continues existing folders from their last
    checkpoints, None does so for the folders that exist. `on_open(run)` is called once each `Run`
    exists (a sweep records its worker there). With `tensorboard`, the metrics rows also go to a
    TensorBoard event file in each folder as they come. Returns the exit status: 0 done, 3
    numerical fault, 130 / 143 interrupted / terminated (the folders are then consistent and
    resumable). SIGTERM is caught only in the main thread, where Python lets a handler be set.
    """
    import threading

    from forethought import agents
    from forethought._jax import enable_compilation_cache
    from forethought.experiment.run import Run
    from forethought.systems import make_env

    module = agents.load(agent)
    if vectorize and not hasattr(module, "train_vectorized"):
        raise ForethoughtError(f"--vectorize: agent {agent} has no vectorized form (agents with one: "
                               f"{', '.join(vectorized_agents())})")
    if len(seeds) != len(outs) or not seeds or (len(seeds) > 1 and not vectorize):
        raise ForethoughtError(f"run_trials: expected a run folder per seed (several only with vectorize), "
                               f"got {len(seeds)} seeds and {len(outs)} folders")
    env = make_env(env_name, layout=layout)  # fails before any folder is made
    runs = []
    for seed, out in zip(seeds, outs):
        if resume or (resume is None and (Path(out) / "config.json").is_file()):
            runs.append(Run.open(out))
            _announce(runs[-1].path)
        else:
            record = {"agent": agent, "env": env_name, "seed": seed, "on_fault": on_fault,
                      "config": dataclasses.asdict(config)}
            if layout is not None:
                record["env_layout_text"] = layout
            # written when the agent first writes: an agent that refuses the env leaves no folder
            runs.append(Run.create(out, record, lazy=_announce))
        if on_open is not None:
            on_open(runs[-1])

    enable_compilation_cache()
    import jax

    def record_fault(kind: str, **data: Any) -> None:
        for run in runs:
            run.event(kind, **data)

    main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    followers = []
    if tensorboard:
        from forethought.experiment.aggregate import FollowMetrics

        followers = [FollowMetrics(run.path) for run in runs]
    again = (f"{PROG} run {agent} --resume {runs[0].path}" if len(runs) == 1
             else "the same sweep command (its --out)")
    try:
        with faults.handling(on_fault, record=record_fault):
            if vectorize:
                results = module.train_vectorized(config, env, [jax.random.key(s) for s in seeds], runs)
            else:
                results = [module.train(config, env, jax.random.key(seeds[0]), runs[0])]
    except (KeyboardInterrupt, Terminated) as stop:
        terminated = isinstance(stop, Terminated)
        if not any(run.exists for run in runs):
            print("interrupted before the run wrote anything", file=sys.stderr)
            return 143 if terminated else 130
        for run in runs:
            run.settle()
            if run.exists:
                run.event("terminated" if terminated else "interrupted")
        print(f"{'terminated' if terminated else 'interrupted'}; continue with: {again}", file=sys.stderr)
        return 143 if terminated else 130
    except faults.NumericalFault as fault:
        if not any(run.exists for run in runs):
            raise
        for run in runs:
            run.settle()
            if run.exists:
                run.event("numerical_fault", component=fault.component, step=fault.step, detail=fault.detail,
                          handled="stopped")
        where = runs[0].path if len(runs) == 1 else runs[0].path.parent
        print(f"{PROG}: error: {fault} (run stopped; its last good checkpoint is in {where}; "
              "--on-fault skip goes on past such faults)", file=sys.stderr)
        return 3
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
        for follower in followers:
            follower.stop()
        env.close()
    for run, seed, result in zip(runs, seeds, results):
        _finish_run(module, run, result, env_name, layout, seed, gif)
    return 0


def vectorized_agents() -> list[str]:
    """The agents whose seeds `--vectorize` runs as one program."""
    from forethought import agents

    return [name for name in agents.names() if hasattr(agents.load(name), "train_vectorized")]


def _finish_run(module, run, result, env_name: str, layout: str | None, seed: int, gif: bool) -> None:
    """A finished run's learning curve, the agent's figures, the GIF of its final policy and the
    `finish` event."""
    from forethought.experiment.plot import learning_curves, metric_figure
    from forethought.experiment.run import read_metrics

    plot = learning_curves([run.path], run.path / "learning_curve.png", x="env_steps")
    outputs = [plot.name]
    if "eval_return" in read_metrics(run.path):  # the agent's evaluation episodes (SAC, MBPO)
        outputs.append(learning_curves([run.path], run.path / "eval_curve.png", x="env_steps", y="eval_return",
                                       title="evaluation episodes (deterministic policy)").name)
    for figure in getattr(module, "FIGURES", ()):  # the agent's own pictures of its metrics
        outputs.append(metric_figure(run.path, figure).name)
    if gif and getattr(result, "policy", None) is not None:
        try:
            outputs.append(_record_final_episode(env_name, layout, result.policy, seed, run.path).name)
        except Exception as error:  # a Gymnasium env that cannot render: the run itself is fine
            run.event("gif_skipped", reason=f"{type(error).__name__}: {error}")
    run.event("finish")
    print(f"done: {run.path} ({', '.join(outputs)})", file=sys.stderr)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT."""


def _terminate(signum, frame):
    raise Terminated()


def _announce(path: Path) -> None:
    print(f"run folder: {path}", file=sys.stderr)


def _first(*values):
    """The first value that is not None (a flag given, else the recorded value, else the default)."""
    return next(v for v in values if v is not None)


def _record_final_episode(env_name: str, layout: str | None, policy, seed: int, path: Path) -> Path:
    """A GIF of one episode of the trained policy; Gymnasium envs that cannot render are skipped."""
    from forethought.experiment.video import record_episode
    from forethought.systems import make_env

    env = make_env(env_name, layout=layout, render_mode="rgb_array")
    try:
        return record_episode(env, policy, seed, path / "final_episode.gif")
    finally:
        env.close()


def _read_layout(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text()
    except OSError as error:
        raise UsageError(f"--env-layout {path}: cannot read it ({error.strerror})") from None


def _run_help() -> str:
    help_text = _parser()._subparsers._group_actions[0].choices["run"].format_help()  # type: ignore[union-attr]
    return help_text.replace("usage: forethought run", "usage: forethought run AGENT", 1)


def cmd_plan(options: argparse.Namespace) -> int:
    from forethought import systems
    from forethought._jax import enable_compilation_cache
    from forethought.experiment.plan import record, solver
    from forethought.experiment.run import default_run_dir

    solver(options.method)  # an unknown method fails before anything is built
    system = systems.make(options.system)
    out = options.out or default_run_dir(f"plan-{options.method}", options.system)
    enable_compilation_cache()
    summary = record(options.method, system, out, seed=options.seed, horizon=options.horizon)
    print(f"{options.method} on {options.system}: objective {summary['objective']:.6g} after "
          f"{summary['iterations']} iterations in {summary['solve_seconds'] * 1000:.1f} ms "
          f"(compile {summary['compile_seconds']:.1f} s) -> {out}")
    return 0


def benchmarks_dir() -> Path:
    """`./benchmarks` when run from the project root, else the one beside the source tree."""
    here = Path.cwd() / "benchmarks"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "benchmarks"


def cmd_bench(options: argparse.Namespace, rest: list[str]) -> int:
    import importlib.util

    folder = benchmarks_dir()
    available = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")) if folder.is_dir() else []
    if options.name is None:
        print("benchmarks:" if available else f"no benchmarks in {folder}")
        for name in available:
            print(f"  {name}")
        return 0
    name = options.name.replace("-", "_")
    if name not in available:
        raise UsageError(f"unknown benchmark {options.name!r}; expected one of: {', '.join(available) or 'none'} "
                         f"(in {folder})")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))  # benchmarks import their shared `_common` module
    spec = importlib.util.spec_from_file_location(f"forethought_bench_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    out = options.out or folder / "results"
    out.mkdir(parents=True, exist_ok=True)
    return int(module.main(out, rest) or 0)


def cmd_sweep(options: argparse.Namespace, rest: list[str]) -> int:
    """`forethought sweep`: check everything here, then hand the trials to Ray Tune."""
    from forethought import agents
    from forethought.experiment import aggregate, sweep
    from forethought.experiment.run import default_run_dir
    from forethought.systems import make_env

    if options.agent is None:
        if options.help:
            print(_sweep_help())
            return 0
        raise UsageError(f"sweep: missing AGENT; expected one of: {', '.join(agents.names())}")
    config_cls = agents.config_class(options.agent)
    prog = f"{PROG} sweep {options.agent}"
    if options.help:
        print(_sweep_help())
        print(f"\nflags of the {options.agent} agent (they apply to every setting):")
        parse_config(config_cls, ["--help"], prog)
        return 0
    sweep.require_ray()
    if options.address is not None and options.num_cpus is not None:
        raise UsageError("--num-cpus sizes the local Ray; a cluster given by --address has its own CPUs")
    num_cpus = options.num_cpus or os.cpu_count() or 1
    if options.address is None and options.cpus_per_trial > num_cpus:
        raise UsageError(f"--cpus-per-trial {options.cpus_per_trial} is more than the {num_cpus} CPUs of "
                         "the local Ray (--num-cpus)")
    seeds = sweep.parse_seeds(options.seeds)
    settings = sweep.parse_grid(options.grid, config_cls, rest, prog)
    layout = _read_layout(options.env_layout)
    env = make_env(options.env, layout=layout)  # a bad env fails before any folder is made
    env.close()
    if options.vectorize:
        from forethought.systems.gym import system_of

        if options.agent not in vectorized_agents():
            raise UsageError(f"--vectorize: agent {options.agent} has no vectorized form (agents with one: "
                             f"{', '.join(vectorized_agents())})")
        if system_of(env) is None:
            raise UsageError(f"--vectorize needs a built-in system (its JAX dynamics); {options.env} is not one")
    out = options.out or default_run_dir(f"sweep-{options.agent}", options.env)
    record = sweep.plan(options.agent, options.env, seeds, settings, grid=options.grid, agent_flags=rest,
                        on_fault=options.on_fault, layout=layout)
    sweep.claim(out, record, write=False)  # another sweep's folder is refused before Ray starts
    print(f"sweep: {len(settings)} setting(s) x {len(seeds)} seed(s) of {options.agent} on {options.env} "
          f"-> {out}", file=sys.stderr)
    outcomes = sweep.run_sweep(out, record, address=options.address, tensorboard=options.tensorboard,
                               vectorize=options.vectorize, gif=not options.no_gif,
                               num_cpus=None if options.address else num_cpus,
                               cpus_per_trial=options.cpus_per_trial, concurrency=options.concurrency,
                               max_failures=options.max_failures)
    failed = {name: o for name, o in outcomes.items() if o.get("exit_code") != 0}
    summary = aggregate.summarize(out, threshold=options.threshold)
    print(aggregate.format_table(summary))
    print(f"summary: {summary.csv} and {summary.figures[0].parent}", file=sys.stderr)
    for name, outcome in failed.items():
        print(f"{PROG}: trial {name} did not complete: "
              f"{outcome.get('error') or 'exit ' + str(outcome.get('exit_code'))}", file=sys.stderr)
    return 1 if failed else 0


def _sweep_help() -> str:
    help_text = _parser()._subparsers._group_actions[0].choices["sweep"].format_help()  # type: ignore[union-attr]
    return help_text.replace("usage: forethought sweep", "usage: forethought sweep AGENT", 1)


def cmd_plot(options: argparse.Namespace) -> int:
    from forethought.experiment.plot import learning_curves

    if len(options.runs) == 1 and (options.runs[0] / "sweep.json").is_file():
        from forethought.experiment import aggregate

        summary = aggregate.summarize(options.runs[0], threshold=options.threshold, out=options.out)
        print(aggregate.format_table(summary))
        print(summary.csv)
        return 0
    if options.threshold is not None:
        raise UsageError("--threshold is for a sweep folder (one that holds sweep.json)")
    if options.out is None:
        options.out = (options.runs[0] / "learning_curve.png" if len(options.runs) == 1
                       else Path("learning_curves.png"))
    path = learning_curves(options.runs, options.out, x=options.x, y=options.y)
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):
                options, rest = parser.parse_known_args(argv)
        except SystemExit as stop:
            if stop.code in (0, None):
                return 0
            lines = [line for line in captured.getvalue().splitlines() if line.strip()]
            raise UsageError(lines[-1].split("error: ", 1)[-1] if lines else "invalid arguments") from None
        if options.command is None:
            parser.print_help()
            return 2
        if options.command not in ("run", "bench", "sweep") and rest:
            raise UsageError(f"unrecognized arguments: {' '.join(rest)}")
        if options.command == "list":
            return cmd_list()
        if options.command == "plot":
            return cmd_plot(options)
        if options.command == "plan":
            return cmd_plan(options)
        if options.command == "bench":
            return cmd_bench(options, rest)
        if options.command == "sweep":
            return cmd_sweep(options, rest)
        return cmd_run(options, rest)
    except ForethoughtError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
