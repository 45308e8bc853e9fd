"""Control benchmark (control issue, "Benchmarks"): iLQR, DDP and CEM-MPC, ours beside trajax.

    forethought bench control [--trajax PATH] [--core N] [--repeats 20] [--cem-repeats 10]

Problems (all in trajax's convention: the terminal term sits inside `cost` at `t == T`, so both
libraries are handed the very same `cost(x, u, t)` and `dynamics(x, u, t)` functions):

- acrobot, iLQR and DDP: `systems.make("acrobot")` (trajax's `testAcrobotSolve`: Euler dt 0.1,
  T 50, cost weights 1000 / 0.1 / 0.01, x0 = 0, U0 = 0; 4959.476212 at U0, below 51 solved);
- pendulum swing-up, iLQR: `systems.make("pendulum")` dynamics (RK4 dt 0.05, b 0.1), T 100,
  stage `0.5 (e'Qe + 0.01 u^2)`, Q = diag(1, 0.1), terminal `0.5 e'Qf e`, Qf = diag(100, 10),
  `e = x - (pi, 0)` (no wrapping);
- cart-pole swing-up, iLQR: `CartPole.control_benchmark(gravity=9.81, friction=0)` dynamics (cart
  1 kg, point pole 0.1 kg at 0.5 m, RK4 dt 0.05), T 100, Q = diag(1, 1, 0.1, 0.1), R 0.01,
  Qf = diag(100, 100, 10, 10), `e = x - (0, pi, 0, 0)` (no wrapping, as the pendulum);
- pendulum CEM as MPC: `run_mpc` over `MPC(cem)` against the same closed loop (one `lax.scan`,
  warm start shifted, fill 0) around `trajax.optimizers.cem`, with matched hyperparameters
  (population 500, horizon 30, 5 iterations, 100 steps; the stage cost above but with the angle
  error wrapped, as the system's own cost, since MPC must be free to swing either way).

Stopping is matched (see NOTES): maxiter 300, gradient norm 1e-4. The acrobot (61 iterations)
and the pendulum (7) converge long before; the cart-pole needs about 190, so the issue's 100
would stop both libraries at the same unconverged objective (251.18 instead of 73.93).

How it measures. The solvers run in float64 (trajax's tests enable x64; a gradient norm of
1e-4 is below float32's reach on these problems), CEM in float32 (what MPC uses). Each part
runs in a fresh worker process (`python benchmarks/control.py --worker PART`) pinned with
`os.sched_setaffinity` to one core, with `XLA_FLAGS` set in its environment before JAX starts:
the CLI has already imported JAX by the time it imports this file, and a worker is the only
way to be sure XLA's CPU backend reads the flags; it also keeps x64 out of the CEM part and
compile times free of earlier compilations (the persistent compilation cache is off in the
workers). Per problem: the first call of each solver (trace + compile + solve), one untimed
warm call, then `--repeats` timed calls with the solvers interleaved in rotating order, so
load on this shared machine hits them alike. Reported: median seconds per solve, compile time
= first call - median warm call, and ratios ours / trajax of medians taken in the same loop.

Three ways of calling are timed:
- `ours`: `ilqr(cost, dynamics, x0, U0, ...)` as a user calls it (jitted inside; Python checks
  and dispatch included);
- `ours_jit` and `trajax_jit`: the same call wrapped in the caller's own `jax.jit`;
- `trajax_api` (a few repeats): `trajax.optimizers.ilqr(...)` as called. It builds new
  closures on every call, which its `jit` sees as new static arguments, so every call traces
  and compiles again; trajax's usable speed is `trajax_jit`, and the ratios use it.

trajax is never a dependency: its checkout is imported from `--trajax PATH` (default: the
environment variable TRAJAX_PATH); without one, only our side runs and the JSON says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import UsageError, machine_info, peer_path, pick_core

XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
PARTS = ("ilqr", "cem")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forethought bench control",
                                     description="iLQR / DDP / CEM-MPC timings, ours beside trajax")
    parser.add_argument("--trajax", type=Path, default=None,
                        help="path of a trajax checkout (the folder holding trajax/); "
                             "default: $TRAJAX_PATH, else trajax is skipped")
    parser.add_argument("--core", type=int, default=None,
                        help="CPU core to pin to (default: the highest one this process may use)")
    parser.add_argument("--repeats", type=int, default=30, help="timed solves per solver")
    parser.add_argument("--cem-repeats", type=int, default=10, help="timed MPC episodes per library")
    parser.add_argument("--trajax-api-repeats", type=int, default=3,
                        help="timed calls of trajax's ilqr without an outer jit (each recompiles)")
    parser.add_argument("--maxiter", type=int, default=300,
                        help="iteration limit of iLQR / DDP (the cart-pole needs about 190)")
    parser.add_argument("--grad-norm-threshold", type=float, default=1e-4)
    parser.add_argument("--population", type=int, default=500)
    parser.add_argument("--horizon", type=int, default=30, help="CEM-MPC planning horizon")
    parser.add_argument("--cem-iterations", type=int, default=5)
    parser.add_argument("--mpc-steps", type=int, default=100, help="steps of each MPC episode")
    parser.add_argument("--worker", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


# ----- the driver (runs in the CLI's process) ----------------------------------------------------

def main(out_dir: Path, argv: list[str]) -> int:
    options = _parser().parse_args(argv)
    started = time.perf_counter()
    trajax_path = peer_path(options.trajax, "TRAJAX_PATH")
    if trajax_path is not None:
        trajax_path = trajax_path.expanduser().resolve()
        if not (trajax_path / "trajax" / "optimizers.py").is_file():
            print(f"forethought bench control: error: --trajax {trajax_path} has no "
                  f"trajax/optimizers.py (give the checkout's root folder)", file=sys.stderr)
            return 2
    try:
        core = pick_core(options.core)
    except UsageError as error:
        print(f"forethought bench control: error: {error}", file=sys.stderr)
        return 2

    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {XLA_FLAGS}".strip()
    env.pop("JAX_ENABLE_X64", None)
    parts = {}
    load_before = os.getloadavg()
    for part in PARTS:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / f"{part}.json"
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", part,
                       "--result", str(result), "--core", str(core)]
            if trajax_path is not None:
                command += ["--trajax", str(trajax_path)]
            for name in ("repeats", "cem_repeats", "trajax_api_repeats", "maxiter",
                         "grad_norm_threshold", "population", "horizon", "cem_iterations",
                         "mpc_steps"):
                command += [f"--{name.replace('_', '-')}", str(getattr(options, name))]
            print(f"[control] part {part}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
            code = subprocess.run(command, env=env).returncode
            if code != 0 or not result.is_file():
                print(f"forethought bench control: error: worker {part!r} failed (exit {code})",
                      file=sys.stderr)
                return code or 1
            parts[part] = json.loads(result.read_text())

    record = {
        "benchmark": "control",
        "command": " ".join(["forethought", "bench", "control", *argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": {**parts["ilqr"]["machine"], "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "trajax": parts["ilqr"]["trajax"],
        "settings": {"ilqr": parts["ilqr"]["settings"], "cem_mpc": parts["cem"]["settings"]},
        "notes": NOTES,
        "results": {**parts["ilqr"]["results"], **parts["cem"]["results"]},
        "checks": {**parts["ilqr"]["checks"], **parts["cem"]["checks"]},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "control.json").write_text(json.dumps(record, indent=2) + "\n")
    _plot(record, out_dir / "control.png")
    _print_table(record)
    print(f"-> {out_dir / 'control.json'}, {out_dir / 'control.png'} "
          f"({record['wall_seconds']:.0f} s)")
    failed = [name for name, ok in record["checks"].items() if not ok]
    if failed:
        print(f"checks failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


NOTES = [
    "maxiter 300 rather than trajax's test's 100: the cart-pole needs about 190 iterations "
    "(with 100 both libraries stop at the same unconverged 251.18); the acrobot and the "
    "pendulum converge long before either limit.",
    "Stopping, matched: maxiter, grad_norm_threshold, alpha_0 1, alpha_min 5e-5, halving line "
    "search; ours relative_cost_threshold=0 (its default is 10 float eps), trajax "
    "obj_step_threshold=0 (its default). Remaining differences: trajax tests the gradient of "
    "the iterate *before* its last step (so it runs one more iteration than needed) and stops "
    "when a line search fails; ours tests the gradient at the returned controls and, when a "
    "line search fails, raises a Levenberg-Marquardt term on Q_uu and retries (mu starts at 0, "
    "so on these problems both take plain Gauss-Newton steps).",
    "iterations: ours counts backward pass + line search rounds; trajax counts its loop body "
    "runs, the same thing.",
    "grad_norm is |dJ/dU| of the returned controls, recomputed by the benchmark with jax.grad "
    "of one shared objective for both libraries; objective likewise.",
    "trajax has no DDP: acrobot_ddp shows ours only (compare with trajax's iLQR on acrobot).",
    "trajax_api: trajax.optimizers.ilqr called without an outer jax.jit builds new closures "
    "each call, which its jit treats as new static arguments: every call retraces and "
    "recompiles. The ratios use trajax_jit, the fast way to call it.",
    "CEM-MPC: matched hyperparameters (trajax's fixed initial std (upper - lower) / 2, "
    "evolution smoothing 0.1, elite fraction 0.1, white noise); ours returns the final elite "
    "mean, trajax the smoothed mean. Dynamics evaluations counted as steps * iterations * "
    "population * horizon (the final rollouts of the mean are left out).",
]


# ----- the workers (fresh processes, pinned, XLA_FLAGS in the environment) ------------------------

def _worker(options) -> int:
    os.sched_setaffinity(0, {options.core})
    assert "jax" not in sys.modules, "the worker must set up before JAX is imported"
    import jax

    jax.config.update("jax_enable_x64", options.worker == "ilqr")
    jax.config.update("jax_enable_compilation_cache", False)
    trajax = None
    if options.trajax is not None:
        sys.path.insert(0, str(options.trajax))
        from trajax import optimizers as trajax  # noqa: F811  (the user's checkout)
    record = {"settings": {}, "results": {}, "checks": {}}
    if options.worker == "ilqr":
        _bench_ilqr(options, trajax, record)
    else:
        _bench_cem(options, trajax, record)
    record["machine"] = machine_info(options.core)
    record["trajax"] = _trajax_info(options)
    options.result.write_text(json.dumps(record, indent=2))
    return 0



def _trajax_info(options) -> dict:
    if options.trajax is None:
        return {"available": False,
                "skipped": "no --trajax PATH and no TRAJAX_PATH: trajax was not run"}
    version = None
    try:
        text = (options.trajax / "trajax" / "version.py").read_text()
        version = text.split("__version__", 1)[1].split("=", 1)[1].strip().splitlines()[0].strip("'\"")
    except (OSError, IndexError):
        pass
    return {"available": True, "path": str(options.trajax), "version": version,
            "source": "google/trajax checkout imported from --trajax (not installed, not vendored)"}


def _block(tree):
    import jax

    return jax.block_until_ready(tree)


def _measure(runners: dict, repeats: int) -> tuple[dict, dict, dict]:
    """First call, one untimed warm call, then `repeats` interleaved timed calls of each runner.
    Returns (outputs of the first calls, first-call seconds, timed seconds per runner)."""
    outputs, first = {}, {}
    for name, run in runners.items():
        start = time.perf_counter()
        outputs[name] = _block(run())
        first[name] = time.perf_counter() - start
        _block(run())
        print(f"  {name}: first call {first[name]:.2f} s", file=sys.stderr, flush=True)
    names = list(runners)
    times = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            _block(runners[name]())
            times[name].append(time.perf_counter() - start)
    return outputs, first, times


def _timing(first: float, times: list[float]) -> dict:
    median = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [median, median, median]
    return {"solve_seconds_median": median, "solve_seconds_q25": q[0], "solve_seconds_q75": q[2],
            "solve_seconds_min": min(times), "repeats": len(times), "first_call_seconds": first,
            "compile_seconds": max(first - median, 0.0)}


def _problems():
    """The three iLQR problems as (name, cost, dynamics, x0, U0, goal), trajax's convention."""
    import jax.numpy as jnp

    from forethought import systems
    from forethought.systems.cartpole import CartPole

    def quadratic_problem(system, goal, Q, R, Qf, T):
        goal, Q, Qf = (jnp.asarray(a, jnp.float64) for a in (goal, Q, Qf))

        def cost(x, u, t):
            e = x - goal
            stage = 0.5 * (e @ (Q * e) + R * (u @ u))
            return jnp.where(t == T, 0.5 * (e @ (Qf * e)), stage)

        def dynamics(x, u, t):
            return system.dynamics(x, u, t)

        return cost, dynamics, goal

    acrobot = systems.make("acrobot")
    T = acrobot.horizon
    a_goal = jnp.asarray(acrobot.goal, jnp.float64)

    def acrobot_cost(x, u, t):
        d = x - a_goal
        terminal = 0.5 * acrobot.terminal_weight * (d @ d)
        stage = 0.5 * acrobot.state_weight * (d @ d) + 0.5 * acrobot.action_weight * (u @ u)
        return jnp.where(t == T, terminal, stage)

    def acrobot_dynamics(x, u, t):
        return acrobot.dynamics(x, u, t)

    pendulum = systems.make("pendulum")
    p_cost, p_dyn, p_goal = quadratic_problem(pendulum, (jnp.pi, 0.0), (1.0, 0.1), 0.01,
                                              (100.0, 10.0), 100)
    cartpole = CartPole.control_benchmark(gravity=9.81, friction=0.0)
    c_cost, c_dyn, c_goal = quadratic_problem(cartpole, (0.0, jnp.pi, 0.0, 0.0),
                                              (1.0, 1.0, 0.1, 0.1), 0.01,
                                              (100.0, 100.0, 10.0, 10.0), 100)
    z = lambda *shape: jnp.zeros(shape, jnp.float64)  # noqa: E731
    problems = {
        "acrobot": (acrobot_cost, acrobot_dynamics, z(4), z(T, 1), a_goal),
        "pendulum": (p_cost, p_dyn, z(2), z(100, 1), p_goal),
        "cartpole": (c_cost, c_dyn, z(4), z(100, 1), c_goal),
    }
    descriptions = {
        "acrobot": "systems.make('acrobot'): Euler dt 0.1, T 50, terminal 0.5*1000|x_T-goal|^2, "
                   "stage 0.5*0.1|x-goal|^2 + 0.5*0.01|u|^2, goal (pi,0,0,0), x0 0, U0 0",
        "pendulum": "systems.make('pendulum') dynamics (m 1, l 1, g 9.81, b 0.1, RK4 dt 0.05), "
                    "T 100, stage 0.5(e'Qe + 0.01u^2) Q diag(1,0.1), terminal 0.5 e'Qf e "
                    "Qf diag(100,10), e = x - (pi,0) unwrapped, x0 0, U0 0",
        "cartpole": "CartPole.control_benchmark(gravity=9.81, friction=0): cart 1, point pole 0.1 "
                    "at 0.5, RK4 dt 0.05, T 100, Q diag(1,1,0.1,0.1), R 0.01, "
                    "Qf diag(100,100,10,10), e = x - (0,pi,0,0) unwrapped, x0 0, U0 0",
    }
    return problems, descriptions


