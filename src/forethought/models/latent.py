"""Latent space models: learn a small state from observations, and dynamics and reward in it.

Seed 000, "Latent Space Models". For complex observations `o_t` (images) the model learns, apart,

- `p(o_t | s_t)`: high-dimensional but not dynamic (the decoder),
- `p(s_{t+1} | s_t, a_t)`: low-dimensional but dynamic (the latent dynamics),
- `p(r_t | s_t)`: the reward model,

and an encoder `q_psi(s_t | o_{1:T}, a_{1:T})` standing in for the posterior over latent states.
Two encoders of the notes' list are built:

**`DeterministicLatent`**: the single-step deterministic encoder `s_t = g_psi(o_t)` of the notes,
trained on their objective

    max sum_t  log p_phi(g(o_{t+1}) | g(o_t), a_t)  +  log p_phi(o_t | g(o_t))  +  log p_phi(r_t | g(o_t))

with Gaussian likelihoods of fixed standard deviations (`latent_std`, `image_std`,
`reward_std`), so each term is a scaled squared error. Two choices of ours: the reward model
also sees the action (`r_t = r(s_t, a_t)`: the built-in systems charge for the action), and the
encoder's output is normalised (zero mean, unit variance over its units) so the transition term
cannot be won by shrinking every latent to a point. With `overshooting > 0` the loss also
scores the model's open-loop predictions `s_hat_{t+k}` (rolled from `g(o_0)` over the chunk)
against `g(o_{t+k})` and the rewards: what a planner uses is the multi-step prediction, and the
one-step terms alone leave its errors to compound (PlaNet's "overshooting", on the latent mean).

**`RSSM`**: PlaNet's recurrent state-space model (Hafner et al. 2019), a filtering encoder
`q(s_t | o_{<=t}, a_{<t})`. The state is a deterministic GRU state `h_t` and a stochastic
`z_t`; `h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}])`, prior `p(z_t | h_t)`, posterior
`q(z_t | h_t, e(o_t))`, decoder `p(o_t | h_t, z_t)`, reward `p(r_{t-1} | h_t, z_t)` (the reward
of the step that led there). Loss: the negative ELBO, reconstruction + reward + `KL(q || p)`
per step, each KL clipped below at `free_nats`.

Observations are images `[H, W, C]` (`uint8`, `H = W` in `SIZES`: convolutional encoder and
decoder; `C` may be several stacked frames) or flat vectors `[n]` (MLP encoder and decoder).
`obs_shift` / `obs_scale` map them to the network's input: `(o - 127.5) / 255` for images, the
data's mean and std for vectors (`with_normalizer`).

Training (`Trainer`) fits on chunks of `length` consecutive steps drawn from whole episodes
(`SequenceData`): one jitted call runs `steps` Adam updates as a `lax.scan`, each on a minibatch
of chunks sampled inside the call; a step whose loss or new parameters are not finite is thrown
away and counted.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from forethought._io import atomic_write_bytes
from forethought.errors import ForethoughtError
from forethought.faults import keep_finite

SIZES = (32, 64)
"""Image sizes the convolutional stacks are built for: 4x4 after log2(size / 4) stride-2 layers."""


@dataclasses.dataclass(frozen=True)
class LatentSpec:
    """The shape of a latent model."""

    obs_shape: tuple[int, ...]
    """`(size, size, channels)` for images, `(n,)` for vectors."""
    action_dim: int
    kind: Literal["deterministic", "rssm"] = "deterministic"
    latent: int = 16
    """Latent size (`DeterministicLatent`); the stochastic state `z` of the RSSM."""
    deter: int = 64
    """RSSM: size of the deterministic (GRU) state `h`."""
    hidden: int = 128
    """Units of the hidden layers of the dynamics, reward, prior and posterior networks."""
    depth: int = 16
    """Channels of the first convolution (doubling each layer); units of the vector encoder / 8."""
    embed: int = 128
    """RSSM: size of the observation embedding `e(o_t)`."""
    min_std: float = 0.1
    """RSSM: floor of the prior and posterior standard deviations."""

    def __post_init__(self):
        shape = tuple(int(s) for s in self.obs_shape)
        object.__setattr__(self, "obs_shape", shape)
        if self.images:
            if shape[0] != shape[1] or shape[0] not in SIZES or shape[2] < 1:
                raise ForethoughtError(f"LatentSpec: image observations must be [size, size, channels] with size "
                                       f"in {SIZES}, got obs_shape {shape}")
        elif len(shape) != 1 or shape[0] < 1:
            raise ForethoughtError(f"LatentSpec: obs_shape must be (size, size, channels) or (n,), got {shape}")
        if self.kind not in ("deterministic", "rssm"):
            raise ForethoughtError(f"LatentSpec: kind must be 'deterministic' or 'rssm', got {self.kind!r}")
        for name in ("action_dim", "latent", "deter", "hidden", "depth", "embed"):
            if int(getattr(self, name)) < 1:
                raise ForethoughtError(f"LatentSpec: {name} must be >= 1, got {getattr(self, name)}")

    @property
    def images(self) -> bool:
        return len(self.obs_shape) == 3

    @property
    def state_size(self) -> int:
        """Size of the flat latent state the planner carries."""
        return self.latent if self.kind == "deterministic" else self.deter + self.latent


# ----- encoder and decoder --------------------------------------------------------------------

class Encoder(eqx.Module):
    """`o [H, W, C]` (normalised) -> `[out]`: stride-2 4x4 convolutions down to 4x4, then a linear
    layer; or, for vectors, a two-layer MLP."""

    convs: list
    head: eqx.Module
    images: bool = eqx.field(static=True)

    def __init__(self, spec: LatentSpec, out: int, key):
        keys = jax.random.split(key, 8)
        self.images = spec.images
        if spec.images:
            size, channels = spec.obs_shape[0], spec.obs_shape[2]
            layers = int(np.log2(size // 4))
            widths = [channels] + [spec.depth * 2**i for i in range(layers)]
            self.convs = [eqx.nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1, key=keys[i])
                          for i in range(layers)]
            self.head = eqx.nn.Linear(widths[-1] * 16, out, key=keys[-1])
        else:
            self.convs = []
            self.head = eqx.nn.MLP(spec.obs_shape[0], out, 8 * spec.depth, 2, jax.nn.elu, key=keys[-1])

    def __call__(self, o):
        if not self.images:
            return self.head(o)
        x = jnp.transpose(o, (2, 0, 1))
        for conv in self.convs:
            x = jax.nn.elu(conv(x))
        return self.head(x.reshape(-1))


class Decoder(eqx.Module):
    """`[in] -> o [H, W, C]` (normalised): the mirror of `Encoder` (transposed convolutions)."""

    head: eqx.Module
    deconvs: list
    images: bool = eqx.field(static=True)
    top: int = eqx.field(static=True)

    def __init__(self, spec: LatentSpec, inp: int, key):
        keys = jax.random.split(key, 8)
        self.images = spec.images
        if spec.images:
            size, channels = spec.obs_shape[0], spec.obs_shape[2]
            layers = int(np.log2(size // 4))
            widths = [spec.depth * 2**i for i in reversed(range(layers))] + [channels]
            self.top = widths[0]
            self.head = eqx.nn.Linear(inp, self.top * 16, key=keys[-1])
            self.deconvs = [eqx.nn.ConvTranspose2d(widths[i], widths[i + 1], 4, stride=2, padding=1, key=keys[i])
                            for i in range(layers)]
        else:
            self.top = 0
            self.head = eqx.nn.MLP(inp, spec.obs_shape[0], 8 * spec.depth, 2, jax.nn.elu, key=keys[-1])
            self.deconvs = []

    def __call__(self, s):
        if not self.images:
            return self.head(s)
        x = jax.nn.elu(self.head(s)).reshape(self.top, 4, 4)
        for i, deconv in enumerate(self.deconvs):
            x = deconv(x)
            if i < len(self.deconvs) - 1:
                x = jax.nn.elu(x)
        return jnp.transpose(x, (1, 2, 0))


def _normalizer(spec: LatentSpec):
    if spec.images:
        return jnp.full((spec.obs_shape[-1],), 127.5, jnp.float32), jnp.full((spec.obs_shape[-1],), 255.0, jnp.float32)
    return jnp.zeros(spec.obs_shape, jnp.float32), jnp.ones(spec.obs_shape, jnp.float32)


class _Base(eqx.Module):
    def normalize(self, o):
        """Observation(s) `[..., *obs_shape]` (uint8 or float) -> the networks' float32 input."""
        return (jnp.asarray(o, jnp.float32) - self.obs_shift) / self.obs_scale

    def to_observation(self, x):
        """A decoded (normalised) observation back in observation units (uint8 for images)."""
        o = x * self.obs_scale + self.obs_shift
        return jnp.clip(jnp.round(o), 0, 255).astype(jnp.uint8) if self.spec.images else o

    def with_normalizer(self, obs: np.ndarray):
        """The model with `obs_shift` / `obs_scale` set to the mean and std of vector observations
        `obs [N, n]` (images keep their fixed map)."""
        if self.spec.images:
            return self
        obs = np.asarray(obs, np.float64).reshape(-1, self.spec.obs_shape[0])
        shift = jnp.asarray(obs.mean(0), jnp.float32)
        scale = jnp.asarray(np.maximum(obs.std(0), 1e-3), jnp.float32)
        return eqx.tree_at(lambda m: (m.obs_shift, m.obs_scale), self, (shift, scale))


