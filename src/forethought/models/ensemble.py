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


# ----- mixed-precision matrix products -------------------------------------------------------------
#
# On CPUs with AMX, XLA hands products with bfloat16 inputs and float32 results to YNNPACK: 500+
# GFLOP/s on one core at the ensemble's layer shapes against about 120 for float32. Training needs
# the backward products in bfloat16 too: under plain autodiff of a bfloat16-cast forward the
# cotangents are float32, so two thirds of the work (input and weight gradients) stay float32 and
# an epoch gained about 6%. `bf16_matmul` has a hand-written backward pass whose two products also
# take bfloat16 inputs.

def round_to_bf16(x: jax.Array) -> jax.Array:
    """float32 -> bfloat16, rounding to nearest even, computed on the integer bits: the value of
    `x.astype(jnp.bfloat16)` for every float32 (subnormals, overflow to infinity and infinities
    included; a NaN becomes the canonical quiet NaN).

    Why not `astype`: XLA's CPU conversion took 87 us for a `[5, 256, 200]` array on one core, this
    33 us; a training step converts about fifteen such arrays."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = bits + (jnp.uint32(0x7FFF) + ((bits >> 16) & 1))  # carries into the kept half: RNE
    bits = jnp.where(jnp.isnan(x), jnp.uint32(0x7FC00000), bits)  # (a NaN's carry could wrap to 0)
    return jax.lax.bitcast_convert_type((bits >> 16).astype(jnp.uint16), jnp.bfloat16)


def _rotated_transpose(a: jax.Array) -> tuple[jax.Array, int]:
    """`a [E, N, K]` transposed to `[E, K, N]` and written out row-major, with its K rows rotated
    by `h = K // 2` (rows `h..K-1`, then `0..h-1`); returns it and `h` (see `_unrotate_rows`).

    Why: XLA's CPU backend (jax 0.10) runs a bfloat16 product on YNNPACK only if the left factor
    is contracted along its last dimension and stored row-major. The weight gradient `g^T x`
    contracts over the batch, the leading dimension of both `g` and `x`, so one of them must be
    transposed in memory. A `swapaxes` is not a copy but a change of layout, and whether XLA then
    writes the copy depends on how its simplifier rearranges the operations between the transpose
    and the product: measured, a transpose followed by `astype(bfloat16)` was judged a transposed
    product and computed in float32 (a sixth of the speed); the same with the transpose done on
    the uint16 bits was folded into the product after that judgement and failed at run time
    ("Unsupported element type for DotThunk"). A concatenate is laid out row-major, and rotating
    its two pieces leaves the simplifier no identity to remove (as it can `concat(a[:h], a[h:])`),
    so the transposed copy is made, fused with the rounding, and the product stays bfloat16.
    `tests/models/test_ensemble.py` checks that every product of a compiled training step takes
    bfloat16 factors.
    """
    E, N, K = a.shape
    if K == 1:  # the transpose is a reshape (and XLA computes a one-row product in float32 anyway)
        return a.reshape(E, 1, N), 0
    t, h = jnp.swapaxes(a, 1, 2), K // 2
    return jnp.concatenate([t[:, h:], t[:, :h]], axis=1), h


def _unrotate_rows(d: jax.Array, h: int) -> jax.Array:
    """Undo `_rotated_transpose`'s rotation on the rows (axis 1) of a product's result."""
    if h == 0:
        return d
    k = d.shape[1] - h
    return jnp.concatenate([d[:, k:], d[:, :k]], axis=1)


@jax.custom_vjp
def bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """Member-batched `x [E, N, I] @ w[E, O, I]^T -> [E, N, O]`, all float32, computed with
    bfloat16 inputs and float32 accumulation, forward and backward.

    Mixed precision: `x` and `w` (for training, the float32 master weights the optimizer updates)
    are rounded to bfloat16 only as factors of a product. The gradients are the float32
    `dx = g @ w` and `dw = g^T @ x`, each again a product of bfloat16-rounded factors (`g`, `w`,
    `x`) with float32 accumulation: what `jax.grad` gives for the product of bfloat16 casts,
    except that the cotangent `g` is rounded too, which puts the backward products at the forward
    product's bfloat16 speed instead of float32's. (XLA may still compute a product with a single
    row or a contraction of 2 in float32: a negligible share of the work.)
    """
    return _bf16_matmul_fwd(x, w)[0]


def _bf16_matmul_fwd(x, w):
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ForethoughtError(f"bf16_matmul takes float32 x and w, got {x.dtype} and {w.dtype}")
    xb, wb = round_to_bf16(x), round_to_bf16(w)
    y = jnp.einsum("eni,eoi->eno", xb, wb, preferred_element_type=jnp.float32)
    return y, (xb, wb)  # the backward products reuse the rounded factors


def _bf16_matmul_bwd(residuals, g):
    xb, wb = residuals
    dx = jnp.einsum("eno,eoi->eni", round_to_bf16(g), wb, preferred_element_type=jnp.float32)
    gt, h = _rotated_transpose(g)  # transposed in float32, rounded in the same fused pass
    dw = jnp.einsum("eon,eni->eoi", round_to_bf16(gt), xb, preferred_element_type=jnp.float32)
    return dx, _unrotate_rows(dw, h)


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


# ----- the members' networks -----------------------------------------------------------------------

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
        (benchmarks/pets_speed.py) at the price of bfloat16 rounding of the inputs. With
        `jnp.bfloat16` the products are `bf16_matmul`, whose gradients are bfloat16 products too,
        so training (`TrainConfig.matmul_dtype`) gains as well; None keeps float32 throughout.
        """
        if matmul_dtype is None:
            out = eqx.filter_vmap(lambda mlp, zz: jax.vmap(mlp)(zz))(net.mlps, z)
        else:
            out, layers = z, net.mlps.layers
            activation = _ACTIVATIONS[self.spec.activation]
            for i, layer in enumerate(layers):
                out = _product(out, layer.weight, matmul_dtype) + layer.bias[:, None, :]
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


def _product(x: jax.Array, w: jax.Array, matmul_dtype) -> jax.Array:
    """`x [E, N, I] @ w[E, O, I]^T` with inputs of `matmul_dtype` and results of `x`'s type:
    `bf16_matmul` for bfloat16 (bfloat16 backward products), else a cast einsum (whose gradient
    products run in the cotangents' type)."""
    if jnp.dtype(matmul_dtype) == jnp.bfloat16 and x.dtype == w.dtype == jnp.float32:
        return bf16_matmul(x, w)
    return jnp.einsum("eni,eoi->eno", x.astype(matmul_dtype), w.astype(matmul_dtype),
                      preferred_element_type=x.dtype)


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