def _shared_objective(cost, dynamics, x0):
    """J(U) and |dJ/dU| in trajax's convention, one implementation for both libraries' answers."""
    import jax
    import jax.numpy as jnp

    def objective(U):
        def step(x, inputs):
            u, t = inputs
            return dynamics(x, u, t), cost(x, u, t)

        T = U.shape[0]
        x_T, stage = jax.lax.scan(step, x0, (U, jnp.arange(T)))
        return stage.sum() + cost(x_T, jnp.zeros_like(U[0]), T)

    return jax.jit(lambda U: (objective(U), jnp.linalg.norm(jax.grad(objective)(U))))


def _bench_ilqr(options, trajax, record) -> None:
    import numpy as np

    from forethought.control.ilqr import ddp, ilqr

    common = dict(maxiter=options.maxiter, grad_norm_threshold=options.grad_norm_threshold,
                  alpha_0=1.0, alpha_min=5e-5)
    ours_kw = dict(common, relative_cost_threshold=0.0, alpha_shrink=0.5)
    trajax_kw = dict(common, obj_step_threshold=0.0, relative_grad_norm_threshold=0.0,
                     inputs_step_threshold=0.0, make_psd=False)
    record["settings"] = {"dtype": "float64", "ours": ours_kw, "trajax": trajax_kw,
                          "repeats": options.repeats,
                          "trajax_api_repeats": options.trajax_api_repeats}
    problems, descriptions = _problems()
    for name, (cost, dynamics, x0, U0, goal) in problems.items():
        check = _shared_objective(cost, dynamics, x0)
        J0, g0 = (float(v) for v in check(U0))
        solvers = [("ilqr", ilqr)] + ([("ddp", ddp)] if name == "acrobot" else [])
        for method, solver in solvers:
            key = f"{name}_{method}"
            print(f"[control] {key}", file=sys.stderr, flush=True)
            runners = {
                "ours": lambda solver=solver: solver(cost, dynamics, x0, U0, **ours_kw),
                "ours_jit": _jitted(lambda x0, U0, solver=solver: solver(cost, dynamics, x0, U0,
                                                                         **ours_kw), x0, U0),
            }
            if trajax is not None and method == "ilqr":
                runners["trajax_jit"] = _jitted(
                    lambda x0, U0: trajax.ilqr(cost, dynamics, x0, U0, **trajax_kw), x0, U0)
            outputs, first, times = _measure(runners, options.repeats)
            entry = {"problem": descriptions[name], "initial_objective": J0,
                     "initial_grad_norm": g0}
            for solver_name, out in outputs.items():
                if solver_name.startswith("ours"):
                    U, X, J, iterations = out.u, out.x, out.cost, out.iterations
                    extra = {"converged": bool(out.converged)}
                else:
                    X, U, J, _, _, _, iterations = out
                    extra = {}
                J_check, grad_norm = (float(v) for v in check(U))
                entry[solver_name] = {
                    "objective": float(J), "objective_recomputed": J_check,
                    "grad_norm": grad_norm, "iterations": int(iterations), **extra,
                    "final_state_error": float(np.max(np.abs(np.asarray(X[-1]) - np.asarray(goal)))),
                    **_timing(first[solver_name], times[solver_name])}
            if trajax is not None and method == "ilqr" and options.trajax_api_repeats > 0:
                api = []
                for _ in range(options.trajax_api_repeats):
                    start = time.perf_counter()
                    _block(trajax.ilqr(cost, dynamics, x0, U0, **trajax_kw))
                    api.append(time.perf_counter() - start)
                entry["trajax_api"] = {"solve_seconds_median": statistics.median(api),
                                       "repeats": len(api),
                                       "note": "no outer jit: retraces and recompiles every call"}
            if "trajax_jit" in entry:
                t = entry["trajax_jit"]
                for ours_name in ("ours", "ours_jit"):
                    o = entry[ours_name]
                    entry[f"ratio_{ours_name}_over_trajax"] = {
                        "solve_seconds": o["solve_seconds_median"] / t["solve_seconds_median"],
                        "compile_seconds": (o["compile_seconds"] / t["compile_seconds"]
                                            if t["compile_seconds"] > 0 else None),
                        "objective": o["objective"] / t["objective"]}
            record["results"][key] = entry
            for solver_name in outputs:
                s = entry[solver_name]
                print(f"  {solver_name}: J {s['objective']:.6f}, {s['iterations']} it, |g| "
                      f"{s['grad_norm']:.1e}, {1e3 * s['solve_seconds_median']:.2f} ms, compile "
                      f"{s['compile_seconds']:.2f} s", file=sys.stderr, flush=True)
            for solver_name in outputs:
                s = entry[solver_name]
                record["checks"][f"{key}_{solver_name}_solved"] = bool(
                    s["grad_norm"] <= 10 * options.grad_norm_threshold
                    and abs(s["objective"] - s["objective_recomputed"]) <= 1e-6 * abs(J0))
            if name == "acrobot":
                record["checks"]["acrobot_initial_objective_4959.476212"] = abs(J0 - 4959.476212) < 1e-5
                for solver_name in outputs:
                    record["checks"][f"{key}_{solver_name}_below_51"] = entry[solver_name]["objective"] < 51.0


