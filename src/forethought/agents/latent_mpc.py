"""Latent-space MPC: learn a latent model from observations (pixels) and plan in its latent space.

Seed 000, "Latent Space Models", the loop at the end of the section:

    1. run a base policy (uniformly random actions) for `random_episodes` episodes to collect D
    2. learn the encoder g(o_t), the latent dynamics p(s_{t+1} | s_t, a_t), the decoder
       p(o_t | s_t) and the reward model p(r_t | s_t) on chunks of D's episodes
    3. plan through the model: at every step encode the observation (or, with the RSSM, update
       the filtered belief with it), run CEM over action sequences scored by the predicted
       rewards of an open-loop latent rollout
    4. execute the first planned action, observe o' (MPC), warm-start the next plan with the rest
    5. append the episode to D, refit (`train_steps` updates per new episode), repeat from 3

`--pixels` makes the observations the env's rendered frames (`systems.pixels.PixelObservation`:
`image_size` x `image_size`, the last `frames` frames stacked so velocity is visible); without it
the agent learns from the env's own observations (a flat vector, through MLP encoder and decoder,
or images if the env already gives them). `model` picks the notes' single-step deterministic
encoder (`deterministic`) or PlaNet's recurrent state-space model (`rssm`); see
`models/latent.py` for both and their losses.

    forethought run latent-mpc --env pendulum --pixels
    forethought run latent-mpc --env pendulum --pixels --model rssm

Each planning step is one jitted call (belief update, CEM over the latent model, first action and
shifted plan). After each episode a metrics row is logged (the model's losses and
`prediction_error`, the open-loop video prediction error on the new episode before the model
has trained on it, next to `copy_error`, that of repeating its first frame) and a checkpoint is
written (model, optimiser, counters; the episodes in `episodes.npz` beside it). At the end a run
with a folder gets `open_loop_prediction.gif`: real frames beside the model's open-loop
prediction from the same first frame(s) and actions.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Callable, Literal

import equinox as eqx
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np

from forethought import faults
from forethought._io import atomic_write_bytes
from forethought.agents.base import EpisodeClock, MemoryRun, RunLike, episode_key, episode_seed, run_episode
from forethought.control.mpc import shift_plan
from forethought.control.shooting import cem_search
from forethought.errors import ForethoughtError
from forethought.faults import keep_finite
from forethought.models import latent
from forethought.models.latent import DeterministicLatent, EpisodeStore, LatentSpec, LossWeights, TrainSettings, Trainer
from forethought.systems.gym import system_of
from forethought.systems.pixels import ActionRepeat, PixelObservation

EPISODES_FILE = "episodes.npz"
GIF_FILE = "open_loop_prediction.gif"

FIGURES = [
    {"name": "latent_model.png", "title": "latent model: open-loop prediction error on each new episode",
     "lines": [("prediction_error", "model (open loop)", "C0"), ("copy_error", "copy the first frame", "C1")],
     "ylabel": "mean squared error per observation entry"},
]


@dataclasses.dataclass(frozen=True)
class Config:
    """Latent-space model MPC (seed 000): encoder, latent dynamics, decoder, reward; CEM in latent space.

    The defaults are the settings of `forethought bench latent` (pendulum from 32x32 pixels)."""

    episodes: int = 24
    """Episodes in all, the random ones included."""
    pixels: bool = False
    """Learn from the env's rendered frames instead of its observations."""
    image_size: int = 32
    """Frame size with --pixels (32 or 64; 32 keeps a CPU run to minutes)."""
    frames: int = 2
    """Frames stacked per observation with --pixels (2 or more show velocity)."""
    model: Literal["deterministic", "rssm"] = "deterministic"
    """The notes' single-step deterministic encoder, or PlaNet's recurrent state-space model."""
    random_episodes: int = 3
    """Episodes of uniformly random actions before the first fit (at most `episodes - 1`)."""
    latent: int = 16
    """Latent size (the RSSM's stochastic state)."""
    deter: int = 64
    """RSSM: size of the deterministic (GRU) state."""
    embed: int = 128
    """RSSM: size of the observation embedding."""
    hidden: int = 128
    """Units of the dynamics, reward, prior and posterior networks' hidden layers."""
    depth: int = 8
    """Channels of the first convolution (doubled per layer)."""
    chunk: int = 10
    """Steps per training chunk (sequences cut from whole episodes)."""
    batch_size: int = 16
    """Chunks per minibatch."""
    train_steps: int = 100
    """Adam updates per episode collected."""
    learning_rate: float = 1e-3
    """Adam learning rate."""
    grad_clip: float = 100.0
    """Global gradient-norm clip."""
    image_std: float = 1.0
    """Std of the reconstruction likelihood (observations normalised; images to [-0.5, 0.5])."""
    latent_std: float = 0.1
    """Deterministic model: std of the latent transition likelihood."""
    reward_std: float = 0.1
    """Std of the reward likelihood."""
    overshooting: float = 1.0
    """Deterministic model: weight of the open-loop latent and reward terms (0: the notes' loss)."""
    free_nats: float = 3.0
    """RSSM: KL per step below this is free."""
    horizon: int = 15
    """Planning horizon (steps of the model: `action_repeat` env steps each)."""
    population: int = 100
    """Action sequences per CEM iteration."""
    iterations: int = 4
    """CEM iterations per step."""
    elite_fraction: float = 0.1
    """Fraction of the population kept as elites."""
    alpha: float = 0.1
    """CEM smoothing: weight of the previous mean and std in each refit."""
    noise_beta: float = 2.0
    """Colour of CEM's sampling noise along time (0 white; 2 iCEM's)."""
    explore_noise: float = 0.2
    """Gaussian noise added to executed actions while collecting, in units of half the action range."""
    action_repeat: int = 2
    """Env steps each chosen action is held for (PlaNet's action repeat); the model and the planner
    step `action_repeat` env steps at a time."""
    video_steps: int = 30
    """Steps (of the model) of open-loop prediction scored each episode and drawn in the GIF."""

    def __post_init__(self):
        checks = {"episodes": 2, "frames": 1, "latent": 1, "deter": 1, "embed": 1, "hidden": 1, "depth": 1, "chunk": 1,
                  "batch_size": 1, "train_steps": 1, "horizon": 1, "population": 2, "iterations": 1,
                  "video_steps": 1, "action_repeat": 1}
        for name, minimum in checks.items():
            if getattr(self, name) < minimum:
                raise ForethoughtError(f"{name} must be >= {minimum}, got {getattr(self, name)}")
        if self.random_episodes < 1:
            raise ForethoughtError(f"random_episodes must be >= 1, got {self.random_episodes}")
        if self.image_size not in latent.SIZES:
            raise ForethoughtError(f"image_size must be one of {latent.SIZES}, got {self.image_size}")
        if not 0 < self.elite_fraction <= 1:
            raise ForethoughtError(f"elite_fraction must be in (0, 1], got {self.elite_fraction}")
        for name in ("learning_rate", "grad_clip", "image_std", "latent_std", "reward_std"):
            if not getattr(self, name) > 0:
                raise ForethoughtError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("overshooting", "free_nats", "explore_noise"):
            if getattr(self, name) < 0:
                raise ForethoughtError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def random(self) -> int:
        """The random episodes run: `random_episodes`, leaving at least one planned episode."""
        return min(self.random_episodes, self.episodes - 1)

    @property
    def context(self) -> int:
        """Observed frames before an open-loop prediction (the RSSM filters a few)."""
        return 1 if self.model == "deterministic" else 5