# ----- the deterministic model of the notes ---------------------------------------------------

class DeterministicLatent(_Base):
    """`s = g(o)`, `s' = s + f(s, a)`, `o ~ N(d(s), image_std^2)`, `r ~ N(r(s, a), reward_std^2)`."""

    spec: LatentSpec = eqx.field(static=True)
    encoder: Encoder
    decoder: Decoder
    transition: eqx.nn.MLP
    reward: eqx.nn.MLP
    obs_shift: jax.Array
    obs_scale: jax.Array

    def __init__(self, spec: LatentSpec, key):
        k = jax.random.split(key, 4)
        self.spec = spec
        self.encoder = Encoder(spec, spec.latent, k[0])
        self.decoder = Decoder(spec, spec.latent, k[1])
        self.transition = eqx.nn.MLP(spec.latent + spec.action_dim, spec.latent, spec.hidden, 2, jax.nn.elu, key=k[2])
        self.reward = eqx.nn.MLP(spec.latent + spec.action_dim, "scalar", spec.hidden, 2, jax.nn.elu, key=k[3])
        self.obs_shift, self.obs_scale = _normalizer(spec)

    def encode(self, x):
        """`g_psi`: a normalised observation -> `s [latent]` (zero mean, unit variance over units)."""
        h = self.encoder(x)
        return (h - h.mean()) / jnp.sqrt(h.var() + 1e-5)

    def step(self, s, a):
        return s + self.transition(jnp.concatenate([s, a]))

    def predict_reward(self, s, a):
        return self.reward(jnp.concatenate([s, a]))

    def decode(self, s):
        return self.decoder(s)