def _jitted(fn, *args):
    import jax

    compiled = jax.jit(fn)
    return lambda: compiled(*args)


def _bench_cem(options, trajax, record) -> None:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from forethought import systems
    from forethought.control.mpc import MPC, run_mpc
    from forethought.control.shooting import cem
    from forethought.systems.base import wrap_angle

    N, H, I, steps = options.population, options.horizon, options.cem_iterations, options.mpc_steps
    pendulum = systems.make("pendulum")
    lower, upper = pendulum.action_low.astype(jnp.float32), pendulum.action_high.astype(jnp.float32)
    Q = jnp.array([1.0, 0.1], jnp.float32)

    def cost(x, u, t):
        # Time-invariant stage cost; the last plan step's term is cost(x_H, 0, H) in both. The
        # angle error is wrapped here (as the system's own cost): with a 4 N m limit the swing
        # needs pumps, and unwrapped, a 1.5 s plan never starts the first one.
        e = jnp.stack([wrap_angle(x[0] - jnp.pi), x[1]])
        return 0.5 * (e @ (Q * e) + 0.01 * (u @ u))

    def dynamics(x, u, t):
        return pendulum.dynamics(x, u, t)

    x0 = pendulum.initial_state().astype(jnp.float32)
    key = jax.random.PRNGKey(0)
    init_std = (upper - lower) / 2  # trajax's fixed choice
    settings = {"dtype": "float32", "system": "systems.make('pendulum') (RK4 dt 0.05, |u| <= 4)",
                "cost": "0.5 (e'Qe + 0.01 u^2), Q diag(1, 0.1), e = (wrap(theta - pi), theta'); "
                        "plan's last term cost(x_H, 0, H)",
                "population": N, "horizon": H, "iterations": I, "elite_fraction": 0.1,
                "smoothing_alpha": 0.1, "init_std": float(init_std[0]), "noise": "white",
                "mpc_steps": steps, "repeats": options.cem_repeats, "warm_start": "shifted, fill 0"}
    record["settings"] = settings
    controller = MPC(functools.partial(cem, population=N, iterations=I, elite_fraction=0.1,
                                       alpha=0.1, init_std=init_std),
                     cost, dynamics, horizon=H, lower=lower, upper=upper)
    runners = {"ours": lambda: run_mpc(controller, dynamics, x0, steps, key)}
    if trajax is not None:
        _register_static_dict()
        hyper = _StaticDict(sampling_smoothing=0.0, evolution_smoothing=0.1, elite_portion=0.1,
                            max_iter=I, num_samples=N)

        @jax.jit
        def trajax_mpc(x0, key):
            def step(carry, t):
                x, U, key = carry
                key, plan_key = jax.random.split(key)
                _, plan, _ = trajax.cem(cost, dynamics, x, U, lower, upper, random_key=plan_key,
                                        hyperparams=hyper)
                u = plan[0]
                U = jnp.concatenate([plan[1:], jnp.zeros_like(plan[:1])])
                return (dynamics(x, u, t), U, key), (x, u, cost(x, u, t))

            init = (x0, jnp.zeros((H, 1), jnp.float32), key)
            (x_last, _, _), (X, U, costs) = jax.lax.scan(step, init, jnp.arange(steps))
            return jnp.concatenate([X, x_last[None]]), U, costs

        runners["trajax_jit"] = lambda: trajax_mpc(x0, key)
    print("[control] pendulum_cem_mpc", file=sys.stderr, flush=True)
    outputs, first, times = _measure(runners, options.cem_repeats)
    evaluations = steps * I * N * H
    entry = {"problem": f"CEM-MPC swing-up, {steps} steps from hanging at rest",
             "dynamics_evaluations_per_episode": evaluations}
    for name, (X, U, costs) in outputs.items():
        timing = _timing(first[name], times[name])
        theta_error = float((X[-1, 0] - jnp.pi + jnp.pi) % (2 * jnp.pi) - jnp.pi)
        entry[name] = {"episode_cost": float(np.sum(costs)),
                       "final_theta_error": theta_error, "final_theta_dot": float(X[-1, 1]),
                       "ms_per_mpc_step": 1e3 * timing["solve_seconds_median"] / steps,
                       "dynamics_evaluations_per_second": evaluations / timing["solve_seconds_median"],
                       **timing}
        near = np.abs((np.asarray(X[:, 0]) - np.pi + np.pi) % (2 * np.pi) - np.pi) < 0.2
        entry[name]["first_step_within_0.2_rad"] = int(np.argmax(near)) if near.any() else None
        record["checks"][f"pendulum_cem_mpc_{name}_upright"] = abs(theta_error) < 0.2
        print(f"  {name}: episode cost {entry[name]['episode_cost']:.1f}, final |theta err| "
              f"{abs(theta_error):.3f}, {entry[name]['ms_per_mpc_step']:.2f} ms/step, "
              f"{entry[name]['dynamics_evaluations_per_second'] / 1e6:.1f} M evals/s",
              file=sys.stderr, flush=True)
    if "trajax_jit" in entry:
        entry["ratio_ours_over_trajax"] = {
            "solve_seconds": entry["ours"]["solve_seconds_median"]
            / entry["trajax_jit"]["solve_seconds_median"],
            "dynamics_evaluations_per_second": entry["ours"]["dynamics_evaluations_per_second"]
            / entry["trajax_jit"]["dynamics_evaluations_per_second"]}
    record["results"]["pendulum_cem_mpc"] = entry


