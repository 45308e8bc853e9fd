"""Model-based RL with MPC: fit a model, plan through it at every step, act, refit.

Seed 000 "Model-Based RL" (the naive model; data aggregation; replanning with MPC, "version
1.5"; uncertainty-aware models) and seed 002 Algorithm 1 with section 5.1's MPC:

    1. run a random policy for `random_episodes` episodes, adding every transition to the buffer
    2. fit the dynamics model on the whole buffer (aggregation)
    3. for every step of an episode: plan a `horizon`-step action sequence through the model
       with CEM (or MPPI, random shooting), execute its first action, append the transition,
       and warm-start the next plan with the rest of this one
    4. refit after each episode and repeat from 3

`model` chooses what the planner plans through: `"probabilistic"` is PETS (an ensemble of
Gaussian MLPs, particles propagated with TS-infinity), `"deterministic"` the naive model of
seed 000 (an ensemble of MSE-trained MLPs, here one member by default), and `"true"` the
system's own dynamics (no learning: the reference a learned model is measured against).

    forethought run pets --env pendulum
    forethought run mpc --env pendulum
    forethought run pets --env cartpole --model true   # the true-dynamics CEM controller

Costs are the system's own `cost(x, u, t)` (reward = -cost); for a task that ends
(`system.terminates`, e.g. `cartpole-balance`), its known `is_terminal` stops a planned rollout's
cost at the end, as mbrl-lib's termination functions do. Every planning call is one jitted
function of the model's parameters, the state, the previous plan and a key.

A Gymnasium env (`--env gym:InvertedPendulum-v5`) has no known cost: the agent then learns the
reward `r(x, u)` and the termination test `p(done | x')` from the same buffer, refit with the
dynamics after every episode (`models/reward.py`), and plans on the expected `-r` accrued before
the learned end (`learned_ends`);
from Python, `train(..., reward_fn=, termination_fn=)` gives them instead. Observations and actions
must be flat `Box` spaces.

`terminal_value` (`--terminal-value`, off by default) ends each planned rollout with a learned
value of the return after the horizon (seed 003's value function for the tail return;
`models/value.py`, TD(0) on the real transitions, refit after every episode): a one-step planner
with LQR's value as its tail acts as LQR (tests/agents/test_mpc.py). On InvertedPendulum, where
the cart drifts into its rail beyond the horizon, a value fit on 10 episodes' data did not help.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import equinox as eqx
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np

from forethought.agents.base import (Episode, EpisodeClock, MemoryRun, RunLike, episode_key, episode_seed,
                                     restore_buffer, run_episode, save_buffer)
from forethought.control.mpc import shift_plan
from forethought.control.shooting import cem_search, mppi_search, rollout_costs, shooting_search
from forethought import faults
from forethought.errors import ForethoughtError
from forethought.faults import keep_finite
from forethought.models.ensemble import Ensemble, EnsembleSpec, particle_cost
from forethought.models.reward import LearnedTask
from forethought.models.value import StateValue, ValueTrainConfig
from forethought.models.train import FitReport, TrainConfig, evaluate, fit, fit_many
from forethought.models.train import stack as train_stack
from forethought.rl.buffer import ReplayBuffer
from forethought.systems.gym import system_of


@dataclasses.dataclass(frozen=True)
class Config:
    """MPC through a learned model (PETS by default)."""

    episodes: int = 10
    """Episodes in all, the random ones included."""
    model: Literal["probabilistic", "deterministic", "true"] = "probabilistic"
    """What to plan through: a probabilistic ensemble (PETS), a deterministic one, or the true dynamics."""
    random_episodes: int = 1
    """Episodes of uniformly random actions before the first fit."""
    planner: Literal["cem", "mppi", "random"] = "cem"
    """The sampling planner: CEM, MPPI or random shooting."""
    horizon: int = 30
    """Planning horizon (steps)."""
    population: int = 100
    """Action sequences evaluated per planner iteration."""
    iterations: int = 3
    """CEM / MPPI iterations per step."""
    elite_fraction: float = 0.1
    """CEM: fraction of the population kept as elites."""
    alpha: float = 0.1
    """CEM smoothing: weight of the previous mean and std in each refit."""
    noise_beta: float = 2.0
    """Colour of the sampling noise along time (0 white; 2 the iCEM choice)."""
    mppi_lambda: float = 1.0
    """MPPI temperature, in units of cost."""
    particles: int = 5
    """Particles per action sequence (probabilistic model); with TS-infinity, one per member by
    default: on the pendulum this reached the true-model return as fast as 10 or 20 did, at a
    fraction of the compute."""
    learned_ends: Literal["expected", "threshold"] = "expected"
    """Gymnasium envs with a learned end test: plan on the expected cost under the learned end
    probability (plans that keep away from the edge rank higher), or stop a particle's cost where
    the probability passes 0.5."""
    planning_matmuls: Literal["float32", "bfloat16"] = "float32"
    """Input type of the model's matrix products while planning (float32 accumulation either
    way); bfloat16 planned about 2x faster on a CPU with AMX (benchmarks/pets_speed.py)."""
    training_matmuls: Literal["float32", "bfloat16"] = "float32"
    """Input type of the model fit's matrix products, forward and backward (float32 weights and
    accumulation either way); bfloat16 trained an epoch 1.7x faster on a CPU with AMX
    (`TrainConfig.matmul_dtype`, benchmarks/results/models.json)."""
    terminal_value: bool = False
    """End each planned rollout with a learned value of the return after the horizon
    (`models.value.StateValue`, TD(0) on the real transitions, refit with the model): plans are
    ranked by what the closed loop has earned from where they end, not only within the horizon."""
    value_discount: float = 0.99
    """Discount of the terminal value's return."""
    propagation: Literal["ts_inf", "ts1", "expectation"] = "ts_inf"
    """How particles move through the ensemble: fixed member (TS-inf), resampled each step (TS1), or the mean."""
    members: int = 5
    """Ensemble members (a deterministic model defaults to 1 through `deterministic_members`)."""
    deterministic_members: int = 1
    """Members of a deterministic model (1 is seed 000's single naive network)."""
    hidden: int = 200
    """Units per hidden layer."""
    layers: int = 3
    """Hidden layers per member."""
    learning_rate: float = 1e-3
    """Adam(W) learning rate of the model fit."""
    weight_decay: float = 3e-5
    """Decoupled weight decay of the model fit."""
    batch_size: int = 64
    """Minibatch size per member."""
    max_epochs: int = 100
    """Most epochs per refit (early stopping usually ends sooner)."""
    patience: int = 5
    """Epochs without a 1% held-out improvement before a refit stops."""

    def __post_init__(self):
        checks = {"episodes": 1, "horizon": 1, "population": 2, "iterations": 1, "particles": 1,
                  "members": 1, "deterministic_members": 1, "hidden": 1, "layers": 1, "batch_size": 1,
                  "max_epochs": 1}
        for name, minimum in checks.items():
            if getattr(self, name) < minimum:
                raise ForethoughtError(f"{name} must be >= {minimum}, got {getattr(self, name)}")
        if not 0 <= self.random_episodes < self.episodes or (self.model != "true" and self.random_episodes < 1):
            raise ForethoughtError(f"random_episodes must be >= 1 (>= 0 with --model true) and < episodes "
                                   f"({self.episodes}), got {self.random_episodes}")
        if self.terminal_value and self.random_episodes < 1:
            raise ForethoughtError("terminal_value needs random_episodes >= 1 (the value is fit on them "
                                   f"before the first planned episode), got {self.random_episodes}")
        if not 0 <= self.value_discount < 1:
            raise ForethoughtError(f"value_discount must be in [0, 1), got {self.value_discount}")
        if not 0 < self.elite_fraction <= 1:
            raise ForethoughtError(f"elite_fraction must be in (0, 1], got {self.elite_fraction}")
        if self.model == "probabilistic" and self.propagation == "ts_inf" and self.particles % self.members:
            raise ForethoughtError(f"particles ({self.particles}) must be a multiple of members "
                                   f"({self.members}) for TS-infinity")