# ----- PlaNet's recurrent state-space model ---------------------------------------------------

class RSSM(_Base):
    """Recurrent state-space model; a state is `concat(h [deter], z [latent])` (module docstring)."""

    spec: LatentSpec = eqx.field(static=True)
    encoder: Encoder
    decoder: Decoder
    pre: eqx.nn.Linear
    cell: eqx.nn.GRUCell
    prior: eqx.nn.MLP
    posterior: eqx.nn.MLP
    reward: eqx.nn.MLP
    obs_shift: jax.Array
    obs_scale: jax.Array

    def __init__(self, spec: LatentSpec, key):
        k = jax.random.split(key, 7)
        self.spec = spec
        size = spec.deter + spec.latent
        self.encoder = Encoder(spec, spec.embed, k[0])
        self.decoder = Decoder(spec, size, k[1])
        self.pre = eqx.nn.Linear(spec.latent + spec.action_dim, spec.hidden, key=k[2])
        self.cell = eqx.nn.GRUCell(spec.hidden, spec.deter, key=k[3])
        self.prior = eqx.nn.MLP(spec.deter, 2 * spec.latent, spec.hidden, 1, jax.nn.elu, key=k[4])
        self.posterior = eqx.nn.MLP(spec.deter + spec.embed, 2 * spec.latent, spec.hidden, 1, jax.nn.elu, key=k[5])
        self.reward = eqx.nn.MLP(size, "scalar", spec.hidden, 2, jax.nn.elu, key=k[6])
        self.obs_shift, self.obs_scale = _normalizer(spec)

    def initial_state(self):
        return jnp.zeros(self.spec.deter + self.spec.latent, jnp.float32)

    def _gaussian(self, out):
        mean, raw = jnp.split(out, 2)
        return mean, jax.nn.softplus(raw) + self.spec.min_std

    def _deter(self, state, a):
        h, z = state[: self.spec.deter], state[self.spec.deter:]
        return self.cell(jax.nn.elu(self.pre(jnp.concatenate([z, a]))), h)

    def imagine(self, state, a, key=None):
        """One prior step: `h' = GRU(h, [z, a])`, `z' ~ p(z' | h')` (its mean when `key` is None)."""
        h = self._deter(state, a)
        mean, std = self._gaussian(self.prior(h))
        z = mean if key is None else mean + std * jax.random.normal(key, mean.shape)
        return jnp.concatenate([h, z])

    def observe(self, state, a, embed, key=None):
        """One filtering step with the new observation's embedding: `(state', (prior, posterior))`,
        `z'` drawn from the posterior (its mean when `key` is None)."""
        h = self._deter(state, a)
        prior = self._gaussian(self.prior(h))
        post = self._gaussian(self.posterior(jnp.concatenate([h, embed])))
        z = post[0] if key is None else post[0] + post[1] * jax.random.normal(key, post[0].shape)
        return jnp.concatenate([h, z]), (prior, post)

    def step(self, s, a):
        return self.imagine(s, a)

    def predict_reward(self, s):
        return self.reward(s)

    def decode(self, s):
        return self.decoder(s)