@dataclasses.dataclass(frozen=True)
class Result:
    returns: list[float]
    env_steps: int
    model: latent.LatentModel
    policy: Callable[[np.ndarray, int], np.ndarray]
    """`policy(observation, t) -> action`: MPC through the final model, on the agent's env
    (`prepare_env`). With --pixels on a built-in system it also accepts the plain env's raw state,
    one env step at a time (it renders the frames itself and holds each action `action_repeat`
    steps), so the CLI can record an episode of the plain env."""


# ----- planning -------------------------------------------------------------------------------

class LatentPlanner:
    """`act(model, belief, prev_action, obs, U, key) -> (u, U_next, belief_next, ok)`: one jitted
    call per step. The belief is the latent state: `g(o_t)` for the deterministic model, the RSSM's
    filtered state after `prev_action` and `o_t` (posterior mean). The compiled call is shared by
    planners of equal configs (the config is its static argument)."""

    def __init__(self, config: Config, low: np.ndarray, high: np.ndarray):
        self.config = config
        self.lower, self.upper = jnp.asarray(low, jnp.float32), jnp.asarray(high, jnp.float32)
        self.fill = (self.lower + self.upper) / 2
        c = config
        self.search = (c.population, max(1, int(round(c.population * c.elite_fraction))), c.iterations, c.alpha,
                       c.noise_beta)

    def initial_plan(self) -> jax.Array:
        return jnp.broadcast_to(self.fill, (self.config.horizon, self.fill.shape[0]))

    def act(self, model, belief, prev_action, obs, U, key):
        return _act(self.search, self.lower, self.upper, model, belief, prev_action, obs, U, key)