@dataclasses.dataclass(frozen=True)
class PETSConfig(Config):
    """PETS: a probabilistic ensemble, TS-infinity particles, CEM (Chua et al. 2018)."""


@dataclasses.dataclass(frozen=True)
class NaiveConfig(Config):
    """The naive model + replanning of seed 000: a deterministic network, MPC with CEM."""

    model: Literal["probabilistic", "deterministic", "true"] = "deterministic"
    """What to plan through: a probabilistic ensemble (PETS), a deterministic one, or the true dynamics."""


@dataclasses.dataclass(frozen=True)
class Result:
    returns: list[float]
    env_steps: int
    model: Ensemble | None
    policy: Callable[[np.ndarray, int], np.ndarray]
    """`policy(observation, t) -> action`: MPC through the final model."""


class Planner:
    """The per-step MPC call, jitted once per run: `act(model, x, U, key) -> (u, U_next)`."""

    def __init__(self, config: Config, system, model_spec: EnsembleSpec | None):
        self.config, self.system = config, system
        self.lower = jnp.asarray(system.action_low, jnp.float32)
        self.upper = jnp.asarray(system.action_high, jnp.float32)
        self.fill = (self.lower + self.upper) / 2
        c = config
        if c.planner == "cem":
            elites = max(1, int(round(c.population * c.elite_fraction)))
            self._search = lambda ev, U, key: cem_search(
                ev, U, key, self.lower, self.upper, population=c.population, elites=elites,
                iterations=c.iterations, alpha=c.alpha, init_std=(self.upper - self.lower) / 4,
                noise_beta=c.noise_beta)
        elif c.planner == "mppi":
            self._search = lambda ev, U, key: mppi_search(
                ev, U, key, self.lower, self.upper, population=c.population, iterations=c.iterations,
                lambda_=c.mppi_lambda, noise_std=(self.upper - self.lower) / 4, noise_beta=c.noise_beta)
        else:
            self._search = lambda ev, U, key: shooting_search(
                ev, U, key, self.lower, self.upper, population=c.population)
        self.act = eqx.filter_jit(self._act)
        self.episodes = eqx.filter_jit(self._episodes)

    def initial_plan(self) -> jax.Array:
        return jnp.broadcast_to(self.fill, (self.config.horizon, self.fill.shape[0]))

    def _evaluate(self, model: Ensemble | tuple[Ensemble | None, LearnedTask | None, StateValue | None] | None,
                  x, key):
        """`cost(U_batch, key) -> [N]` of plans from `x`. `model` is the ensemble (None: the true
        dynamics) or `(ensemble, task, value)`: a learned task and a terminal value travel with the
        model (all three are refit), as traced arguments."""
        system, soft_end, value = self.system, None, None
        if isinstance(model, tuple):
            model, task, value = model
            if task is not None:
                system = task
                if task.termination_fn is None and self.config.learned_ends == "expected":
                    soft_end = task.end_probability
        end = system.is_terminal if system.terminates else None
        if model is None:
            tail = None if value is None else (lambda x: -value(x))
            return lambda U, _: rollout_costs(system.cost, system.dynamics, x, U, terminal_cost=tail, is_terminal=end)
        c = self.config
        particles = c.particles if model.spec.probabilistic else 1
        dynamics = model.as_dynamics(key, particles=particles,
                                     propagation=c.propagation if model.spec.probabilistic else "expectation",
                                     matmul_dtype=None if c.planning_matmuls == "float32" else jnp.bfloat16)
        X0 = jnp.broadcast_to(x, (particles, x.shape[0]))
        tail = None if value is None else (lambda X: -jax.vmap(value)(X))
        if end is None and tail is None:
            return lambda U, _: rollout_costs(particle_cost(system.cost), dynamics, X0, U)
        # per-particle costs, ends and tails, averaged over particles by rollout_costs: a particle
        # that falls stops earning (the known end test)
        per_particle = lambda X, u, t: jax.vmap(system.cost, in_axes=(0, None, None))(X, u, t)  # noqa: E731
        if end is None:
            return lambda U, _: rollout_costs(per_particle, dynamics, X0, U, terminal_cost=tail)
        if soft_end is not None:
            return lambda U, _: rollout_costs(per_particle, dynamics, X0, U, terminal_cost=tail,
                                              end_probability=jax.vmap(soft_end))
        return lambda U, _: rollout_costs(per_particle, dynamics, X0, U, terminal_cost=tail, is_terminal=jax.vmap(end))

    def _act(self, model, x, U, key):
        """`(u, U_next, ok)`: `ok` is false when the plan's cost came out NaN or inf (a model that
        blew up); the last good plan `U` is then followed instead (a fault to report)."""
        plan_key, model_key = jax.random.split(key)
        U_new, history = self._search(self._evaluate(model, x, model_key), U, plan_key)
        U_new, ok = keep_finite(U_new, U, jnp.all(jnp.isfinite(history[-1])))
        return U_new[0], shift_plan(U_new, self.fill), ok


    def _episodes(self, model, x0, key, actions):
        """Whole episodes of the system, one per seed, as `train`'s env would run them for the
        system's horizon (no early end: the caller cuts each at its first terminal state).

        `x0 [S, n]` start states; `model` stacked per seed (or None for the true dynamics); `key
        [S]` each seed's episode key, split step by step as `train`'s policy splits it; `actions
        [S, T, m]` replaces planning (random episodes). Returns states `[S, T+1, n]`, actions `[S,
        T, m]`, costs `[S, T]` (of the clipped actions), terminal flags `[S, T]` and the planner's
        ok flags `[S, T]`.
        """
        system = self.system

        def one(model, x0, key, actions):
            def step(carry, t):
                x, U, key = carry
                if actions is None:
                    key, step_key = jax.random.split(key)
                    u, U, ok = self._act(model, x, U, step_key)
                else:
                    u, ok = actions[t], jnp.bool_(True)
                clipped = jnp.clip(u, self.lower, self.upper)
                x_next = system.dynamics(x, clipped, t)
                return (x_next, U, key), (x_next, u, system.cost(x, clipped, t), system.is_terminal(x_next), ok)

            _, (X, U, costs, ends, ok) = jax.lax.scan(step, (x0, self.initial_plan(), key),
                                                      jnp.arange(system.horizon))
            return jnp.concatenate([x0[None], X]), U, costs, ends, ok

        return eqx.filter_vmap(one)(model, x0, key, actions)