LatentModel = DeterministicLatent | RSSM


def create(spec: LatentSpec, key) -> LatentModel:
    return DeterministicLatent(spec, key) if spec.kind == "deterministic" else RSSM(spec, key)


# ----- losses ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The likelihoods' fixed standard deviations and the extra terms' weights."""

    image_std: float = 1.0
    """Std of `p(o | s)`: the reconstruction term is `sum((o - d(s))^2) / (2 image_std^2)` per frame
    (observations normalised: images to [-0.5, 0.5])."""
    latent_std: float = 0.1
    """Deterministic model: std of `p(s' | s, a)` in the normalised latent."""
    reward_std: float = 0.1
    """Std of `p(r | s)`."""
    overshooting: float = 1.0
    """Deterministic model: weight of the open-loop (multi-step) latent and reward terms; 0 is the
    notes' loss exactly."""
    free_nats: float = 3.0
    """RSSM: KL per step below this is not penalised (PlaNet)."""


def _sq(x, std):
    return 0.5 * jnp.sum(x * x) / std**2


def deterministic_loss(model: DeterministicLatent, obs, actions, rewards, weights: LossWeights, key=None):
    """Negative log-likelihood of one chunk, `obs [L+1, *obs_shape]` (normalised), `actions [L, m]`,
    `rewards [L]`, per step: `(total, terms)` with `terms` the notes' `transition`,
    `reconstruction`, `reward` and the open-loop `overshooting` term."""
    del key
    s = jax.vmap(model.encode)(obs)
    recon = jax.vmap(lambda s_, o: _sq(model.decode(s_) - o, weights.image_std))(s, obs).mean()
    one_step = jax.vmap(model.step)(s[:-1], actions)
    transition = jax.vmap(lambda p, t: _sq(p - t, weights.latent_std))(one_step, s[1:]).mean()
    r_hat = jax.vmap(model.predict_reward)(s[:-1], actions)
    reward = _sq(r_hat - rewards, weights.reward_std) / rewards.shape[0]
    terms = {"transition": transition, "reconstruction": recon, "reward": reward}
    if weights.overshooting > 0:
        def roll(s_, a):
            return model.step(s_, a), (s_, model.predict_reward(s_, a))

        _, (s_open, r_open) = jax.lax.scan(roll, s[0], actions)
        latent_open = jax.vmap(lambda p, t: _sq(p - t, weights.latent_std))(s_open[1:], s[1:-1]).mean() \
            if actions.shape[0] > 1 else 0.0
        terms["overshooting"] = latent_open + _sq(r_open - rewards, weights.reward_std) / rewards.shape[0]
        total = transition + recon + reward + weights.overshooting * terms["overshooting"]
    else:
        total = transition + recon + reward
    return total, terms


