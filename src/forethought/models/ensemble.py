"""Probabilistic ensembles of MLPs (PETS; seed 000 "Uncertainty-Aware Models", seed 002 section 4).

Each of `E` members maps `(s, a)` to a Gaussian over the *change* of state (trick 2),
`N(s + mu(s, a), diag(sigma^2(s, a)))`, with the network predicting `log sigma^2` (trick 1) kept
inside learned soft bounds, angles fed as `(sin, cos)` (trick 3) and inputs and targets normalised
with statistics from the buffer (trick 4). The members are one Equinox module with a leading
member axis, built and applied with `eqx.filter_vmap`, so training and prediction are batched
matrix products.

Propagation for planning (`as_dynamics`), over `P` particles:
- `"ts_inf"`: each particle keeps one member for the whole horizon (PETS' TS-infinity),
- `"ts1"`: each particle draws a new member at every step,
- `"expectation"`: every particle moves by the mean of the members' means (no sampling).
Probabilistic members add their predicted noise to each particle; deterministic ones do not.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Literal

import equinox as eqx
import jax
import jax.numpy as jnp

from forethought.errors import ForethoughtError
from forethought.models.normalize import Normalizer

Propagation = Literal["ts_inf", "ts1", "expectation"]
@jax.custom_jvp
def silu(x):
    """`x * sigmoid(x)` with a hand-written derivative: about 6% faster ensemble training on CPU
    than `jax.nn.silu` (benchmarks/results/models.json), same values."""
    return x * jax.nn.sigmoid(x)


@silu.defjvp
def _silu_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    s = jax.nn.sigmoid(x)
    y = x * s
    return y, dx * (s + y * (1 - s))


_ACTIVATIONS: dict[str, Callable] = {"silu": silu, "relu": jax.nn.relu, "tanh": jnp.tanh,
                                     "elu": jax.nn.elu}


def state_features(x: jax.Array, angles: tuple[int, ...]) -> jax.Array:
    """Replace each angle dimension of `x [..., n]` by its `(sin, cos)` (trick 3)."""
    if not angles:
        return x
    others = [i for i in range(x.shape[-1]) if i not in angles]
    a = x[..., list(angles)]
    return jnp.concatenate([x[..., others], jnp.sin(a), jnp.cos(a)], axis=-1)


@dataclasses.dataclass(frozen=True)
class EnsembleSpec:
    """The shape of an ensemble: what `save` records and `load` rebuilds."""

    state_dim: int
    action_dim: int
    members: int = 5
    hidden: int = 200
    layers: int = 4
    """Hidden layers per member (mbrl-lib's `num_layers`)."""
    activation: str = "silu"
    angles: tuple[int, ...] = ()
    probabilistic: bool = True
    """False: a deterministic ensemble trained with MSE (the "naive model" of seed 000)."""
    elites: int | None = None
    """How many members (best on held-out data) planning uses; None: all."""

    def __post_init__(self):
        for name in ("state_dim", "action_dim", "members", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise ForethoughtError(f"ensemble {name} must be >= 1, got {getattr(self, name)}")
        if self.activation not in _ACTIVATIONS:
            raise ForethoughtError(f"ensemble activation must be one of {sorted(_ACTIVATIONS)}, "
                                   f"got {self.activation!r}")
        if any(not 0 <= i < self.state_dim for i in self.angles):
            raise ForethoughtError(f"ensemble angles must index the state (0..{self.state_dim - 1}), "
                                   f"got {self.angles}")
        if self.elites is not None and not 1 <= self.elites <= self.members:
            raise ForethoughtError(f"ensemble elites must be in 1..{self.members}, got {self.elites}")

    @property
    def input_dim(self) -> int:
        return self.state_dim + len(self.angles) + self.action_dim


class Network(eqx.Module):
    """The trainable part: stacked member MLPs and per-member log-variance bounds, all `[E, ...]`."""

    mlps: eqx.nn.MLP
    min_logvar: jax.Array
    max_logvar: jax.Array


class Ensemble(eqx.Module):
    """An ensemble dynamics model; build with `Ensemble.create(spec, key)`, train with
    `forethought.models.train.fit`."""

    net: Network
    input_norm: Normalizer
    target_norm: Normalizer
    elite_index: jax.Array
    spec: EnsembleSpec = eqx.field(static=True)

    @classmethod
    def create(cls, spec: EnsembleSpec, key: jax.Array) -> "Ensemble":
        outputs = spec.state_dim * (2 if spec.probabilistic else 1)

        def member(k):
            return eqx.nn.MLP(spec.input_dim, outputs, spec.hidden, spec.layers,
                              activation=_ACTIVATIONS[spec.activation], key=k)

        mlps = eqx.filter_vmap(member)(jax.random.split(key, spec.members))
        E, n = spec.members, spec.state_dim
        net = Network(mlps, jnp.full((E, n), -10.0), jnp.full((E, n), 0.5))
        return cls(net, Normalizer.identity(spec.input_dim), Normalizer.identity(n),
                   jnp.arange(spec.elites or spec.members), spec)

    # ----- the network in normalised units ---------------------------------------------------
    def heads(self, net: Network, z: jax.Array, matmul_dtype=None) -> tuple[jax.Array, jax.Array | None]:
        """Member outputs for member-specific inputs `z [E, N, input_dim]` (normalised):
        mean `[E, N, n]` and bounded log-variance `[E, N, n]` (None if deterministic).

        `matmul_dtype` (e.g. `jnp.bfloat16`) feeds the matrix products inputs of that type with
        float32 accumulation; on CPUs with AMX this ran planning about 2x faster
        (benchmarks/pets_speed.py) at the price of bfloat16 rounding of the inputs.
        """
        if matmul_dtype is None:
            out = eqx.filter_vmap(lambda mlp, zz: jax.vmap(mlp)(zz))(net.mlps, z)
        else:
            out, layers = z, net.mlps.layers
            activation = _ACTIVATIONS[self.spec.activation]
            for i, layer in enumerate(layers):
                out = jnp.einsum("eni,eoi->eno", out.astype(matmul_dtype), layer.weight.astype(matmul_dtype),
                                 preferred_element_type=z.dtype) + layer.bias[:, None, :]
                if i < len(layers) - 1:
                    out = activation(out)
        n = self.spec.state_dim
        if not self.spec.probabilistic:
            return out, None
        mean, logvar = out[..., :n], out[..., n:]
        hi, lo = net.max_logvar[:, None, :], net.min_logvar[:, None, :]
        logvar = hi - jax.nn.softplus(hi - logvar)
        logvar = lo + jax.nn.softplus(logvar - lo)
        return mean, logvar

    def inputs(self, x: jax.Array, u: jax.Array) -> jax.Array:
        """Normalised network inputs from states `[..., n]` and actions `[..., m]`."""
        return self.input_norm(jnp.concatenate([state_features(x, self.spec.angles), u], axis=-1))

    # ----- predictions in the system's units --------------------------------------------------
    def predict(self, x: jax.Array, u: jax.Array, matmul_dtype=None) -> tuple[jax.Array, jax.Array]:
        """Next-state mean and variance per member, for member-specific `x [E, N, n]`,
        `u [E, N, m]`; returns `[E, N, n]` each (variance 0 for a deterministic ensemble)."""
        mean, logvar = self.heads(self.net, self.inputs(x, u), matmul_dtype)
        next_mean = x + self.target_norm.inverse(mean)
        if logvar is None:
            return next_mean, jnp.zeros_like(next_mean)
        return next_mean, jnp.exp(logvar) * self.target_norm.std**2

    def predict_all(self, x: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Every member on the same `x [N, n]`, `u [N, m]` -> `[E, N, n]` mean and variance."""
        E = self.spec.members
        return self.predict(jnp.broadcast_to(x, (E, *x.shape)), jnp.broadcast_to(u, (E, *u.shape)))

    # ----- planning ------------------------------------------------------------------------------
    def as_dynamics(self, key: jax.Array, particles: int = 20,
                    propagation: Propagation = "ts_inf", matmul_dtype=None) -> Callable:
        """`dynamics(X [P, n], u [m] or [P, m], t) -> X_next [P, n]` over `particles` particles.

        The randomness of step `t` is `fold_in(key, t)`, the same for every candidate action
        sequence a planner evaluates (common random numbers), so candidates are ranked on equal
        terms. Particle `p` uses elite member `p % elites` under TS-infinity. Lift the initial
        state with `jnp.broadcast_to(x0, (P, n))` and average costs with `particle_cost`.
        `matmul_dtype`: see `heads` (None keeps float32 throughout).
        """
        if propagation not in ("ts_inf", "ts1", "expectation"):
            raise ForethoughtError(f"propagation must be 'ts_inf', 'ts1' or 'expectation', got {propagation!r}")
        n, m = self.spec.state_dim, self.spec.action_dim
        elites = self.elite_index
        k = elites.shape[0]
        if propagation == "ts_inf" and particles % k:
            raise ForethoughtError(f"particles ({particles}) must be a multiple of the number of elites ({k})"
                                   " for TS-infinity")
        noisy = self.spec.probabilistic and propagation != "expectation"

        def dynamics(X, u, t):
            u = jnp.broadcast_to(u, (particles, m))
            step_key = jax.random.fold_in(key, t)
            eps = jax.random.normal(step_key, (particles, n), X.dtype) if noisy else None
            if propagation == "ts_inf":
                # particle p -> elite p % k: group the particles by member for one batched product
                Xg = X.reshape(particles // k, k, n).swapaxes(0, 1)
                Ug = u.reshape(particles // k, k, m).swapaxes(0, 1)
                sub = eqx.tree_at(lambda e: e.net, self, _select_members(self.net, elites))
                mean, var = sub.predict(Xg, Ug, matmul_dtype)
                mean, var = (a.swapaxes(0, 1).reshape(particles, n) for a in (mean, var))
            else:
                mean_all, var_all = self.predict(jnp.broadcast_to(X, (self.spec.members, particles, n)),
                                                 jnp.broadcast_to(u, (self.spec.members, particles, m)),
                                                 matmul_dtype)
                if propagation == "expectation":
                    return jnp.mean(mean_all[elites], axis=0)
                choice = elites[jax.random.randint(jax.random.fold_in(step_key, 1), (particles,), 0, k)]
                mean = mean_all[choice, jnp.arange(particles)]
                var = var_all[choice, jnp.arange(particles)]
            return mean + jnp.sqrt(var) * eps if noisy else mean

        return dynamics

    def evaluate(self, obs, action, next_obs) -> dict[str, float]:
        """One-step NLL, MSE and calibration on held-out transitions (see `train.evaluate`)."""
        from forethought.models.train import evaluate

        return evaluate(self, obs, action, next_obs)

    # ----- persistence ---------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Arrays to an `.npz` with the spec as JSON metadata (no pickle), atomically."""
        from forethought.checkpoint import save

        save(Path(path), self, {"kind": "ensemble", "spec": dataclasses.asdict(self.spec)})

    @classmethod
    def load(cls, path: Path) -> "Ensemble":
        from forethought.checkpoint import load, load_meta

        meta = load_meta(Path(path))
        if meta.get("kind") != "ensemble":
            raise ForethoughtError(f"{path} is not an ensemble checkpoint (kind {meta.get('kind')!r})")
        fields = meta["spec"]
        fields["angles"] = tuple(fields.get("angles", ()))
        like = cls.create(EnsembleSpec(**fields), jax.random.key(0))
        model, _ = load(Path(path), like)
        return model


def _select_members(net: Network, index: jax.Array) -> Network:
    """The members `index` of a stacked network (array leaves only; activations stay)."""
    return jax.tree.map(lambda a: a[index] if eqx.is_array(a) else a, net)


def particle_cost(cost: Callable) -> Callable:
    """Lift `cost(x, u, t)` to particles: `mean_p cost(X[p], u, t)` (`u` shared or `[P, m]`)."""

    def lifted(X, u, t):
        U = jnp.broadcast_to(u, (X.shape[0], *jnp.shape(u)[-1:]))
        return jnp.mean(jax.vmap(cost, in_axes=(0, 0, None))(X, U, t))

    return lifted


def particle_terminal_cost(terminal_cost: Callable) -> Callable:
    return lambda X: jnp.mean(jax.vmap(terminal_cost)(X))