def _check_env(env: gymnasium.Env, config: Config, key: jax.Array, reward_fn, termination_fn):
    """The built-in system behind `env`, or a `LearnedTask` for a Gymnasium env with flat Box spaces."""
    system = system_of(env)
    if system is not None:
        if reward_fn is not None or termination_fn is not None:
            raise ForethoughtError("reward_fn and termination_fn are for Gymnasium envs; a built-in "
                                   f"system ({system.name}) has its own cost")
        return system
    name = env.spec.id if env.spec else type(env.unwrapped).__name__
    spaces = {"observation": env.observation_space, "action": env.action_space}
    for what, space in spaces.items():
        if not isinstance(space, gymnasium.spaces.Box) or len(space.shape) != 1:
            raise ForethoughtError(f"env {name}: the MPC agents support flat Box observation and action "
                                   f"spaces; its {what} space is {space}")
    if not (np.all(np.isfinite(env.action_space.low)) and np.all(np.isfinite(env.action_space.high))):
        raise ForethoughtError(f"env {name}: the action space must be bounded, got {env.action_space}")
    if config.model == "true":
        raise ForethoughtError(f"--model true plans through a built-in system's dynamics; env {name} has none")
    return LearnedTask.create(env.observation_space.shape[0], env.action_space.low, env.action_space.high,
                              jax.random.fold_in(key, 5), reward_fn=reward_fn, termination_fn=termination_fn)


