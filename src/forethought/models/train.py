"""Fitting ensembles: heteroskedastic Gaussian NLL (seed 002, section 4.1) or MSE, with a held-out
split, early stopping and elites chosen on held-out loss.

Speed: one jitted call per epoch (`lax.scan` over minibatches, all members at once). The data
are padded to a power-of-two size with a validity mask, so a growing buffer recompiles the epoch
only when it crosses a power of two, not after every episode.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from forethought import faults
from forethought.errors import ForethoughtError, check_finite
from forethought.models.ensemble import Ensemble, Network, state_features
from forethought.models.normalize import Normalizer


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to fit an ensemble."""

    learning_rate: float = 7.5e-4
    weight_decay: float = 3e-5
    """Decoupled weight decay (AdamW)."""
    batch_size: int = 256
    """Minibatch size per member."""
    max_epochs: int = 200
    holdout: float = 0.1
    """Fraction of the data held out for early stopping and elite selection."""
    patience: int = 5
    """Stop after this many epochs without a member improving its held-out loss by 1%."""
    bootstrap: bool = False
    """Resample each member's training set with replacement (seed 000: usually unnecessary)."""
    logvar_bound_weight: float = 0.01
    """Weight of the penalty that keeps the learned log-variance bounds tight."""
    matmul_dtype: Literal["float32", "bfloat16"] = "float32"
    """Input type of the training step's matrix products, forward and backward. "bfloat16" is
    mixed precision: parameters, optimizer state, accumulation and everything else stay float32,
    only the factors of each product are rounded (`ensemble.bf16_matmul`). On a CPU with AMX an
    epoch of the 5 x (4 x 200) benchmark ensemble ran 1.7x faster than in float32, to the same loss
    to about 1e-3 (benchmarks/results/models.json). Held-out losses, which pick each member's best
    epoch and the elites, are always computed in float32."""

    def __post_init__(self):
        if self.matmul_dtype not in ("float32", "bfloat16"):
            raise ForethoughtError(f"TrainConfig.matmul_dtype must be 'float32' or 'bfloat16', "
                                   f"got {self.matmul_dtype!r}")
        if not 0 <= self.holdout < 1:
            raise ForethoughtError(f"holdout must be in [0, 1), got {self.holdout}")
        for name in ("batch_size", "max_epochs"):
            if getattr(self, name) < 1:
                raise ForethoughtError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class FitReport:
    epochs: int
    train_loss: list[float]
    holdout_loss: list[float]
    """Mean held-out loss over members, per epoch (NLL or MSE in normalised units)."""
    member_holdout: list[float]
    """Each member's best held-out loss."""


def gaussian_nll(mean, logvar, target, mask=None):
    """Seed 002's MLE loss per dimension: `(y - mu)^2 / sigma^2 + log sigma^2`, averaged."""
    per = (target - mean) ** 2 * jnp.exp(-logvar) + logvar
    return _masked_mean(per, mask)


def _masked_mean(per, mask):
    if mask is None:
        return jnp.mean(per)
    weights = jnp.broadcast_to(mask[..., None], per.shape).astype(per.dtype)
    return jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def member_losses(model: Ensemble, net: Network, z, y, mask, matmul_dtype: str = "float32") -> jax.Array:
    """Loss of each member on its own batch `z [E, B, in]`, `y [E, B, n]`, `mask [E, B]` -> `[E]`;
    `matmul_dtype` as in `TrainConfig`."""
    mean, logvar = model.heads(net, z, _MATMUL_DTYPES[matmul_dtype])
    if logvar is None:
        return jax.vmap(lambda m, t, k: _masked_mean((t - m) ** 2, k))(mean, y, mask)
    return jax.vmap(gaussian_nll)(mean, logvar, y, mask)


_MATMUL_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
"""`TrainConfig.matmul_dtype` -> `Ensemble.heads`' `matmul_dtype` (None: the float32 path as it was)."""


def _loss(net, model, z, y, mask, bound_weight, matmul_dtype):
    loss = jnp.sum(member_losses(model, net, z, y, mask, matmul_dtype))
    if model.spec.probabilistic:
        loss = loss + bound_weight * (jnp.sum(net.max_logvar) - jnp.sum(net.min_logvar))
    return loss


def _bucket(n: int) -> int:
    return max(64, 1 << math.ceil(math.log2(max(n, 1))))


