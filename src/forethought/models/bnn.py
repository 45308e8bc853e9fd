"""Bayesian neural network dynamics (seed 000 "Uncertainty-Aware Models"; seed 003, Gal, McAllister
and Rasmussen, "Improving PILCO with Bayesian neural network dynamics models").

The note's BNN puts a distribution on every weight instead of a value, mean-field Gaussian:

    q(theta) = prod_i N(theta_i | mu_i, sigma_i^2),   sigma_i = softplus(rho_i),

and the model uncertainty enters the prediction as `int p(s' | s, a, theta) q(theta) dtheta`,
estimated by sampling weights. The network is the ensemble's (`ensemble.py`): the same input
features (angles as sin/cos, trick 3), normalised inputs and state-delta targets (tricks 2 and 4)
and a heteroskedastic Gaussian output `N(mu, diag(exp(logvar)))` whose log-variance is held inside
learned soft bounds (trick 1). The log-variance head is part of the Bayesian network; the two
bounds are point estimates, as in PETS.

Training is Bayes by backprop (Blundell et al. 2015): minimise the negative ELBO per datum,

    L = E_q[-log p(y | x, theta)] + KL(q || p) / N,    p(theta) = N(0, prior_std^2 I),

with `N` the number of training transitions (so `N L` is the negative ELBO of the whole set),
Adam, and one jitted `lax.scan` per epoch over minibatches. The expectation is estimated with the
local reparameterization trick (Kingma, Salimans and Welling 2015): for a layer `h = W a + b`
with independent Gaussian weights, `h` is Gaussian given `a`,

    gamma = mu_W a + mu_b,   delta = sigma_W^2 a^2 + sigma_b^2,   h = gamma + sqrt(delta) eps,

so one `eps` per unit and example replaces one weight sample per example (lower variance, and no
`[B, out, in]` weight tensor). Layer by layer this is exact: each example's output has the
distribution it would have under a whole weight sample. Everything is in normalised units (the
prior included); the std of every weight starts at `exp(init_log_std)`, so training starts near
an ordinary network and the KL term widens what the data do not pin down.

Expect the predictive to over-cover on the data a little. The expected log-likelihood counts the
spread of the weight samples' means as residual, so the learned noise variance comes out near
`noise^2 + Var_q[mu]`, and the predictive adds `Var_q[mu]` again: with the in-data model spread
at half the noise, a 1-sigma interval holds about 76% instead of 68%. The excess shrinks with
more data (`Var_q[mu]` falls as the posterior narrows); away from the data the model spread
dominates and grows.

Prediction and planning draw whole weight samples. `sample(key, S)` returns the `S` draws as an
`Ensemble` of `S` members, so the ensemble's `predict_all`, `as_dynamics` and
`train.evaluate` apply unchanged: a weight sample is an ensemble member. `as_dynamics` gives each
particle its own weight sample, fixed for the whole horizon (TS-infinity's analogue), with the
option of seed 003's moment matching ("Gaussianization") of the particle cloud after every step.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from forethought import faults
from forethought.errors import ForethoughtError
from forethought.models.ensemble import _ACTIVATIONS, Ensemble, EnsembleSpec, Network, Propagation, state_features
from forethought.models.normalize import Normalizer
from forethought.models.train import FitReport, _optimizer, gaussian_nll, prepare
from forethought.models.train import evaluate as evaluate_ensemble


@dataclasses.dataclass(frozen=True)
class BNNSpec:
    """The shape and prior of a BNN: what `save` records and `load` rebuilds."""

    state_dim: int
    action_dim: int
    hidden: int = 200
    layers: int = 4
    """Hidden layers (as the ensemble's `layers`)."""
    activation: str = "silu"
    angles: tuple[int, ...] = ()
    prior_std: float = 1.0
    """Standard deviation of the zero-mean Gaussian prior on every weight and bias (normalised units)."""
    init_log_std: float = -5.0
    """Initial `log sigma` of every weight: small, so training starts near a plain network."""

    def __post_init__(self):
        for name in ("state_dim", "action_dim", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise ForethoughtError(f"bnn {name} must be >= 1, got {getattr(self, name)}")
        if self.activation not in _ACTIVATIONS:
            raise ForethoughtError(f"bnn activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        if any(not 0 <= i < self.state_dim for i in self.angles):
            raise ForethoughtError(f"bnn angles must index the state (0..{self.state_dim - 1}), got {self.angles}")
        if not self.prior_std > 0:
            raise ForethoughtError(f"bnn prior_std must be > 0, got {self.prior_std}")

    @property
    def input_dim(self) -> int:
        return self.state_dim + len(self.angles) + self.action_dim

    def ensemble_spec(self, members: int, probabilistic: bool = True) -> EnsembleSpec:
        """The spec of an ensemble of `members` weight samples of this network."""
        return EnsembleSpec(self.state_dim, self.action_dim, members=members, hidden=self.hidden,
                            layers=self.layers, activation=self.activation, angles=self.angles,
                            probabilistic=probabilistic)


@dataclasses.dataclass(frozen=True)
class BNNTrainConfig:
    """How to fit a BNN by Bayes by backprop."""

    learning_rate: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 200
    holdout: float = 0.1
    """Fraction of the data held out for early stopping (its expected log-likelihood)."""
    patience: int = 10
    """Stop after this many epochs without the held-out loss improving by 1% of its scale."""
    kl_weight: float = 1.0
    """Multiplies `KL / N`; 1 is the ELBO, below 1 a tempered posterior (narrower, fits faster)."""
    logvar_bound_weight: float = 0.01
    """Weight of the penalty that keeps the learned log-variance bounds tight (as the ensemble's)."""

    def __post_init__(self):
        if not 0 <= self.holdout < 1:
            raise ForethoughtError(f"holdout must be in [0, 1), got {self.holdout}")
        for name in ("batch_size", "max_epochs", "patience"):
            if getattr(self, name) < 1:
                raise ForethoughtError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kl_weight < 0:
            raise ForethoughtError(f"kl_weight must be >= 0, got {self.kl_weight}")


class Posterior(eqx.Module):
    """The variational parameters: `mean` is an `eqx.nn.MLP` holding every `mu`, `rho` the same
    tree of `rho` values (`sigma = softplus(rho)`; no activations), and the point-estimate
    log-variance bounds `[n]`."""

    mean: eqx.nn.MLP
    rho: eqx.nn.MLP
    min_logvar: jax.Array
    max_logvar: jax.Array

    def std(self):
        """`sigma` of every weight, as a tree like `mean` (activations left as None)."""
        return jax.tree.map(jax.nn.softplus, self.rho)


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


def kl_divergence(posterior: Posterior, prior_std: float) -> jax.Array:
    """`KL(q || p)` of the mean-field Gaussian `q` from `N(0, prior_std^2)`, summed over every
    weight and bias (the log-variance bounds have no prior):
    `sum_i log(prior_std / sigma_i) + (sigma_i^2 + mu_i^2) / (2 prior_std^2) - 1/2`."""
    mu = jax.tree.leaves(eqx.filter(posterior.mean, eqx.is_array))
    sigma = jax.tree.leaves(posterior.std())
    s2 = prior_std**2
    return sum(jnp.sum(jnp.log(prior_std / s) + (s**2 + m**2) / (2 * s2) - 0.5) for m, s in zip(mu, sigma))


def linear_moments(weight_mean, weight_std, bias_mean, bias_std, a):
    """Mean `gamma` and variance `delta` of `h = W a + b` for Gaussian `W [out, in]`, `b [out]`
    and a given `a [B, in]`; both `[B, out]` (the local reparameterization)."""
    gamma = a @ weight_mean.T + bias_mean
    delta = (a**2) @ (weight_std**2).T + bias_std**2
    return gamma, delta


def _soft_bound(logvar, lo, hi):
    """PETS' soft bounds, as in `Ensemble.heads`: smooth min with `hi`, then smooth max with `lo`."""
    logvar = hi - jax.nn.softplus(hi - logvar)
    return lo + jax.nn.softplus(logvar - lo)


class BNN(eqx.Module):
    """A BNN dynamics model; build with `BNN.create(spec, key)`, train with `fit`."""

    posterior: Posterior
    input_norm: Normalizer
    target_norm: Normalizer
    spec: BNNSpec = eqx.field(static=True)

    @classmethod
    def create(cls, spec: BNNSpec, key: jax.Array) -> "BNN":
        n = spec.state_dim
        # the ensemble's member network, so that weight samples are ensemble members
        mean = eqx.nn.MLP(spec.input_dim, 2 * n, spec.hidden, spec.layers,
                          activation=_ACTIVATIONS[spec.activation], key=key)
        rho0 = _inverse_softplus(math.exp(spec.init_log_std))
        rho = jax.tree.map(lambda w: jnp.full_like(w, rho0), eqx.filter(mean, eqx.is_array))
        posterior = Posterior(mean, rho, jnp.full((n,), -10.0), jnp.full((n,), 0.5))
        return cls(posterior, Normalizer.identity(spec.input_dim), Normalizer.identity(n), spec)

    # ----- training: the network under the local reparameterization -------------------------
    def heads(self, posterior: Posterior, z: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One local-reparameterization draw for normalised inputs `z [B, input_dim]`: mean and
        bounded log-variance `[B, n]`, each example with its own implicit weight sample."""
        mean, std = posterior.mean.layers, posterior.std().layers
        activation = _ACTIVATIONS[self.spec.activation]
        keys = jax.random.split(key, len(mean))
        h = z
        for i, (mu, sigma) in enumerate(zip(mean, std)):
            gamma, delta = linear_moments(mu.weight, sigma.weight, mu.bias, sigma.bias, h)
            h = gamma + jnp.sqrt(delta) * jax.random.normal(keys[i], gamma.shape, gamma.dtype)
            if i < len(mean) - 1:
                h = activation(h)
        n = self.spec.state_dim
        return h[..., :n], _soft_bound(h[..., n:], posterior.min_logvar, posterior.max_logvar)

    def inputs(self, x: jax.Array, u: jax.Array) -> jax.Array:
        """Normalised network inputs from states `[..., n]` and actions `[..., m]`."""
        return self.input_norm(jnp.concatenate([state_features(x, self.spec.angles), u], axis=-1))

    # ----- prediction: whole weight samples ----------------------------------------------------
    @eqx.filter_jit
    def sample(self, key: jax.Array, samples: int, aleatoric: bool = True) -> Ensemble:
        """`samples` weight draws `theta ~ q` as an `Ensemble` of that many members (its elites are
        all of them). With `aleatoric=False` the members keep only the mean head: a deterministic
        ensemble whose predictions carry the model uncertainty alone."""
        params, static = eqx.partition(self.posterior.mean, eqx.is_array)
        std = self.posterior.std()

        leaves, treedef = jax.tree.flatten(params)
        sigma = jax.tree.leaves(std)

        def draw(k):
            eps = [jax.random.normal(kk, w.shape, w.dtype) for kk, w in zip(jax.random.split(k, len(leaves)), leaves)]
            return eqx.combine(jax.tree.unflatten(treedef, [w + s * e for w, s, e in zip(leaves, sigma, eps)]), static)

        mlps = eqx.filter_vmap(draw)(jax.random.split(key, samples))
        n = self.spec.state_dim
        bounds = (jnp.broadcast_to(self.posterior.min_logvar, (samples, n)),
                  jnp.broadcast_to(self.posterior.max_logvar, (samples, n)))
        espec = self.spec.ensemble_spec(samples, probabilistic=aleatoric)
        if not aleatoric:  # refill a deterministic ensemble's networks, the last layer cut to the mean head
            template = Ensemble.create(espec, jax.random.key(0)).net.mlps
            arrays = [l.weight for l in mlps.layers] + [l.bias for l in mlps.layers]
            arrays[len(mlps.layers) - 1] = arrays[len(mlps.layers) - 1][:, :n]
            arrays[-1] = arrays[-1][:, :n]
            mlps = eqx.tree_at(lambda m: [l.weight for l in m.layers] + [l.bias for l in m.layers], template, arrays)
        return Ensemble(Network(mlps, *bounds), self.input_norm, self.target_norm, jnp.arange(samples), espec)

    @eqx.filter_jit
    def predict(self, x: jax.Array, u: jax.Array, key: jax.Array, samples: int = 32) -> tuple[jax.Array, jax.Array]:
        """Next-state mean and (aleatoric) variance under each of `samples` weight draws, for
        `x [N, n]`, `u [N, m]`; returns `[S, N, n]` each. The predictive mean is the mean over
        axis 0, its variance `var.mean(0) + mean.var(0)` (aleatoric + epistemic)."""
        return self.sample(key, samples).predict_all(x, u)

    # ----- planning ------------------------------------------------------------------------------
    def as_dynamics(self, key: jax.Array, particles: int = 20, propagation: Propagation = "ts_inf",
                    aleatoric: bool = True, moment_matching: bool = False) -> Callable:
        """`dynamics(X [P, n], u [m] or [P, m], t) -> X_next [P, n]` over `particles` particles.

        The weights are drawn once from `key`, one sample per particle, and kept for the whole
        horizon (`"ts_inf"`); `"ts1"` lets each particle pick one of those samples afresh every
        step, `"expectation"` moves every particle by their average mean. Output noise (when
        `aleatoric`) uses `fold_in(key, t)`, the same for every candidate action sequence, as the
        ensemble's. `moment_matching` (Deep PILCO, seed 003) replaces the particles after each
        step by draws from the Gaussian with their mean and covariance; particles keep their
        weight samples. Lift `x0` with `jnp.broadcast_to(x0, (P, n))`; average costs with
        `ensemble.particle_cost`.
        """
        if particles < (2 if moment_matching else 1):
            raise ForethoughtError(f"particles must be >= {2 if moment_matching else 1}"
                                   f"{' for moment matching' if moment_matching else ''}, got {particles}")
        weight_key, noise_key = jax.random.split(key)
        step = self.sample(weight_key, particles, aleatoric).as_dynamics(noise_key, particles, propagation)
        if not moment_matching:
            return step
        mm_key = jax.random.fold_in(key, 1)

        def dynamics(X, u, t):
            X_next = step(X, u, t)
            mean = jnp.mean(X_next, axis=0)
            cov = jnp.atleast_2d(jnp.cov(X_next, rowvar=False))
            n = X_next.shape[1]
            L = jnp.linalg.cholesky(cov + 1e-6 * jnp.eye(n, dtype=X.dtype))
            eps = jax.random.normal(jax.random.fold_in(mm_key, t), X_next.shape, X.dtype)
            return mean + eps @ L.T

        return dynamics

    # ----- persistence ---------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Arrays to an `.npz` with the spec as JSON metadata (no pickle), atomically."""
        from forethought.checkpoint import save

        save(Path(path), self, {"kind": "bnn", "spec": dataclasses.asdict(self.spec)})

    @classmethod
    def load(cls, path: Path) -> "BNN":
        from forethought.checkpoint import load, load_meta

        meta = load_meta(Path(path))
        if meta.get("kind") != "bnn":
            raise ForethoughtError(f"{path} is not a BNN checkpoint (kind {meta.get('kind')!r})")
        fields = meta["spec"]
        fields["angles"] = tuple(fields.get("angles", ()))
        model, _ = load(Path(path), cls.create(BNNSpec(**fields), jax.random.key(0)))
        return model


# ----- fitting ----------------------------------------------------------------------------------
def _loss(params, static, model: BNN, z, y, mask, key, n_data, kl_weight, bound_weight):
    """Negative ELBO per datum (up to a constant) on one minibatch; aux: (data term, KL / N)."""
    posterior = eqx.combine(params, static)
    mean, logvar = model.heads(posterior, z, key)
    data = 0.5 * model.spec.state_dim * gaussian_nll(mean, logvar, y, mask)  # sum over dimensions
    kl = kl_divergence(posterior, model.spec.prior_std) / n_data
    bounds = jnp.sum(posterior.max_logvar) - jnp.sum(posterior.min_logvar)
    return data + kl_weight * kl + bound_weight * bounds, (data, kl)


@eqx.filter_jit
def _epoch(model, params, opt_state, z, y, n_valid, key, optimizer, batch_size, kl_weight, bound_weight):
    """One pass over the (padded, as `train._epoch`) training data; returns the mean loss."""
    static = eqx.filter(model.posterior, eqx.is_array, inverse=True)
    C = z.shape[0]
    valid = jnp.arange(C) < n_valid
    order_key, noise_key = jax.random.split(key)
    order = jnp.argsort(jnp.where(valid, jax.random.uniform(order_key, (C,)), 2.0))  # padding last
    B = min(batch_size, C)
    batches = C // B
    order = order[: batches * B].reshape(batches, B)
    masks = valid[order]
    n_data = jnp.maximum(n_valid, 1).astype(z.dtype)

    def step(carry, batch):
        index, mask, k = batch

        def update(carry):
            params, opt_state = carry
            (loss, _), grads = jax.value_and_grad(_loss, has_aux=True)(
                params, static, model, z[index], y[index], mask, k, n_data, kl_weight, bound_weight)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        return jax.lax.cond(jnp.any(mask), update, lambda c: (c, jnp.nan), carry)

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state),
                                               (order, masks, jax.random.split(noise_key, batches)))
    return params, opt_state, jnp.nanmean(losses)


@eqx.filter_jit
def _holdout(model, params, z, y, mask, key, n_data, kl_weight):
    """The training objective on held-out data: expected negative log-likelihood per datum (one
    local-reparameterization draw per example, the same `key` every epoch so that epochs are
    compared on equal terms) plus `kl_weight KL / N`."""
    static = eqx.filter(model.posterior, eqx.is_array, inverse=True)
    loss, _ = _loss(params, static, model, z, y, mask, key, n_data, kl_weight, 0.0)
    return loss


def fit(model: BNN, obs, action, next_obs, key: jax.Array,
        config: BNNTrainConfig = BNNTrainConfig()) -> tuple[BNN, FitReport]:
    """Fit the posterior of `model` to transitions `obs [N, n]`, `action [N, m]`, `next_obs [N, n]`.

    Normalisers are refit on all the data; the parameters of the best held-out epoch are kept.
    Early stopping watches the objective itself on held-out data (expected negative
    log-likelihood plus `kl_weight KL / N`), not the likelihood alone, which would favour the
    first epochs, when the weights are still nearly point masses. `FitReport.train_loss` and
    `holdout_loss` are those negative ELBOs per datum, in normalised units and without the
    `log 2 pi` constant; `member_holdout` holds the best held-out value.
    Raises `ForethoughtError` on NaN/inf data, wrong shapes, or a non-finite loss.
    """
    key, split_key, hold_key = jax.random.split(key, 3)
    data = prepare(model.spec, obs, action, next_obs, split_key, config.holdout)
    model = eqx.tree_at(lambda m: (m.input_norm, m.target_norm), model, (data.input_norm, data.target_norm))
    z_train, y_train, z_hold, y_hold, hold_mask = data.z_train, data.y_train, data.z_hold, data.y_hold, data.hold_mask

    n_data = jnp.float32(data.n_train)
    optimizer = _optimizer(config.learning_rate, 0.0)  # Adam: the prior is the regulariser
    params, static = eqx.partition(model.posterior, eqx.is_array)
    opt_state = optimizer.init(params)
    best = float(_holdout(model, params, z_hold, y_hold, hold_mask, hold_key, n_data, config.kl_weight))
    best_params = params
    reference = best
    train_curve, hold_curve = [], []
    stale = 0
    for epoch in range(config.max_epochs):
        key, epoch_key = jax.random.split(key)
        params, opt_state, train_loss = _epoch(model, params, opt_state, z_train, y_train,
                                               jnp.int32(data.n_train), epoch_key, optimizer, config.batch_size,
                                               config.kl_weight, config.logvar_bound_weight)
        loss = float(_holdout(model, params, z_hold, y_hold, hold_mask, hold_key, n_data, config.kl_weight))
        if not (math.isfinite(loss) and math.isfinite(float(train_loss))):
            # under faults.handling("skip") the fit ends here with the last good epoch's posterior
            faults.report("BNN fit", f"epoch {epoch}", "the loss became NaN or inf; try a smaller learning_rate")
            break
        train_curve.append(float(train_loss))
        hold_curve.append(loss)
        # the loss is a log-likelihood (any sign): "1%" is relative to its magnitude, at least 0.01
        # nats, and measured from the last epoch that improved that much (so a slow, steady descent
        # of many small steps is not mistaken for a plateau)
        if loss < reference - 0.01 * max(abs(reference), 1.0):
            stale, reference = 0, loss
        else:
            stale += 1
        if loss < best:
            best, best_params = loss, params
        if stale >= config.patience:
            break
    if not hold_curve:  # a fault in the first epoch: the report holds the starting point
        train_curve, hold_curve = [float("nan")], [best]
    model = eqx.tree_at(lambda m: m.posterior, model, eqx.combine(best_params, static))
    return model, FitReport(len(train_curve), train_curve, hold_curve, [best])


def evaluate(model: BNN, obs, action, next_obs, key: jax.Array, samples: int = 32) -> dict[str, float]:
    """`train.evaluate`'s one-step metrics (NLL, MSE, calibration, epistemic std) of the
    predictive distribution estimated with `samples` weight draws from `key`."""
    return evaluate_ensemble(model.sample(key, samples), obs, action, next_obs)