@dataclasses.dataclass
class _Seed:
    """One seed's loop: its key and run, what its checkpoint holds, its buffer, returns and clock."""

    key: jax.Array
    run: RunLike
    model: Ensemble | None
    task: LearnedTask | None
    value: StateValue | None
    buffer: ReplayBuffer
    returns: list[float]
    episode: int = 0
    env_steps: int = 0
    clock: EpisodeClock = dataclasses.field(default_factory=EpisodeClock)

    @classmethod
    def restore(cls, key: jax.Array, run: RunLike, model: Ensemble | None, task: LearnedTask | None,
                value: StateValue | None, buffer: ReplayBuffer) -> "_Seed":
        """The loop as `run`'s checkpoint left it, or a fresh one from `model`, `task`, `value`, `buffer`."""
        state = {"episode": np.int64(0), "env_steps": np.int64(0), "elapsed": np.float64(0.0)}
        restored = run.load_checkpoint({"state": state, "model": model, "task": task, "value": value})
        if restored is None:
            return cls(key, run, model, task, value, buffer, [])
        saved, meta = restored
        state = saved["state"]
        return cls(key, run, saved["model"], saved["task"], saved["value"], restore_buffer(run, meta, buffer),
                   list(meta.get("returns", [])), int(state["episode"]), int(state["env_steps"]),
                   EpisodeClock(float(state["elapsed"])))

    def add(self, result: Episode) -> dict:
        """Put the episode in the buffer; its metrics row so far."""
        self.buffer.add_episode(result.observations, result.actions, result.rewards, result.terminated)
        self.env_steps += result.length
        self.returns.append(result.total_reward)
        return {"episode": self.episode, "env_steps": self.env_steps, "return": result.total_reward,
                "length": result.length}

    def finish(self, row: dict, report: FitReport | None) -> None:
        """Log the episode's row and write the buffer and the checkpoint that covers it."""
        if report is not None:
            row.update(model_epochs=report.epochs, model_holdout_loss=report.holdout_loss[-1])
        else:
            row.update(model_epochs=0, model_holdout_loss=float("nan"))
        row["wall_seconds"] = round(self.clock.elapsed, 3)
        self.run.log(**row)
        self.episode += 1
        state = {"episode": np.int64(self.episode), "env_steps": np.int64(self.env_steps),
                 "elapsed": np.float64(self.clock.elapsed)}
        save_buffer(self.run, self.buffer)
        self.run.save_checkpoint({"state": state, "model": self.model, "task": self.task, "value": self.value},
                                 episode=self.episode,
                                 returns=self.returns, buffer_transitions=len(self.buffer))

    def refits(self, config: Config) -> bool:
        """Whether the model is refit after the current episode (from the last random one on,
        and not after the final episode)."""
        return self.model is not None and config.random_episodes <= self.episode + 1 < config.episodes