def belief_update(model, belief, prev_action, obs):
    """The latent state after observing `obs` (raw): `g(o)`, or the RSSM's posterior mean."""
    x = model.normalize(obs)
    if isinstance(model, DeterministicLatent):
        return model.encode(x)
    return model.observe(belief, prev_action, model.encoder(x))[0]


def plan_costs(model, s0):
    """`evaluate(U_batch [N, H, m], key) -> [N]`: minus the predicted rewards of each plan rolled out
    open loop in latent space from `s0` (the RSSM samples its prior, one draw per plan and step)."""
    deterministic = isinstance(model, DeterministicLatent)

    def total_cost(U, key):
        def step(s, inputs):
            u, k = inputs
            if deterministic:
                return model.step(s, u), -model.predict_reward(s, u)
            s_next = model.imagine(s, u, k)
            return s_next, -model.predict_reward(s_next)

        return jax.lax.scan(step, s0, (U, jax.random.split(key, U.shape[0])))[1].sum()

    def evaluate(U_batch, key):
        return jax.vmap(total_cost)(U_batch, jax.random.split(key, U_batch.shape[0]))

    return evaluate


@eqx.filter_jit
def _act(search: tuple, lower, upper, model, belief, prev_action, obs, U, key):
    population, elites, iterations, alpha, noise_beta = search
    fill = (lower + upper) / 2
    belief = belief_update(model, belief, prev_action, obs)
    U_new, history = cem_search(plan_costs(model, belief), U, key, lower, upper, population=population,
                                elites=elites, iterations=iterations, alpha=alpha,
                                init_std=(upper - lower) / 4, noise_beta=noise_beta)
    U_new, ok = keep_finite(U_new, U, jnp.all(jnp.isfinite(history[-1])))
    return U_new[0], shift_plan(U_new, fill), belief, ok


# ----- env and model --------------------------------------------------------------------------

def _env_name(env: gymnasium.Env) -> str:
    return env.spec.id if env.spec else type(env.unwrapped).__name__