@functools.lru_cache(maxsize=16)
def _optimizer(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
    """One optimizer object per setting, so the jitted epoch is not recompiled for a new one."""
    return optax.adamw(learning_rate, weight_decay=weight_decay)


@eqx.filter_jit
def _epoch(model, params, opt_state, z, y, n_valid, key, optimizer, batch_size, bound_weight, bootstrap,
           matmul_dtype="float32"):
    """One pass over the (padded) training data for every member; returns the mean train loss.

    `params` are the array leaves of `model.net`; the rest of the network (activations) is static.
    `matmul_dtype` (static) is `TrainConfig.matmul_dtype`.
    """
    static = eqx.filter(model.net, eqx.is_array, inverse=True)
    E, C = model.spec.members, z.shape[0]
    valid = jnp.arange(C) < n_valid
    if bootstrap:
        order = jax.random.randint(key, (E, C), 0, jnp.maximum(n_valid, 1))
        order = jnp.where(valid[None], order, C - 1)
        in_data = jnp.broadcast_to(valid, (E, C))
    else:
        # a random permutation per member with the padding sorted to the end
        scores = jnp.where(valid[None], jax.random.uniform(key, (E, C)), 2.0)
        order = jnp.argsort(scores, axis=1)
        in_data = jnp.take_along_axis(jnp.broadcast_to(valid, (E, C)), order, axis=1)
    B = min(batch_size, C)
    batches = C // B
    order = order[:, : batches * B].reshape(E, batches, B).swapaxes(0, 1)
    in_data = in_data[:, : batches * B].reshape(E, batches, B).swapaxes(0, 1)

    def loss_fn(params, index, mask):
        return _loss(eqx.combine(params, static), model, z[index], y[index], mask, bound_weight, matmul_dtype)

    def step(carry, batch):
        index, mask = batch

        def update(carry):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, index, mask)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        return jax.lax.cond(jnp.any(mask), update, lambda c: (c, jnp.nan), carry)

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (order, in_data))
    return params, opt_state, jnp.nanmean(losses) / E