def _setup(config: Config, system) -> tuple[EnsembleSpec | None, TrainConfig, Planner]:
    spec = None
    if config.model != "true":
        probabilistic = config.model == "probabilistic"
        spec = EnsembleSpec(system.state_dim, system.action_dim,
                            members=config.members if probabilistic else config.deterministic_members,
                            hidden=config.hidden, layers=config.layers, angles=tuple(system.angles),
                            probabilistic=probabilistic)
    train_config = TrainConfig(learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                               batch_size=config.batch_size, max_epochs=config.max_epochs,
                               patience=config.patience, matmul_dtype=config.training_matmuls)
    return spec, train_config, Planner(config, system, spec)


def _start(config: Config, spec: EnsembleSpec | None, key: jax.Array, run: RunLike, task: LearnedTask | None,
           system) -> _Seed:
    model = Ensemble.create(spec, jax.random.fold_in(key, 7)) if spec else None
    value = (StateValue.create(system.state_dim, jax.random.fold_in(key, 11), gamma=config.value_discount)
             if config.terminal_value else None)
    return _Seed.restore(key, run, model, task, value, ReplayBuffer(system.state_dim, system.action_dim))


def _mpc_policy(planner: Planner, model, task, key: jax.Array, where: str, value: StateValue | None = None):
    """`policy(obs, t) -> action`: MPC through `model` (with the learned `task` and the terminal
    `value`, if any), its keys split from `key` step by step; a plan that came out NaN or inf is a
    reported fault."""
    if task is not None or value is not None:
        model = (model, task, value)
    box = {"U": planner.initial_plan(), "key": key}

    def policy(obs, t):
        box["key"], step_key = jax.random.split(box["key"])
        u, box["U"], ok = planner.act(model, jnp.asarray(obs, jnp.float32), box["U"], step_key)
        if not ok:
            faults.report("MPC planner", f"{where} step {t}", "every candidate plan's cost was "
                          "NaN or inf; the last good plan is followed")
        return np.asarray(u)

    return policy