def prepare_env(env: gymnasium.Env, config: Config) -> gymnasium.Env:
    """`env` as the agent sees it: actions repeated `action_repeat` times, pixel observations
    with --pixels; checked spaces."""
    name = _env_name(env)
    space = env.action_space
    if not isinstance(space, gymnasium.spaces.Box) or len(space.shape) != 1:
        raise ForethoughtError(f"env {name}: latent-mpc needs a flat Box action space, got {space}")
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        raise ForethoughtError(f"env {name}: the action space must be bounded, got {space}")
    if config.pixels and isinstance(env, PixelObservation):
        raise ForethoughtError(f"env {name} already has pixel observations; leave --pixels off")
    if config.action_repeat > 1:
        env = ActionRepeat(env, config.action_repeat)
    if config.pixels:
        return PixelObservation(env, size=config.image_size, frames=config.frames)
    obs = env.observation_space
    images = (isinstance(obs, gymnasium.spaces.Box) and len(obs.shape) == 3 and obs.shape[0] == obs.shape[1]
              and obs.shape[0] in latent.SIZES)
    if not isinstance(obs, gymnasium.spaces.Box) or not (len(obs.shape) == 1 or images):
        raise ForethoughtError(f"env {name}: latent-mpc needs flat Box observations or square images of size "
                               f"{latent.SIZES} (or --pixels), got {obs}")
    return env


def model_spec(config: Config, env: gymnasium.Env) -> LatentSpec:
    return LatentSpec(tuple(env.observation_space.shape), int(env.action_space.shape[0]), kind=config.model,
                      latent=config.latent, deter=config.deter, hidden=config.hidden, depth=config.depth,
                      embed=config.embed)


def train_settings(config: Config) -> TrainSettings:
    return TrainSettings(learning_rate=config.learning_rate, grad_clip=config.grad_clip,
                         batch_size=config.batch_size, length=config.chunk, steps=config.train_steps,
                         weights=LossWeights(image_std=config.image_std, latent_std=config.latent_std,
                                             reward_std=config.reward_std, overshooting=config.overshooting,
                                             free_nats=config.free_nats))


def prediction(model, obs: np.ndarray, actions: np.ndarray, context: int, steps: int):
    """`(truth, predicted)`: observations `obs[context : context + steps]` of an episode and the
    model's open-loop prediction of them from `obs[:context]` and the actions."""
    steps = min(steps, len(actions) - context + 1)
    if steps < 1:
        raise ForethoughtError(f"prediction: the episode ({len(actions)} steps) is shorter than the context {context}")
    pred, _ = latent.open_loop(model, jnp.asarray(obs[: context + steps]), jnp.asarray(actions[: context + steps - 1]),
                               context)
    return np.asarray(obs[context: context + steps]), np.asarray(pred)


def prediction_errors(model, obs, actions, context: int, steps: int) -> tuple[float, float]:
    """Mean squared error per observation entry of the open-loop prediction and of repeating the
    last observed frame (images in [0, 1]; vectors in the model's normalised units)."""
    truth, pred = prediction(model, obs, actions, context, steps)
    last = np.asarray(obs[context - 1])
    if model.spec.images:
        scale = 255.0
        truth, pred, last = truth / scale, pred / scale, last / scale
    else:
        s = np.asarray(model.obs_scale)
        truth, pred, last = truth / s, pred / s, last / s
    return float(np.mean((pred - truth) ** 2)), float(np.mean((last[None] - truth) ** 2))


def prediction_frames(model, obs, actions, context: int, steps: int, scale: int | None = None) -> list[np.ndarray]:
    """GIF frames of open-loop video prediction: the real newest frame (left) beside the
    predicted one (right), enlarged to about 128 pixels per panel, with the observed context frames
    shown on both sides first and a red bar under predicted frames."""
    truth, pred = prediction(model, obs, actions, context, steps)

    def newest(x):  # the newest RGB frame of a stack (grey for images without 3k channels)
        x = np.asarray(x)
        return x[..., -3:] if x.shape[-1] % 3 == 0 else np.repeat(x[..., -1:], 3, axis=-1)

    real = [newest(o) for o in obs[:context]] + [newest(t) for t in truth]
    guess = [newest(o) for o in obs[:context]] + [newest(p) for p in pred]
    scale = scale or max(1, 128 // real[0].shape[0])
    frames = []
    for i, (a, b) in enumerate(zip(real, guess)):
        a, b = (np.repeat(np.repeat(x, scale, 0), scale, 1) for x in (a, b))
        gap = np.full((a.shape[0], 4, 3), 255, np.uint8)
        frame = np.concatenate([a, gap, b], axis=1)
        bar = np.full((6, frame.shape[1], 3), 255, np.uint8)
        if i >= context:
            bar[:, a.shape[1] + 4:] = (214, 40, 40)
        frames.append(np.concatenate([frame, bar], axis=0))
    return frames


def write_gif(frames: list[np.ndarray], path: Path, fps: float = 10.0) -> Path:
    """uint8 RGB frames as a looping GIF, written atomically."""
    from PIL import Image

    images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(int(1000 / fps), 20), loop=0)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def _save_store(run: RunLike, store: EpisodeStore) -> None:
    path = getattr(run, "path", None)
    if path is not None:
        store.save(path / EPISODES_FILE)