@eqx.filter_jit
def _holdout(model, net, z, y, mask):
    E = model.spec.members
    return member_losses(model, net, jnp.broadcast_to(z, (E, *z.shape)), jnp.broadcast_to(y, (E, *y.shape)),
                         jnp.broadcast_to(mask, (E, *mask.shape)))


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, *a.shape[1:]), a.dtype)
    out[: len(a)] = a
    return out


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Transitions made ready for a jitted fit: normalisers, and normalised inputs and delta
    targets split into training and held-out sets, each padded to a power of two."""

    input_norm: Normalizer
    target_norm: Normalizer
    z_train: jax.Array
    y_train: jax.Array
    n_train: int
    z_hold: jax.Array
    y_hold: jax.Array
    hold_mask: jax.Array


def prepare(spec, obs, action, next_obs, split_key: jax.Array, holdout: float) -> Prepared:
    """Check and prepare `obs [N, n]`, `action [N, m]`, `next_obs [N, n]` for a model whose
    `spec` has `state_dim`, `action_dim` and `angles` (ensembles and BNNs share this).

    Inputs are the state features (sin/cos of angles) and actions, targets the state changes
    (tricks 2 to 4 of seed 002). With fewer than 10 transitions nothing is held out and
    selection uses the training data itself."""
    obs, action, next_obs = (np.asarray(a, np.float32) for a in (obs, action, next_obs))
    if action.ndim == 1:
        action = action[:, None]
    N = len(obs)
    if obs.shape != (N, spec.state_dim) or next_obs.shape != (N, spec.state_dim) or action.shape != (N, spec.action_dim):
        raise ForethoughtError(f"fit: expected obs/next_obs [N, {spec.state_dim}] and action [N, {spec.action_dim}], "
                               f"got {obs.shape}, {next_obs.shape}, {action.shape}")
    if N < 2:
        raise ForethoughtError(f"fit: need at least 2 transitions, got {N}")
    for name, array in (("obs", obs), ("action", action), ("next_obs", next_obs)):
        check_finite(array, name, where="fit")

    features = np.concatenate([np.asarray(state_features(jnp.asarray(obs), spec.angles)), action], axis=1)
    targets = next_obs - obs
    input_norm, target_norm = Normalizer.fit(jnp.asarray(features)), Normalizer.fit(jnp.asarray(targets))
    z_all = np.asarray(input_norm(jnp.asarray(features)))
    y_all = np.asarray(target_norm(jnp.asarray(targets)))

    perm = np.asarray(jax.random.permutation(split_key, N))
    n_hold = int(round(holdout * N)) if N >= 10 else 0
    hold, train = perm[:n_hold], perm[n_hold:]
    if n_hold == 0:
        hold = train
    C, H = _bucket(len(train)), _bucket(len(hold))
    return Prepared(input_norm, target_norm,
                    jnp.asarray(_pad(z_all[train], C)), jnp.asarray(_pad(y_all[train], C)), len(train),
                    jnp.asarray(_pad(z_all[hold], H)), jnp.asarray(_pad(y_all[hold], H)),
                    jnp.arange(H) < len(hold))


def fit(model: Ensemble, obs, action, next_obs, key: jax.Array,
        config: TrainConfig = TrainConfig()) -> tuple[Ensemble, FitReport]:
    """Fit `model` to transitions `obs [N, n]`, `action [N, m]`, `next_obs [N, n]`.

    Normalisers are refit on all the data; each member keeps its parameters from its best
    held-out epoch; the `spec.elites` best members become the elites. Raises `ForethoughtError` on
    NaN/inf data or wrong shapes; a loss that turns NaN or inf is a `faults.report`ed fault.
    """
    key, split_key = jax.random.split(key)
    data = prepare(model.spec, obs, action, next_obs, split_key, config.holdout)
    model = eqx.tree_at(lambda m: (m.input_norm, m.target_norm), model, (data.input_norm, data.target_norm))
    z_train, y_train, z_hold, y_hold, hold_mask = data.z_train, data.y_train, data.z_hold, data.y_hold, data.hold_mask
    n_train = data.n_train

    optimizer = _optimizer(config.learning_rate, config.weight_decay)
    params, static = eqx.partition(model.net, eqx.is_array)
    opt_state = optimizer.init(params)
    best = np.asarray(_holdout(model, model.net, z_hold, y_hold, hold_mask))
    best_params = params
    train_curve, hold_curve = [], []
    stale = 0
    epochs = 0
    for epoch in range(config.max_epochs):
        key, epoch_key = jax.random.split(key)
        params, opt_state, train_loss = _epoch(model, params, opt_state, z_train, y_train,
                                               jnp.int32(n_train), epoch_key, optimizer,
                                               config.batch_size, config.logvar_bound_weight,
                                               config.bootstrap, config.matmul_dtype)
        losses = np.asarray(_holdout(model, eqx.combine(params, static), z_hold, y_hold, hold_mask))
        if not np.all(np.isfinite(losses)):
            # under faults.handling("skip") the fit ends here with every member's last good epoch
            faults.report("ensemble fit", f"epoch {epoch}", "the held-out loss became NaN or inf (members "
                          f"{np.where(~np.isfinite(losses))[0].tolist()}); try a smaller learning_rate")
            break
        improved = losses < best - 0.01 * np.abs(best)
        best_params = _keep_best(params, best_params, jnp.asarray(losses < best))  # each member's best epoch
        best = np.minimum(best, losses)
        train_curve.append(float(train_loss))
        hold_curve.append(float(np.mean(losses)))
        epochs = epoch + 1
        stale = 0 if improved.any() else stale + 1
        if stale >= config.patience:
            break
    if not hold_curve:  # a fault in the first epoch: the report holds the starting point
        train_curve, hold_curve = [float("nan")], [float(np.mean(best))]
    elites = np.argsort(best)[: model.spec.elites or model.spec.members]
    best_net = eqx.combine(best_params, static)
    model = eqx.tree_at(lambda m: (m.net, m.elite_index), model, (best_net, jnp.asarray(np.sort(elites), jnp.int32)))
    return model, FitReport(epochs, train_curve, hold_curve, best.tolist())


def evaluate(model: Ensemble, obs, action, next_obs) -> dict[str, float]:
    """One-step held-out metrics in the system's units: Gaussian NLL of the ensemble mixture's
    moment-matched Gaussian, MSE of the mean, and calibration (fraction of true next states
    inside the predicted 1-sigma and 2-sigma intervals, ideally 0.683 and 0.954)."""
    obs, action, next_obs = (jnp.asarray(a, jnp.float32) for a in (obs, action, next_obs))
    if action.ndim == 1:
        action = action[:, None]
    means, variances = model.predict_all(obs, action)
    means, variances = means[model.elite_index], variances[model.elite_index]
    mean = means.mean(0)
    var = variances.mean(0) + means.var(0)  # aleatoric + epistemic
    var = jnp.maximum(var, 1e-12)
    err = next_obs - mean
    z = jnp.abs(err) / jnp.sqrt(var)
    nll = 0.5 * jnp.mean(err**2 / var + jnp.log(2 * jnp.pi * var))
    return {"nll": float(nll), "mse": float(jnp.mean(err**2)),
            "within_1sigma": float(jnp.mean(z <= 1.0)), "within_2sigma": float(jnp.mean(z <= 2.0)),
            "epistemic_std": float(jnp.mean(jnp.sqrt(means.var(0))))}


def open_loop_error(model: Ensemble, obs, action, horizon: int = 10) -> np.ndarray:
    """Multi-step error of one episode (`obs [T+1, n]`, `action [T, m]`): from every start `t`
    with `t + horizon <= T`, roll the elites' mean prediction open loop along the real actions
    and compare with the real states. Returns the root-mean-square error `[horizon]` after
    1, ..., `horizon` steps (averaged over starts and state dimensions)."""
    obs, action = jnp.asarray(obs, jnp.float32), jnp.asarray(action, jnp.float32)
    if action.ndim == 1:
        action = action[:, None]
    T = action.shape[0]
    if obs.shape[0] != T + 1:
        raise ForethoughtError(f"open_loop_error: obs must have one more row than action, got {obs.shape[0]} and {T}")
    if not 1 <= horizon <= T:
        raise ForethoughtError(f"open_loop_error: horizon must be in 1..{T}, got {horizon}")
    return np.asarray(_open_loop_rmse(model, obs, action, horizon))


@eqx.filter_jit
def _open_loop_rmse(model, obs, action, horizon):
    step = model.as_dynamics(jax.random.key(0), particles=1, propagation="expectation")
    starts = jnp.arange(action.shape[0] - horizon + 1)

    def from_start(t):
        def one(x, k):
            x = step(x, jax.lax.dynamic_index_in_dim(action, t + k, keepdims=False), k)
            return x, x[0]

        _, predicted = jax.lax.scan(one, obs[t][None], jnp.arange(horizon))
        real = jax.lax.dynamic_slice_in_dim(obs, t + 1, horizon)
        return jnp.mean((predicted - real) ** 2, axis=-1)

    return jnp.sqrt(jnp.mean(jax.vmap(from_start)(starts), axis=0))


# ----- several independent fits as one program (the seeds of a vectorized run) --------------------

def stack(trees):
    """Stack pytrees of the same structure along a new leading axis (their non-array leaves, such
    as activation functions, must be equal and are kept once)."""
    arrays = [eqx.filter(tree, eqx.is_array) for tree in trees]
    static = eqx.filter(trees[0], eqx.is_array, inverse=True)
    return eqx.combine(jax.tree.map(lambda *leaves: jnp.stack(leaves), *arrays), static)


def unstack(tree, count: int) -> list:
    """The `count` pytrees that `stack` made `tree` from."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    return [eqx.combine(jax.tree.map(lambda leaf: leaf[i], arrays), static) for i in range(count)]