def train(config: Config, env: gymnasium.Env, key: jax.Array, run: RunLike | None = None, *,
          reward_fn: Callable | None = None, termination_fn: Callable | None = None) -> Result:
    """Run the loop of the module docstring; `reward_fn(x, u) -> r` and `termination_fn(x') ->
    bool` (JAX-traceable) stand in for the learned ones on a Gymnasium env."""
    run = run or MemoryRun()
    system = _check_env(env, config, key, reward_fn, termination_fn)
    spec, train_config, planner = _setup(config, system)
    seed = _start(config, spec, key, run, system if isinstance(system, LearnedTask) else None, system)

    run.progress(config.episodes, start=seed.episode)
    try:
        while seed.episode < config.episodes:
            episode = seed.episode
            ep_key = episode_key(key, episode)
            if episode < config.random_episodes:
                env.action_space.seed(episode_seed(jax.random.fold_in(key, 1), episode))
                policy = lambda obs, t: env.action_space.sample()  # noqa: E731
            else:
                policy = _mpc_policy(planner, seed.model, seed.task, ep_key, f"episode {episode}", seed.value)
            row = seed.add(run_episode(env, policy, episode_seed(key, episode)))
            report = None
            refit_value = seed.value is not None and config.random_episodes <= episode + 1 < config.episodes
            if refit_value or seed.refits(config):
                data = seed.buffer.all()
            if refit_value:
                seed.value = seed.value.fit(data.obs, data.reward, data.next_obs, data.terminated,
                                            jax.random.fold_in(ep_key, 6), ValueTrainConfig())
            if seed.refits(config):
                seed.model, report = fit(seed.model, data.obs, data.action, data.next_obs,
                                         jax.random.fold_in(ep_key, 3), train_config)
                if seed.task is not None:
                    seed.task = seed.task.fit(data.obs, data.action, data.reward, data.next_obs, data.terminated,
                                              jax.random.fold_in(ep_key, 4))
            seed.finish(row, report)
    finally:
        run.close_progress()
    return Result(seed.returns, seed.env_steps, seed.model,
                  _mpc_policy(planner, seed.model, seed.task, jax.random.fold_in(key, 99), "the final policy's episode",
                              seed.value))