def _kl(post, prior):
    (m1, s1), (m2, s2) = post, prior
    return jnp.sum(jnp.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5)


def rssm_loss(model: RSSM, obs, actions, rewards, weights: LossWeights, key):
    """Negative ELBO of one chunk per step: reconstruction of every `o_t`, reward `r_t` from the
    state after `a_t`, and `max(KL(q_t || p_t), free_nats)`; `(total, terms)`."""
    embeds = jax.vmap(model.encoder)(obs)
    prev_actions = jnp.concatenate([jnp.zeros_like(actions[:1]), actions])
    keys = jax.random.split(key, obs.shape[0])

    def filt(state, inputs):
        a, e, k = inputs
        state, (prior, post) = model.observe(state, a, e, k)
        return state, (state, _kl(post, prior))

    _, (states, kl) = jax.lax.scan(filt, model.initial_state(), (prev_actions, embeds, keys))
    recon = jax.vmap(lambda s_, o: _sq(model.decode(s_) - o, weights.image_std))(states, obs).mean()
    r_hat = jax.vmap(model.predict_reward)(states[1:])
    reward = _sq(r_hat - rewards, weights.reward_std) / rewards.shape[0]
    kl_term = jnp.maximum(kl, weights.free_nats).mean()
    terms = {"kl": kl.mean(), "reconstruction": recon, "reward": reward}
    return recon + reward + kl_term, terms


def loss_fn(model: LatentModel):
    return deterministic_loss if isinstance(model, DeterministicLatent) else rssm_loss


# ----- data: whole episodes, cut into chunks --------------------------------------------------

class SequenceData(NamedTuple):
    """Episodes laid end to end: `obs [N, *obs_shape]`, `actions [N, m]` and `rewards [N]` (row
    `i` is the step taken from `obs[i]`; zeros after an episode's last observation), and
    `starts [S]`, the first rows of every chunk of `length + 1` observations inside one episode
    (`count` of them are real, the rest padding)."""

    obs: jax.Array
    actions: jax.Array
    rewards: jax.Array
    starts: jax.Array
    count: jax.Array


