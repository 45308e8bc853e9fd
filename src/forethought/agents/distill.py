"""Policy distillation: one neural student for several tasks, taught by one Gaussian teacher per
task (seed 000, "Global Policy", Distillation; the multi-task actor-mimic case; DAgger, Ross et
al. 2011, for where the student is taught).

    forethought run distill                       # pendulum and cart-pole swing-up, one student
    forethought run distill --env cartpole --tasks cartpole pendulum --no-dagger

Teachers. For each task (a built-in continuous system, its swing-up problem as LQR-FLM and GPS
pose it: `agents.lqr_flm.Problem`, the quadratic cost variant, iLQR's action `v` squashed to the
applied `u = u_max tanh(v / u_max)`), iLQR with the true model from the task's start state gives the
time-varying feedback controller of seed 000's "iLQR" section, made Gaussian as the note does, over
the applied action:

    pi_teacher(u_t | x_t) = N(u_max tanh((û_t + K_t (x_t - x̂_t)) / u_max), sigma^2),
    sigma = teacher_std * u_max

(the feedback law is a `control.kl_lqr.LinearGaussianController`). A teacher is fixed; only the
student learns. The Gaussian is over `u`, not `v`: iLQR drives `v` deep into the tanh's saturation
(the pendulum's `|v|` reaches 20 bounds), where matching `v` would spend the student on differences
that change no applied action.

Student. One MLP for all tasks: its input is the task's state features (sin and cos of angles)
zero-padded to the largest task's, the one-hot task id, and the time feature `t / T` (the
teachers are time-varying), standardised by the first iteration's states; its output, per action
dimension of the largest task, is the mean and log-std of a Gaussian over `u / u_max` (each task's
actions in units of its bound; the KL is invariant under that change of units). Unused action
dimensions are masked out of the loss (`rl.distill.masked_gaussian_kl`). Actions, the student's
and the teachers', are clipped to the bounds when applied (as `SystemEnv` does).

Each iteration (`episodes` of them):

    1. roll out `rollouts` episodes per task from the start state plus `start_std` Gaussian noise:
       of the student, sampling its Gaussian (DAgger, the default), or of the teacher (`dagger=False`,
       behaviour cloning); iteration 0 always rolls out the teachers (no student yet)
    2. label every visited state with its teacher's Gaussian at temperature `T`: the soft target
       of `softmax(z / T)` with `z = log pi_teacher`, which for a Gaussian is
       `N(mean, T sigma^2)` (T = 1: the teacher itself)
    3. aggregate the labelled states with every earlier iteration's, and train the student for
       `epochs` epochs of `D_KL(pi_teacher^T || pi_student)` summed over action dimensions
       (`rl.distill.train_epochs`: Adam, whole epochs in one jitted `lax.scan`)
    4. evaluate: student (mean action) and teacher (mean action) from the same `eval_starts` start
       states per task (drawn once per run), on the true system; the return is minus the cost.

Rollouts run on the tasks' pure-JAX dynamics (what `SystemEnv` steps), vmapped over rollouts, so
an iteration is a few compiled calls. The `env` argument names the task whose student policy
`Result.policy` is (the CLI's final-episode GIF); it must be a built-in env of one of `tasks`.

Each row logs `return` (the student's return averaged over tasks), `teacher_return`,
`return_<task>`, `teacher_return_<task>` and `ratio_<task>` (student return / teacher return: the
ratio of costs, 1 when the student is as good, below 1.1 within 10%), the final epoch's KL and
the dataset size. Task names have `-` replaced by `_` in column names.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Literal

import equinox as eqx
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np

from forethought import faults
from forethought.agents import lqr_flm
from forethought.agents.base import EpisodeClock, MemoryRun, RunLike, episode_key
from forethought.agents.lqr_flm import Problem
from forethought.control.ilqr import ilqr
from forethought.control.kl_lqr import LinearGaussianController
from forethought.errors import ForethoughtError
from forethought.models.ensemble import state_features
from forethought.rl.distill import action_mask, masked_gaussian_kl, pad_actions, task_input, train_epochs
from forethought.systems.gym import make_env, system_of


@dataclasses.dataclass(frozen=True)
class Config:
    """Distillation: one multi-task neural student taught by iLQR Gaussian teachers (DAgger, Gaussian KL)."""

    episodes: int = 8
    """Distillation iterations (each rolls out, labels, aggregates and trains)."""
    tasks: tuple[str, ...] = ("pendulum", "cartpole")
    """Built-in continuous systems, one teacher each; the student serves all of them."""
    teacher: Literal["ilqr"] = "ilqr"
    """The teachers: iLQR's feedback controller with the true model, made Gaussian."""
    teacher_std: float = 0.1
    """The teachers' action std, as a fraction of each task's action bound."""
    temperature: float = 1.0
    """Soft-target temperature `T`: the student matches `softmax(log pi_teacher / T)`, i.e. the
    teacher's Gaussian with its variance times `T`."""
    dagger: bool = True
    """Roll out the student and label its states by the teachers (DAgger); False rolls out the
    teachers (behaviour cloning, which drifts where the student errs)."""
    rollouts: int = 16
    """Rollouts per task and iteration."""
    start_std: float = 0.1
    """Std of the Gaussian noise added to each task's start state (rollouts and evaluation)."""
    eval_starts: int = 8
    """Start states per task on which student and teacher are compared."""
    epochs: int = 50
    """Passes over the aggregated dataset per iteration."""
    batch_size: int = 256
    """Rows per Adam step."""
    learning_rate: float = 1e-3
    """Adam step size."""
    hidden: int = 128
    """Units per hidden layer of the student."""
    layers: int = 2
    """Hidden layers of the student."""

    def __post_init__(self):
        for name, minimum in {"episodes": 1, "rollouts": 1, "eval_starts": 1, "epochs": 1, "batch_size": 1,
                              "hidden": 1, "layers": 1}.items():
            if getattr(self, name) < minimum:
                raise ForethoughtError(f"{name} must be >= {minimum}, got {getattr(self, name)}")
        for name in ("teacher_std", "temperature", "learning_rate"):
            if not getattr(self, name) > 0:
                raise ForethoughtError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.start_std >= 0:
            raise ForethoughtError(f"start_std must be >= 0, got {self.start_std}")
        if self.teacher != "ilqr":
            raise ForethoughtError(f"teacher must be 'ilqr', got {self.teacher!r}")
        if isinstance(self.tasks, str) or len(self.tasks) == 0:
            raise ForethoughtError(f"tasks must be a non-empty list of built-in system names, got {self.tasks!r}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ForethoughtError(f"tasks must not repeat a task, got {self.tasks!r}")
        from forethought import systems
        for task in self.tasks:
            if task not in systems.names():
                raise ForethoughtError(f"tasks: unknown task {task!r}; expected built-in systems such as "
                                       f"{', '.join(systems.names())}")


class Student(eqx.Module):
    """The multi-task Gaussian policy: `[features, one-hot task, t / T] -> (mean, log_std) [M]`,
    actions in units of each task's bound. `shift` and `scale` standardise the input (set from
    the first iteration's states; not trained)."""

    mlp: eqx.nn.MLP
    shift: jax.Array
    scale: jax.Array
    M: int = eqx.field(static=True)

    def __call__(self, inputs):
        out = self.mlp((inputs - jax.lax.stop_gradient(self.shift)) / jax.lax.stop_gradient(self.scale))
        # log-std kept in (-7, 1): far below any teacher's, and no wider than the action bound
        return out[:self.M], -3.0 + 4.0 * jnp.tanh((out[self.M:] + 3.0) / 4.0)


@dataclasses.dataclass(frozen=True)
class Result:
    returns: list[float]
    """The student's return (mean over tasks and evaluation starts) after each iteration."""
    env_steps: int
    student: Student
    student_returns: dict[str, float]
    """Per task: the student's mean return over the evaluation starts, after the last iteration."""
    teacher_returns: dict[str, float]
    """... and the teacher's, from the same starts."""
    ratios: dict[str, float]
    """Per task: student return / teacher return (1: as good; <= 1.1: within 10%)."""
    policy: Callable[[np.ndarray, int], np.ndarray]
    """`policy(observation, t) -> action`: the student's mean for the `env` argument's task."""


class Task:
    """One task: its problem, teacher, and what rolls out, labels and scores on it, inside one
    student layout (`F` padded features, `K` tasks, `M` padded actions)."""

    def __init__(self, index: int, name: str, env: gymnasium.Env, config: Config):
        self.index, self.name = index, name
        self.column = name.replace("-", "_")
        self.problem = Problem(lqr_flm.Config(cost="quadratic", squash=True), env, agent="distill")
        p = self.problem
        self.system, self.T, self.n, self.m = p.system, p.T, p.n, p.m
        self.u_max = p.u_max
        self.angles = tuple(p.system.angles)
        self.features = state_features(jnp.zeros(self.n), self.angles).shape[0]
        solution = ilqr(p.cost, p.dynamics, jnp.asarray(p.x0), jnp.zeros((self.T, self.m)),
                        terminal_cost=p.terminal_cost, maxiter=300)
        if not bool(jnp.all(jnp.isfinite(solution.u))):
            raise ForethoughtError(f"distill: iLQR found no finite teacher for task {name!r}")
        # iLQR's gains are NaN only if no backward pass about its trajectory was positive definite
        # (`v` so deep in the tanh's saturation that `Q_uu` underflows): then that step has no feedback
        finite = jnp.all(jnp.isfinite(solution.K), axis=(1, 2), keepdims=True)
        K = jnp.where(finite, solution.K, 0.0)
        # the note's feedback controller û_t + K_t (x_t - x̂_t) in iLQR's squashed v, absolute form K x + k
        self.feedback = LinearGaussianController(
            K=K, k=solution.u - jnp.einsum("tmn,tn->tm", K, solution.x[:-1]),
            cov=jnp.tile(jnp.eye(self.m), (self.T, 1, 1)))
        self.teacher_std = config.teacher_std
        self.log_std = jnp.log(config.teacher_std) + 0.5 * jnp.log(config.temperature)

    def layout(self, F: int, K: int, M: int) -> None:
        self.F, self.K, self.M = F, K, M

    def inputs(self, x, t):
        """The student's input for state `x [n]` at step `t`."""
        f = task_input(state_features(x, self.angles), self.index, self.K, self.F)
        return jnp.concatenate([f, jnp.asarray([t / self.T], f.dtype)])

    def teacher_mean(self, x, t):
        """The teacher's mean action `u_max tanh(v / u_max)` at `x`, in units of the bound `[m]`."""
        return jnp.tanh(self.feedback.mean(x, t) / self.u_max)

    def act(self, student: Student | None, x, t, eps=None):
        """The applied action `u [m]` at `x`: the student's (or with `student=None` the
        teacher's) mean, or with standard normal `eps [m]` a sample, clipped to the bounds."""
        if student is None:
            mean, std = self.teacher_mean(x, t), self.teacher_std
        else:
            mean, log_std = student(self.inputs(x, t))
            mean, std = mean[:self.m], jnp.exp(log_std[:self.m])
        a = mean if eps is None else mean + std * eps
        return self.u_max * jnp.clip(a, -1.0, 1.0)

    def rollout(self, student: Student | None, x0, eps):
        """States `[T+1, n]` of one episode from `x0` with noise `eps [T, m]`: the student's
        samples, or the teacher's with `student=None`."""
        def step(x, inputs):
            t, e = inputs
            return self.system.dynamics(x, self.act(student, x, t, e), t), x

        x_T, X = jax.lax.scan(step, x0, (jnp.arange(self.T), eps))
        return jnp.concatenate([X, x_T[None]])

    def label(self, X):
        """The supervision of states `X [R, T+1, n]`: student inputs `[R*T, F+K+1]`, the soft
        targets' means and log-stds in units of the bound, and the action mask, `[R*T, M]` each.
        A state that is not finite (a student run that blew up) gets zeros and an all-false mask,
        so it adds nothing to the loss or its gradient."""
        states = X[:, :-1]
        finite = jnp.all(jnp.isfinite(states), axis=-1, keepdims=True)
        states = jnp.where(finite, states, 0.0)
        t = jnp.broadcast_to(jnp.arange(self.T), states.shape[:2])
        inputs = jax.vmap(jax.vmap(self.inputs))(states, t)
        means = pad_actions(jax.vmap(jax.vmap(self.teacher_mean))(states, t), self.M)
        log_std = jnp.full(means.shape, self.log_std, means.dtype)
        mask = jnp.broadcast_to(action_mask(self.m, self.M), means.shape) & finite
        rows = states.shape[0] * self.T
        return {"inputs": inputs.reshape(rows, -1), "mean": means.reshape(rows, self.M),
                "log_std": log_std.reshape(rows, self.M), "mask": mask.reshape(rows, self.M)}

    def cost(self, student: Student | None, x0):
        """The cost of the student's (or teacher's) mean run from `x0` on the true system."""
        def step(x, t):
            u = self.act(student, x, t)
            return self.system.dynamics(x, u, t), self.system.cost(x, u, t)

        x_T, costs = jax.lax.scan(step, x0, jnp.arange(self.T))
        return jnp.sum(costs) + self.system.terminal_cost(x_T)


def _kl_rows(student: Student, batch):
    """Per-row `D_KL(pi_teacher^T || pi_student)` over the task's own action dimensions."""
    mean, log_std = jax.vmap(student)(batch["inputs"])
    return masked_gaussian_kl(batch["mean"], batch["log_std"], mean, log_std, batch["mask"])


def train(config: Config, env: gymnasium.Env, key: jax.Array, run: RunLike | None = None) -> Result:
    with jax.enable_x64(True):
        return _train(config, env, key, run or MemoryRun())


def _tasks(config: Config, env: gymnasium.Env) -> tuple[list[Task], int]:
    """The tasks (the `env` argument's own env for its task) and the index of `env`'s task."""
    system = system_of(env)
    name = system.name if system is not None else (env.spec.id if env.spec else type(env.unwrapped).__name__)
    if name not in config.tasks:
        raise ForethoughtError(f"distill needs --env to be one of its tasks {list(config.tasks)} (it names the "
                               f"task whose student policy the result acts with), got env {name!r}")
    tasks = [Task(i, task, env if task == name else make_env(task), config) for i, task in enumerate(config.tasks)]
    F = max(t.features for t in tasks)
    M = max(t.m for t in tasks)
    for t in tasks:
        t.layout(F, len(tasks), M)
    return tasks, config.tasks.index(name)


def _train(config: Config, env: gymnasium.Env, key: jax.Array, run: RunLike) -> Result:
    tasks, own = _tasks(config, env)
    F, K, M = tasks[0].F, tasks[0].K, tasks[0].M
    R, I = config.rollouts, config.episodes
    capacity = I * R * sum(t.T for t in tasks)
    mlp = eqx.nn.MLP(F + K + 1, 2 * M, config.hidden, config.layers, activation=jnp.tanh,
                     key=jax.random.fold_in(key, 7))
    mlp = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, mlp)
    student = Student(mlp, jnp.zeros(F + K + 1), jnp.ones(F + K + 1), M)
    state = {"iteration": np.int64(0), "env_steps": np.int64(0), "elapsed": np.float64(0.0), "count": np.int64(0),
             "inputs": np.zeros((capacity, F + K + 1)), "mean": np.zeros((capacity, M)),
             "log_std": np.zeros((capacity, M)), "mask": np.zeros((capacity, M), bool)}
    returns: list[float] = []
    restored = run.load_checkpoint({"state": state, "student": student})
    if restored is not None:
        saved, meta = restored
        state, student = saved["state"], saved["student"]
        returns = list(meta.get("returns", []))
    state = {k: np.array(v) for k, v in state.items()}
    clock = EpisodeClock(float(state["elapsed"]))

    # the evaluation starts, one set per task for the whole run
    starts = [t.problem.x0 + config.start_std * jax.random.normal(jax.random.fold_in(key, 0xE7A1 + t.index),
                                                                   (config.eval_starts, t.n)) for t in tasks]
    roll = [eqx.filter_jit(jax.vmap(t.rollout, in_axes=(None, 0, 0))) for t in tasks]
    label = [jax.jit(t.label) for t in tasks]
    evaluate = [eqx.filter_jit(jax.vmap(t.cost, in_axes=(None, 0))) for t in tasks]
    teacher_costs = [np.asarray(evaluate[t.index](None, s)) for t, s in zip(tasks, starts)]

    run.progress(I, start=int(state["iteration"]))
    try:
        for iteration in range(int(state["iteration"]), I):
            it_key = episode_key(key, iteration)
            t0 = time.perf_counter()
            for t in tasks:
                k_start, k_eps = jax.random.split(jax.random.fold_in(it_key, t.index))
                x0 = t.problem.x0 + config.start_std * jax.random.normal(k_start, (R, t.n))
                eps = jax.random.normal(k_eps, (R, t.T, t.m))
                X = roll[t.index](student if config.dagger and iteration > 0 else None, x0, eps)
                rows = label[t.index](X)
                start, stop = int(state["count"]), int(state["count"]) + R * t.T
                for name, values in rows.items():
                    state[name][start:stop] = np.asarray(values)
                state["count"] = np.int64(stop)
                state["env_steps"] = np.int64(int(state["env_steps"]) + R * t.T)
            data = {name: jnp.asarray(state[name]) for name in ("inputs", "mean", "log_std", "mask")}
            if iteration == 0:  # standardise the student's input by the teachers' first states
                used = state["inputs"][:int(state["count"])]
                student = eqx.tree_at(lambda s: (s.shift, s.scale), student,
                                      (jnp.asarray(used.mean(0)), jnp.asarray(np.maximum(used.std(0), 1e-2))))
            student, losses, skipped = train_epochs(student, data, int(state["count"]),
                                                    jax.random.fold_in(it_key, 0x7EA), _kl_rows,
                                                    epochs=config.epochs, batch_size=config.batch_size,
                                                    learning_rate=config.learning_rate)
            if int(skipped) > 0:
                faults.report("distillation student", f"iteration {iteration}",
                              f"{int(skipped)} Adam steps had a non-finite loss or parameters and were skipped")
            update_seconds = time.perf_counter() - t0

            row = {}
            student_costs = [np.asarray(evaluate[t.index](student, s)) for t, s in zip(tasks, starts)]
            for t, sc, tc in zip(tasks, student_costs, teacher_costs):
                row[f"return_{t.column}"] = -float(np.mean(sc))
                row[f"teacher_return_{t.column}"] = -float(np.mean(tc))
                row[f"ratio_{t.column}"] = float(np.mean(sc) / np.mean(tc))
            returns.append(float(np.mean([row[f"return_{t.column}"] for t in tasks])))
            state["iteration"] = np.int64(iteration + 1)
            state["elapsed"] = np.float64(clock.elapsed)
            run.log(episode=iteration, env_steps=int(state["env_steps"]), **{"return": returns[-1]},
                    teacher_return=float(np.mean([row[f"teacher_return_{t.column}"] for t in tasks])), **row,
                    kl=float(losses[-1]), dataset=int(state["count"]), update_seconds=round(update_seconds, 3),
                    wall_seconds=round(clock.elapsed, 3))
            run.save_checkpoint({"state": state, "student": student}, episode=iteration + 1, returns=returns)
    finally:
        run.close_progress()
    student_costs = [np.asarray(evaluate[t.index](student, s)) for t, s in zip(tasks, starts)]
    return Result(returns, int(state["env_steps"]), student,
                  {t.name: -float(np.mean(sc)) for t, sc in zip(tasks, student_costs)},
                  {t.name: -float(np.mean(tc)) for t, tc in zip(tasks, teacher_costs)},
                  {t.name: float(np.mean(sc) / np.mean(tc)) for t, sc, tc in zip(tasks, student_costs, teacher_costs)},
                  _act(tasks[own], student))


def _act(task: Task, student: Student) -> Callable[[np.ndarray, int], np.ndarray]:
    mean = eqx.filter_jit(task.act)

    def act(obs, t):
        with jax.enable_x64(True):
            u = mean(student, jnp.asarray(obs, jnp.float64), jnp.asarray(min(int(t), task.T - 1)))
        return np.asarray(u, np.float32)

    return act


FIGURES = [{
    "name": "distill_ratios.png", "title": "distillation: student cost / teacher cost", "ylabel": "cost ratio",
    "lines": [(f"ratio_{name.replace('-', '_')}", name, f"C{i}-") for i, name in enumerate(
        ("pendulum", "cartpole", "cartpole-balance", "acrobot", "double-integrator", "linear", "mountain-car"))]}]
"""The run folder's own figure: each task's ratio per iteration (tasks the run lacks are skipped;
drawn by the CLI with `experiment.plot.metric_figure`)."""