_A = eqx.if_array(0)
_epochs = eqx.filter_jit(eqx.filter_vmap(_epoch, in_axes=(_A, _A, _A, _A, _A, _A, _A, None, None, None, None, None)))
_holdouts = eqx.filter_jit(eqx.filter_vmap(_holdout))


def _repad(a: jax.Array, size: int) -> jax.Array:
    return jnp.concatenate([a, jnp.zeros((size - a.shape[0], *a.shape[1:]), a.dtype)]) if a.shape[0] < size else a


def fit_many(models: list[Ensemble], datasets: list[tuple], keys: list[jax.Array],
             config: TrainConfig = TrainConfig()) -> tuple[list[Ensemble], list[FitReport]]:
    """`fit` for several independent (model, data, key) triples at once: one vmapped epoch and one
    vmapped held-out evaluation per step of the loop, each fit stopping early on its own (a stopped
    fit's later epochs are computed and ignored). `datasets[i]` is `(obs, action, next_obs)`.

    Each fit draws its random numbers as `fit` does from the same key; with data of equal sizes
    the result is `fit`'s up to floating-point reassociation. Data of different sizes are padded
    to the largest bucket.
    """
    S = len(models)
    if not (S == len(datasets) == len(keys)) or S == 0:
        raise ForethoughtError(f"fit_many: expected as many models, datasets and keys (at least one), "
                               f"got {len(models)}, {len(datasets)}, {len(keys)}")
    split = [jax.random.split(k) for k in keys]
    prepared = [prepare(m.spec, *d, s[1], config.holdout) for m, d, s in zip(models, datasets, split)]
    C = max(p.z_train.shape[0] for p in prepared)
    H = max(p.z_hold.shape[0] for p in prepared)
    models = [eqx.tree_at(lambda m: (m.input_norm, m.target_norm), m, (p.input_norm, p.target_norm))
              for m, p in zip(models, prepared)]
    model = stack(models)
    z_train = jnp.stack([_repad(p.z_train, C) for p in prepared])
    y_train = jnp.stack([_repad(p.y_train, C) for p in prepared])
    z_hold = jnp.stack([_repad(p.z_hold, H) for p in prepared])
    y_hold = jnp.stack([_repad(p.y_hold, H) for p in prepared])
    hold_mask = jnp.stack([_repad(p.hold_mask, H) for p in prepared])
    n_train = jnp.asarray([p.n_train for p in prepared], jnp.int32)
    key = jnp.stack([s[0] for s in split])

    optimizer = _optimizer(config.learning_rate, config.weight_decay)
    params, static = eqx.partition(model.net, eqx.is_array)
    opt_state = jax.vmap(optimizer.init)(params)
    best = np.asarray(_holdouts(model, model.net, z_hold, y_hold, hold_mask))  # [S, E]
    best_params = params
    curves = [([], []) for _ in range(S)]
    stale, epochs = np.zeros(S, int), np.zeros(S, int)
    active = np.ones(S, bool)
    for epoch in range(config.max_epochs):
        pairs = jax.vmap(jax.random.split)(key)
        key, epoch_key = pairs[:, 0], pairs[:, 1]
        params, opt_state, train_loss = _epochs(model, params, opt_state, z_train, y_train, n_train, epoch_key,
                                                optimizer, config.batch_size, config.logvar_bound_weight,
                                                config.bootstrap, config.matmul_dtype)
        losses = np.asarray(_holdouts(model, eqx.combine(params, static), z_hold, y_hold, hold_mask))
        train_loss = np.asarray(train_loss)
        for i in np.flatnonzero(active & ~np.all(np.isfinite(losses), axis=1)):
            faults.report("ensemble fit", f"fit {i} epoch {epoch}", "the held-out loss became NaN or inf; try a "
                          "smaller learning_rate")
            active[i] = False  # (under "skip") this fit ends with its members' last good epoch
        better = (losses < best) & active[:, None]  # each member's best epoch, of the fits still going
        improved = np.any(losses < best - 0.01 * np.abs(best), axis=1)
        best_params = _keep_best(params, best_params, jnp.asarray(better))
        best = np.where(better, losses, best)
        for i in np.flatnonzero(active):
            curves[i][0].append(float(train_loss[i]))
            curves[i][1].append(float(np.mean(losses[i])))
            epochs[i] = epoch + 1
            stale[i] = 0 if improved[i] else stale[i] + 1
        active &= stale < config.patience
        if not active.any():
            break
    model = eqx.tree_at(lambda m: m.net, model, eqx.combine(best_params, static))
    fitted, reports = [], []
    for i, member in enumerate(unstack(model, S)):
        elites = np.argsort(best[i])[: member.spec.elites or member.spec.members]
        fitted.append(eqx.tree_at(lambda m: m.elite_index, member, jnp.asarray(np.sort(elites), jnp.int32)))
        train_curve, hold_curve = curves[i] if curves[i][1] else ([float("nan")], [float(np.mean(best[i]))])
        reports.append(FitReport(int(epochs[i]), train_curve, hold_curve, best[i].tolist()))
    return fitted, reports


def _keep_best(params, best_params, better: jax.Array):
    """`params` where `better` (each member's mask, `[..., E]`) holds, else `best_params`; the
    parameter leaves have the member axis after `better`'s leading axes."""
    lead = better.ndim
    return jax.tree.map(lambda new, old: jnp.where(better.reshape(*better.shape, *[1] * (new.ndim - lead)), new, old),
                        params, best_params)
