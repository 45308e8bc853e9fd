"""The `forethought` command.

    forethought list                          systems and agents
    forethought run AGENT --env ENV [--seed S] [--episodes N] [--out DIR] [agent flags]
    forethought run AGENT --resume RUN_DIR    continue a killed run from its last checkpoint
    forethought run --config RUN_DIR/config.json [--out DIR] [flags]   repeat a run (flags override)
    forethought plot RUN_DIR... [--out PNG] [--x env_steps|episode] [--y return]
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
import re
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

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
    run.add_argument("-h", "--help", action="store_true", help="show this help and the agent's flags")

    plan = commands.add_parser("plan", help="solve a system's control problem and plot it")
    plan.add_argument("method", help="ilqr, ddp, collocation, cem, mppi or random")
    plan.add_argument("--system", default="pendulum", help="built-in continuous system (default: pendulum)")
    plan.add_argument("--horizon", type=int, default=None, help="steps (default: the system's horizon)")
    plan.add_argument("--seed", type=int, default=0, help="random seed of the sampling planners")
    plan.add_argument("--out", type=Path, default=None, help="output folder (default: runs/plan-METHOD-SYSTEM-TIME)")

    bench = commands.add_parser("bench", help="run a benchmark from benchmarks/ (JSON and plot to benchmarks/results/)")
    bench.add_argument("name", nargs="?", help="benchmark name (benchmarks/NAME.py); none lists them")
    bench.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")

    plot = commands.add_parser("plot", help="plot learning curves of run folders")
    plot.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    plot.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN_DIR/learning_curve.png "
                      "for one run, learning_curves.png for several)")
    plot.add_argument("--x", default="env_steps", help="x column (default: env_steps)")
    plot.add_argument("--y", default="return", help="y column (default: return)")
    return parser


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
    from forethought._jax import enable_compilation_cache
    from forethought.experiment.config import config_from_dict, read_record
    from forethought.experiment.run import Run, default_run_dir
    from forethought.systems import make_env

    if options.agent is None and options.config is not None:
        options.agent = read_record(options.config)["agent"]
    if options.agent is None:
        if options.help:
            print(_run_help())
            return 0
        raise UsageError(f"run: missing AGENT; expected one of: {', '.join(agents.names())}")
    module = agents.load(options.agent)
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

    env = make_env(env_name, layout=layout)  # fails before any folder is made
    if options.resume is None:
        out = options.out or default_run_dir(options.agent, env_name)
        record = {"agent": options.agent, "env": env_name, "seed": seed, "on_fault": on_fault,
                  "config": dataclasses.asdict(config)}
        if layout is not None:
            record["env_layout_text"] = layout
        # written when the agent first writes: an agent that refuses the env leaves no folder
        run = Run.create(out, record, lazy=_announce)
    else:
        _announce(run.path)

    enable_compilation_cache()
    import jax

    previous_handler = signal.signal(signal.SIGTERM, _terminate)
    try:
        with faults.handling(on_fault, record=run.event):
            result = module.train(config, env, jax.random.key(seed), run)
    except (KeyboardInterrupt, Terminated) as stop:
        terminated = isinstance(stop, Terminated)
        if not run.exists:
            print("interrupted before the run wrote anything", file=sys.stderr)
            return 143 if terminated else 130
        run.settle()
        run.event("terminated" if terminated else "interrupted")
        print(f"{'terminated' if terminated else 'interrupted'}; continue with: "
              f"{PROG} run {options.agent} --resume {run.path}", file=sys.stderr)
        return 143 if terminated else 130
    except faults.NumericalFault as fault:
        if not run.exists:
            raise
        run.settle()
        run.event("numerical_fault", component=fault.component, step=fault.step, detail=fault.detail,
                  handled="stopped")
        print(f"{PROG}: error: {fault} (run stopped; its last good checkpoint is in {run.path}; "
              "--on-fault skip goes on past such faults)", file=sys.stderr)
        return 3
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        env.close()
    from forethought.experiment.plot import learning_curves, metric_figure

    plot = learning_curves([run.path], run.path / "learning_curve.png", x="env_steps")
    outputs = [plot.name]
    for figure in getattr(module, "FIGURES", ()):  # the agent's own pictures of its metrics
        outputs.append(metric_figure(run.path, figure).name)
    if getattr(result, "policy", None) is not None:
        try:
            outputs.append(_record_final_episode(env_name, layout, result.policy, seed, run.path).name)
        except Exception as error:  # a Gymnasium env that cannot render: the run itself is fine
            run.event("gif_skipped", reason=f"{type(error).__name__}: {error}")
    run.event("finish")
    print(f"done: {run.path} ({', '.join(outputs)})", file=sys.stderr)
    return 0


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


def cmd_plot(options: argparse.Namespace) -> int:
    from forethought.experiment.plot import learning_curves

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
        if options.command not in ("run", "bench") and rest:
            raise UsageError(f"unrecognized arguments: {' '.join(rest)}")
        if options.command == "list":
            return cmd_list()
        if options.command == "plot":
            return cmd_plot(options)
        if options.command == "plan":
            return cmd_plan(options)
        if options.command == "bench":
            return cmd_bench(options, rest)
        return cmd_run(options, rest)
    except ForethoughtError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