class EpisodeStore:
    """Whole episodes of observations (kept in their own dtype: uint8 frames stay small), actions
    and rewards; saved as `.npz` without pickle."""

    def __init__(self, obs_shape: tuple[int, ...], obs_dtype, action_dim: int):
        self.obs_shape, self.obs_dtype, self.action_dim = tuple(obs_shape), np.dtype(obs_dtype), int(action_dim)
        self.obs: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.rewards: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.obs)

    @property
    def transitions(self) -> int:
        return int(sum(len(r) for r in self.rewards))

    def add_episode(self, obs, actions, rewards) -> None:
        """`obs [T+1, *obs_shape]`, `actions [T, m]`, `rewards [T]`."""
        obs = np.asarray(obs)
        actions = np.asarray(actions, np.float32).reshape(len(actions), -1)
        rewards = np.asarray(rewards, np.float32).reshape(-1)
        T = len(rewards)
        if obs.shape != (T + 1, *self.obs_shape) or actions.shape != (T, self.action_dim):
            raise ForethoughtError(f"add_episode: expected obs [T+1, {', '.join(map(str, self.obs_shape))}] and "
                                   f"actions [T, {self.action_dim}] with T = {T}, got {obs.shape} and {actions.shape}")
        if not (np.all(np.isfinite(actions)) and np.all(np.isfinite(rewards))
                and (obs.dtype == np.uint8 or np.all(np.isfinite(obs)))):
            raise ForethoughtError("add_episode: observations, actions and rewards must be finite")
        self.obs.append(obs.astype(self.obs_dtype))
        self.actions.append(actions)
        self.rewards.append(rewards)

    def truncate(self, episodes: int) -> None:
        if not 0 <= episodes <= len(self):
            raise ForethoughtError(f"truncate: episodes must be in [0, {len(self)}], got {episodes}")
        del self.obs[episodes:], self.actions[episodes:], self.rewards[episodes:]

    def sequences(self, length: int) -> SequenceData:
        """The episodes as `SequenceData` for chunks of `length` steps; rows and starts are padded
        to powers of two so that a growing store rarely recompiles the training call."""
        if not self.obs:
            raise ForethoughtError("sequences: the store holds no episodes")
        lengths = [len(r) for r in self.rewards]
        if max(lengths) < length:
            raise ForethoughtError(f"chunk length {length} is longer than every episode (longest: {max(lengths)} "
                                   "steps); use a shorter chunk")
        rows = sum(n + 1 for n in lengths)
        padded = 1 << (rows - 1).bit_length()
        obs = np.zeros((padded, *self.obs_shape), self.obs_dtype)
        actions = np.zeros((padded, self.action_dim), np.float32)
        rewards = np.zeros((padded,), np.float32)
        starts, offset = [], 0
        for o, a, r in zip(self.obs, self.actions, self.rewards):
            n = len(r)
            obs[offset: offset + n + 1], actions[offset: offset + n], rewards[offset: offset + n] = o, a, r
            starts.extend(range(offset, offset + n - length + 1))
            offset += n + 1
        count = len(starts)
        starts = np.asarray(starts + [0] * ((1 << (count - 1).bit_length()) - count), np.int32)
        return SequenceData(jnp.asarray(obs), jnp.asarray(actions), jnp.asarray(rewards), jnp.asarray(starts),
                            jnp.asarray(count, jnp.int32))

    def save(self, path: Path) -> None:
        arrays = {"obs_shape": np.asarray(self.obs_shape, np.int64), "action_dim": np.asarray(self.action_dim),
                  "obs_dtype": np.frombuffer(self.obs_dtype.str.encode(), np.uint8)}
        for i, (o, a, r) in enumerate(zip(self.obs, self.actions, self.rewards)):
            arrays[f"obs_{i}"], arrays[f"actions_{i}"], arrays[f"rewards_{i}"] = o, a, r
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(Path(path), buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> "EpisodeStore":
        try:
            with np.load(path, allow_pickle=False) as data:
                store = cls(tuple(int(s) for s in data["obs_shape"]), np.dtype(data["obs_dtype"].tobytes().decode()),
                            int(data["action_dim"]))
                i = 0
                while f"obs_{i}" in data.files:
                    store.obs.append(data[f"obs_{i}"])
                    store.actions.append(data[f"actions_{i}"])
                    store.rewards.append(data[f"rewards_{i}"])
                    i += 1
        except (OSError, ValueError, KeyError) as error:
            raise ForethoughtError(f"episode store {path} is corrupt ({type(error).__name__}: {error})") from None
        return store


# ----- training -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainSettings:
    learning_rate: float = 1e-3
    grad_clip: float = 100.0
    batch_size: int = 16
    """Chunks per minibatch."""
    length: int = 10
    """Steps per chunk."""
    steps: int = 50
    """Adam steps per jitted call."""
    weights: LossWeights = LossWeights()


class Trainer:
    """Fits a latent model: `epoch(model, opt_state, data, key) -> (model, opt_state, report)`,
    `steps` minibatch updates in one jitted `lax.scan` (module docstring). `report` holds the
    mean loss and terms over the call and the number of skipped (non-finite) steps. The compiled
    call is shared by every trainer with equal settings (they are its static argument)."""

    def __init__(self, settings: TrainSettings):
        self.settings = settings
        self.optimizer = _optimizer(settings)

    def init(self, model: LatentModel):
        return self.optimizer.init(eqx.filter(model, eqx.is_array))

    def epoch(self, model, opt_state, data: SequenceData, key):
        return _epoch(self.settings, model, opt_state, data, key)

    def batch_loss(self, model, obs, actions, rewards, key):
        return batch_loss(self.settings, model, obs, actions, rewards, key)


def _optimizer(settings: TrainSettings):
    return optax.chain(optax.clip_by_global_norm(settings.grad_clip), optax.adam(settings.learning_rate))


def batch_loss(settings: TrainSettings, model, obs, actions, rewards, key):
    """Mean loss and terms of a batch of chunks `obs [B, L+1, ...]` (raw observations)."""
    loss = loss_fn(model)
    keys = jax.random.split(key, obs.shape[0])
    totals, terms = jax.vmap(lambda o, a, r, k: loss(model, model.normalize(o), a, r, settings.weights, k))(
        obs, actions, rewards, keys)
    return totals.mean(), jax.tree.map(jnp.mean, terms)


def _sample(settings: TrainSettings, data: SequenceData, key):
    pick = jax.random.randint(key, (settings.batch_size,), 0, data.count)
    rows = data.starts[pick][:, None] + jnp.arange(settings.length + 1)[None]
    return data.obs[rows], data.actions[rows[:, :-1]], data.rewards[rows[:, :-1]]


@eqx.filter_jit
def _epoch(settings: TrainSettings, model, opt_state, data: SequenceData, key):
    optimizer = _optimizer(settings)
    params, static = eqx.partition(model, eqx.is_array)

    def update(carry, key):
        params, opt_state = carry
        batch_key, loss_key = jax.random.split(key)
        obs, actions, rewards = _sample(settings, data, batch_key)

        def objective(p):
            return batch_loss(settings, eqx.combine(p, static), obs, actions, rewards, loss_key)

        (loss, terms), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, new_opt = optimizer.update(grads, opt_state, params)
        new_params = eqx.apply_updates(params, updates)
        (new_params, new_opt), ok = keep_finite((new_params, new_opt), (params, opt_state), jnp.isfinite(loss))
        return (new_params, new_opt), (loss, terms, ok)

    keys = jax.random.split(key, settings.steps)
    (params, opt_state), (loss, terms, ok) = jax.lax.scan(update, (params, opt_state), keys)
    good = jnp.maximum(ok.sum(), 1)
    mean = lambda x: jnp.sum(jnp.where(ok, x, 0.0)) / good  # noqa: E731
    report = {"loss": mean(loss), **{k: mean(v) for k, v in terms.items()}, "skipped": jnp.sum(~ok)}
    return eqx.combine(params, static), opt_state, report


# ----- prediction -----------------------------------------------------------------------------

def filter_state(model: LatentModel, obs, prev_actions):
    """The latent state after observing `obs [K, ...]` (raw) with `prev_actions [K, m]` (the action
    before each observation; the first is ignored by the deterministic model, zero for a fresh RSSM)."""
    x = model.normalize(obs)
    if isinstance(model, DeterministicLatent):
        return model.encode(x[-1])
    embeds = jax.vmap(model.encoder)(x)

    def filt(state, inputs):
        a, e = inputs
        return model.observe(state, a, e)[0], None

    state, _ = jax.lax.scan(filt, model.initial_state(), (prev_actions, embeds))
    return state


@eqx.filter_jit
def open_loop(model: LatentModel, obs, actions, context: int):
    """Open-loop video prediction: observe `obs[:context]` (raw), then predict the observations
    `obs[context:]` from the actions alone (`actions [L, m]`, `obs [L+1, ...]`; `actions[t]` leads
    from `obs[t]` to `obs[t+1]`). Returns the predicted observations `[L+1-context, ...]` (uint8
    for images) and rewards `[L+1-context]` (of the steps `context-1 ...`)."""
    prev = jnp.concatenate([jnp.zeros_like(actions[:1]), actions[: context - 1]])
    state = filter_state(model, obs[:context], prev)
    future = actions[context - 1:]

    def roll(s, a):
        s_next = model.step(s, a)
        r = model.predict_reward(s, a) if isinstance(model, DeterministicLatent) else model.predict_reward(s_next)
        return s_next, (s_next, r)

    _, (states, rewards) = jax.lax.scan(roll, state, future)
    return jax.vmap(lambda s: model.to_observation(model.decode(s)))(states), rewards


@eqx.filter_jit
def reconstruct(model: LatentModel, obs):
    """Encode-decode each observation of `obs [N, ...]` independently (the deterministic model) or
    filtered with zero actions (RSSM); returns observations in their units."""
    if isinstance(model, DeterministicLatent):
        return jax.vmap(lambda o: model.to_observation(model.decode(model.encode(model.normalize(o)))))(obs)
    embeds = jax.vmap(model.encoder)(model.normalize(obs))
    zero = jnp.zeros(model.spec.action_dim)

    def filt(state, e):
        state = model.observe(state, zero, e)[0]
        return state, model.to_observation(model.decode(state))

    return jax.lax.scan(filt, model.initial_state(), embeds)[1]