class _StaticDict(dict):
    """trajax's CEM takes its hyperparameters as a static (hashable) argument: a hashable dict,
    registered as a pytree with no leaves so an outer `jit` keeps it static too."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))


def _register_static_dict() -> None:
    import jax

    jax.tree_util.register_pytree_node(
        _StaticDict, lambda d: ((), tuple(sorted(d.items()))), lambda aux, _: _StaticDict(aux))


# ----- report ------------------------------------------------------------------------------------

LABELS = {"acrobot_ilqr": "acrobot\niLQR", "acrobot_ddp": "acrobot\nDDP (ours only)",
          "pendulum_ilqr": "pendulum\niLQR", "cartpole_ilqr": "cart-pole\niLQR"}
SERIES = [("ours", "ours (API call)", "#1f77b4"), ("ours_jit", "ours (in jax.jit)", "#6baed6"),
          ("trajax_jit", "trajax (in jax.jit)", "#ff7f0e")]


def _plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = record["results"]
    keys = [k for k in LABELS if k in results]

    def group_label(k):
        entry = results[k]
        solved = [(n, entry[n]) for n in ("ours", "trajax_jit") if n in entry]
        objective = " | ".join(f"{s['objective']:.4f}" for _, s in solved)
        iterations = " | ".join(str(s["iterations"]) for _, s in solved)
        return f"{LABELS[k]}\nJ {objective}\n{iterations} it"

    fig, axes = plt.subplots(1, 3, figsize=(17, 6.2), gridspec_kw={"width_ratios": [3, 3, 1.3]})
    width = 0.27
    for ax, field, scale, ylabel, title in (
            (axes[0], "solve_seconds_median", 1e3, "ms per solve (median, log scale)",
             "Time per solve after compilation\n(J: final objective, ours | trajax)"),
            (axes[1], "compile_seconds", 1.0, "seconds (first call - median warm call)",
             "Compile time")):
        for i, (name, label, color) in enumerate(SERIES):
            present = [k for k in keys if name in results[k]]
            if not present:
                continue
            xs = [keys.index(k) + (i - 1) * width for k in present]
            ys = [results[k][name][field] * scale for k in present]
            bars = ax.bar(xs, ys, width, label=label, color=color)
            for bar in bars:
                ax.annotate(f"{bar.get_height():.1f}",
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                            textcoords="offset points")
        ax.set_xticks(range(len(keys)), [group_label(k) for k in keys], fontsize=8.5)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if field == "solve_seconds_median":
            ax.set_yscale("log")
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi * 8)
        else:
            ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
        ax.legend(loc="upper center", ncol=3, fontsize=8)
        ax.grid(axis="y", alpha=0.3, which="both")

    ax = axes[2]
    cem = results.get("pendulum_cem_mpc", {})
    names = [n for n in ("ours", "trajax_jit") if n in cem]
    values = [cem[n]["dynamics_evaluations_per_second"] / 1e6 for n in names]
    bars = ax.bar(range(len(names)), values, 0.6,
                  color=[dict((s[0], s[2]) for s in SERIES)[n] for n in names])
    for bar, n in zip(bars, names):
        ax.annotate(f"{bar.get_height():.1f}\n{cem[n]['ms_per_mpc_step']:.1f} ms/step",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(names)), ["ours" if n == "ours" else "trajax" for n in names])
    ax.set_ylim(0, max(values + [1]) * 1.25)
    ax.set_ylabel("million dynamics evaluations / s")
    s = record["settings"]["cem_mpc"]
    ax.set_title(f"CEM-MPC, pendulum\nN {s['population']}, H {s['horizon']}, "
                 f"{s['iterations']} it", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    m = record["machine"]
    trajax = "" if record["trajax"]["available"] else "  (trajax skipped)"
    fig.suptitle(f"forethought vs trajax on one core ({m['cpu']}), jax {m['jax']}: iLQR / DDP "
                 f"in float64, CEM in float32{trajax}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_table(record: dict) -> None:
    rows = [("problem", "solver", "objective", "iters", "|grad|", "ms/solve", "compile s")]
    for key, entry in record["results"].items():
        for name in ("ours", "ours_jit", "trajax_jit"):
            if name not in entry:
                continue
            s = entry[name]
            if key == "pendulum_cem_mpc":
                rows.append((key, name, f"{s['episode_cost']:.2f}", "-", "-",
                             f"{1e3 * s['solve_seconds_median']:.1f}/ep",
                             f"{s['compile_seconds']:.2f}"))
            else:
                rows.append((key, name, f"{s['objective']:.6f}", str(s["iterations"]),
                             f"{s['grad_norm']:.1e}", f"{1e3 * s['solve_seconds_median']:.2f}",
                             f"{s['compile_seconds']:.2f}"))
        if "trajax_api" in entry:
            rows.append((key, "trajax_api", "-", "-", "-",
                         f"{1e3 * entry['trajax_api']['solve_seconds_median']:.0f}", "(every call)"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    for key, entry in record["results"].items():
        for ratio in ("ratio_ours_over_trajax", "ratio_ours_jit_over_trajax"):
            if ratio in entry:
                r = entry[ratio]
                print(f"{key} {ratio}: time {r['solve_seconds']:.2f}"
                      + (f", compile {r['compile_seconds']:.2f}" if r.get("compile_seconds") else ""))


if __name__ == "__main__":
    _options = _parser().parse_args()
    if _options.worker is None:
        sys.exit(main(Path(__file__).resolve().parent / "results", sys.argv[1:]))
    sys.exit(_worker(_options))