def _restore_store(run: RunLike, meta: dict, store: EpisodeStore) -> EpisodeStore:
    path = getattr(run, "path", None)
    if path is None or not (path / EPISODES_FILE).exists():
        return store
    saved = EpisodeStore.load(path / EPISODES_FILE)
    saved.truncate(min(int(meta["stored_episodes"]), len(saved)))
    return saved


def _repeat_wrapper(env: gymnasium.Env) -> ActionRepeat | None:
    while isinstance(env, gymnasium.Wrapper):
        if isinstance(env, ActionRepeat):
            return env
        env = env.env
    return None


# ----- the loop -------------------------------------------------------------------------------

def train(config: Config, env: gymnasium.Env, key: jax.Array, run: RunLike | None = None) -> Result:
    """Run the loop of the module docstring on `env` (wrapped in pixels with `config.pixels`)."""
    run = run or MemoryRun()
    agent_env = prepare_env(env, config)
    system = system_of(env)
    spec = model_spec(config, agent_env)
    trainer = Trainer(train_settings(config))
    planner = LatentPlanner(config, agent_env.action_space.low, agent_env.action_space.high)
    model = latent.create(spec, jax.random.fold_in(key, 7))
    opt_state = trainer.init(model)
    store = EpisodeStore(spec.obs_shape, agent_env.observation_space.dtype, spec.action_dim)

    state = {"episode": np.int64(0), "env_steps": np.int64(0), "fitted": np.int64(0), "elapsed": np.float64(0.0)}
    returns: list[float] = []
    restored = run.load_checkpoint({"state": state, "model": model, "opt": opt_state})
    if restored is not None:
        saved, meta = restored
        state, model, opt_state = saved["state"], saved["model"], saved["opt"]
        returns = list(meta.get("returns", []))
        store = _restore_store(run, meta, store)
    start, env_steps, fitted = int(state["episode"]), int(state["env_steps"]), int(state["fitted"])
    clock = EpisodeClock(float(state["elapsed"]))
    low, high = agent_env.action_space.low, agent_env.action_space.high

    def mpc_policy(model, key, where, explore: float = 0.0, render=None):
        box = {}

        def policy(obs, t):
            if t == 0:
                box.update(U=planner.initial_plan(), key=key, belief=jnp.zeros(spec.state_size),
                           prev=jnp.zeros(spec.action_dim), stack=None)
            obs = np.asarray(obs)
            if render is not None and obs.shape != spec.obs_shape:  # the plain env, one step at a time
                if t % config.action_repeat:
                    return np.asarray(box["prev"])  # held, as the agent's env holds it
                obs = render(box, obs)
            box["key"], step_key, noise_key = jax.random.split(box["key"], 3)
            u, box["U"], box["belief"], ok = planner.act(model, box["belief"], box["prev"], jnp.asarray(obs),
                                                         box["U"], step_key)
            if not ok:
                faults.report("latent MPC planner", f"{where} step {t}", "every candidate plan's cost was NaN or "
                              "inf; the last good plan is followed")
            u = np.asarray(u)
            if explore > 0:
                noise = np.asarray(jax.random.normal(noise_key, u.shape)) * explore * (high - low) / 2
                u = np.clip(u + noise, low, high).astype(np.float32)
            box["prev"] = jnp.asarray(u)
            return u

        return policy

    def render_state(box, x):
        """Frames of a raw state for the final policy on the plain env (--pixels, built-in system)."""
        if system is None or np.shape(x) != (system.state_dim,):
            raise ForethoughtError(f"latent-mpc policy: expected observations of shape {spec.obs_shape}, got "
                                   f"{np.shape(x)}")
        frame = np.asarray(system.render(x, config.image_size), np.uint8)
        stack = [frame] * config.frames if box["stack"] is None else box["stack"][1:] + [frame]
        box["stack"] = stack
        return np.concatenate(stack, axis=-1)

    run.progress(config.episodes, start=start)
    try:
        for episode in range(start, config.episodes):
            ep_key = episode_key(key, episode)
            if episode < config.random:
                agent_env.action_space.seed(episode_seed(jax.random.fold_in(key, 1), episode))
                policy = lambda obs, t: agent_env.action_space.sample()  # noqa: E731
            else:
                policy = mpc_policy(model, ep_key, f"episode {episode}", config.explore_noise)
            result = run_episode(agent_env, policy, episode_seed(key, episode))
            repeat = _repeat_wrapper(agent_env)
            env_steps += result.length if repeat is None else repeat.inner_steps
            returns.append(result.total_reward)
            row = {"episode": episode, "env_steps": env_steps, "return": result.total_reward,
                   "length": result.length if repeat is None else repeat.inner_steps}
            if fitted > 0 and result.length >= config.context:  # scored before the model sees it: held out
                row["prediction_error"], row["copy_error"] = prediction_errors(
                    model, result.observations, result.actions, config.context, config.video_steps)
            else:
                row["prediction_error"] = row["copy_error"] = float("nan")
            store.add_episode(result.observations, result.actions, result.rewards)
            losses = {"model_loss": float("nan"), "reconstruction": float("nan"), "reward_loss": float("nan"),
                      "latent_loss": float("nan")}
            if episode + 1 >= config.random and episode + 1 < config.episodes:
                if fitted == 0:
                    model = model.with_normalizer(np.concatenate(store.obs))
                data = store.sequences(config.chunk)
                reports = []
                for call in range(len(store) - fitted):
                    model, opt_state, report = trainer.epoch(model, opt_state, data,
                                                             jax.random.fold_in(ep_key, 100 + call))
                    reports.append({k: float(v) for k, v in report.items()})
                fitted = len(store)
                skipped = int(sum(r["skipped"] for r in reports))
                if skipped:
                    faults.report("latent model fit", f"episode {episode}", f"{skipped} of "
                                  f"{len(reports) * config.train_steps} updates had a non-finite loss and were skipped")
                last = reports[-1]
                losses = {"model_loss": last["loss"], "reconstruction": last["reconstruction"],
                          "reward_loss": last["reward"], "latent_loss": last.get("transition", last.get("kl"))}
            row.update(losses)
            row["wall_seconds"] = round(clock.elapsed, 3)
            run.log(**row)
            state = {"episode": np.int64(episode + 1), "env_steps": np.int64(env_steps), "fitted": np.int64(fitted),
                     "elapsed": np.float64(clock.elapsed)}
            _save_store(run, store)
            run.save_checkpoint({"state": state, "model": model, "opt": opt_state}, episode=episode + 1,
                                returns=returns, stored_episodes=len(store))
    finally:
        run.close_progress()
    path = getattr(run, "path", None)
    if path is not None and spec.images and len(store):
        obs, actions = store.obs[-1], store.actions[-1]
        if len(actions) >= config.context:
            write_gif(prediction_frames(model, obs, actions, config.context, config.video_steps), path / GIF_FILE)
    render = render_state if config.pixels else None
    return Result(returns, env_steps, model,
                  mpc_policy(model, jax.random.fold_in(key, 99), "the final policy's episode", render=render))