def train_vectorized(config: Config, env: gymnasium.Env, keys: list[jax.Array],
                     runs: list[RunLike] | None = None) -> list[Result]:
    """`train` for several seeds (`keys`, one run each) as one vmapped program: every episode of
    all seeds is one jitted call (the planner and the system stepped inside a `lax.scan` over the
    episode's steps, `vmap`ped over seeds) and every refit one vmapped fit (`fit_many`).

    Built-in systems only (the episode runs on the system's own JAX dynamics, with `env` used for
    its initial states and random actions, drawn from the same seeds as `train`). Each seed's run
    gets the rows and checkpoints `train` writes, so a seed's numbers match its `train` run up to
    floating-point reassociation in the batched matrix products. Resuming seeds whose checkpoints
    are at different episodes (a kill between two seeds' writes) first brings the late ones level.
    A planner fault is reported after the episode in which it happened.
    """
    system = system_of(env)
    if system is None:
        name = env.spec.id if env.spec else type(env.unwrapped).__name__
        raise ForethoughtError(f"vectorized runs need a built-in system's JAX dynamics; env {name} has none "
                               "(run its seeds as separate trials instead)")
    if len(keys) == 0:
        raise ForethoughtError("train_vectorized: expected at least one key")
    if config.terminal_value:
        raise ForethoughtError("terminal_value is not vectorized yet: run the seeds without --vectorize")
    runs = list(runs) if runs is not None else [MemoryRun() for _ in keys]
    if len(runs) != len(keys):
        raise ForethoughtError(f"train_vectorized: expected a run per key, got {len(runs)} runs for {len(keys)} keys")
    spec, train_config, planner = _setup(config, system)
    seeds = [_start(config, spec, key, run, None, system) for key, run in zip(keys, runs)]

    runs[0].progress(config.episodes, start=min(s.episode for s in seeds))
    try:
        while (episode := min(s.episode for s in seeds)) < config.episodes:
            group = [s for s in seeds if s.episode == episode]
            x0 = jnp.stack([jnp.asarray(env.reset(seed=episode_seed(s.key, episode))[0]) for s in group])
            ep_keys = jnp.stack([episode_key(s.key, episode) for s in group])
            actions = None
            if episode < config.random_episodes:
                actions = jnp.stack([_random_actions(env, episode_seed(jax.random.fold_in(s.key, 1), episode),
                                                     system.horizon) for s in group])
            models = train_stack([s.model for s in group]) if spec else None
            X, U, costs, ends, ok = (np.asarray(a) for a in planner.episodes(models, x0, ep_keys, actions))
            rows = [s.add(_episode_from(X[i], U[i], costs[i], ends[i], ok[i], system, f"episode {episode}"))
                    for i, s in enumerate(group)]
            reports = [None] * len(group)
            refit = [i for i, s in enumerate(group) if s.refits(config)]
            if refit:
                data = [group[i].buffer.all() for i in refit]
                fitted, fit_reports = fit_many([group[i].model for i in refit],
                                               [(d.obs, d.action, d.next_obs) for d in data],
                                               [jax.random.fold_in(ep_keys[i], 3) for i in refit], train_config)
                for i, model, report in zip(refit, fitted, fit_reports):
                    group[i].model, reports[i] = model, report
            for s, row, report in zip(group, rows, reports):
                s.finish(row, report)
    finally:
        runs[0].close_progress()
    return [Result(s.returns, s.env_steps, s.model,
                   _mpc_policy(planner, s.model, None, jax.random.fold_in(s.key, 99), "the final policy's episode"))
            for s in seeds]


def _random_actions(env: gymnasium.Env, seed: int, steps: int) -> np.ndarray:
    """The `steps` actions a random episode of `train` draws after `action_space.seed(seed)`."""
    env.action_space.seed(seed)
    return np.stack([env.action_space.sample() for _ in range(steps)])


def _episode_from(X, U, costs, ends, ok, system, where: str) -> Episode:
    """One seed's episode from a batched rollout over the full horizon, cut after its first
    terminal state as the env would end it; a non-finite state or plan is handled as `train`
    handles it (an error and a reported fault)."""
    T = len(costs)
    hits = np.flatnonzero(ends)
    length = int(hits[0]) + 1 if hits.size else T
    if not np.all(np.isfinite(X[: length + 1])):
        step = int(np.argmin(np.all(np.isfinite(X[: length + 1]), axis=1))) - 1
        raise ForethoughtError(f"{system.name}: the state became non-finite at step {step} ({where})")
    bad = np.flatnonzero(~ok[:length])
    if bad.size:
        faults.report("MPC planner", f"{where} step {int(bad[0])}", "every candidate plan's cost was NaN or inf; "
                      "the last good plan is followed")
    return Episode(X[: length + 1], U[:length], -costs[:length].astype(np.float64), bool(hits.size), not hits.size)


def model_report(model: Ensemble, buffer: ReplayBuffer) -> dict[str, float]:
    data = buffer.all()
    return evaluate(model, data.obs, data.action, data.next_obs)
