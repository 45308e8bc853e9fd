"""Gaussian-process dynamics, PILCO's model (seed 003, "Case study: PILCO", "GP reminder",
"Uncertainty propagation"; Deisenroth, Fox and Rasmussen, TPAMI 2015, section 4).

One exact GP per output dimension `a = 1..d` with the squared-exponential (SE) kernel with ARD
length-scales, the kernel the notes name as PILCO's,

    k_a(x, x') = alpha_a^2 exp(-1/2 (x - x')^T Lambda_a^{-1} (x - x')),   Lambda_a = diag(l_a^2),

and targets `y_a = f_a(x) + eps`, `eps ~ N(0, sigma_a^2)`. As dynamics the inputs are the state
features and the action, `x~ = [state_features(s), u]` (angles as (sin, cos), seed 002 trick 3),
and the targets the state differences `s' - s` (trick 2). Inputs and targets are normalised
(trick 4), so the hyperparameters live in normalised units; `lengthscale`, `signal_var` and
`noise_var` give them in the data's units.

Fitting maximises the log marginal likelihood of each output,

    log p(y_a | X) = -1/2 y_a^T K_a^{-1} y_a - 1/2 log|K_a| - N/2 log(2 pi),
    K_a = [k_a(x_i, x_j)] + (sigma_a^2 + jitter alpha_a^2) I,

over `(log l_a, log alpha_a^2, log sigma_a^2)`, with PILCO's "curb": a flat-bottomed penalty
that keeps the length-scales within `max_lengthscale_ratio` of the input spread and the
signal-to-noise ratio `alpha / sigma` below `max_snr` (that floor on the noise, plus the jitter,
keeps `K_a` well conditioned). The optimisation (L-BFGS or Adam) is one jitted function vmapped over
output dimensions and random restarts.

Posterior for a deterministic input `x` (`beta_a = K_a^{-1} y_a`, `k_a = [k_a(x_i, x)]_i`):

    mean_a = k_a^T beta_a,    var_a = alpha_a^2 - k_a^T K_a^{-1} k_a
                                    (+ sigma_a^2 + jitter alpha_a^2 with noise=True).

Moment matching of a Gaussian input `x ~ N(m, S)` (TPAMI 2015 eqs. 14-23 with `nu_i = x_i - m`):

    q_ai   = alpha_a^2 |S Lambda_a^{-1} + I|^{-1/2} exp(-1/2 nu_i^T (S + Lambda_a)^{-1} nu_i)
    M_a    = beta_a^T q_a
    C_a    = cov[x, f_a] = sum_i beta_ai q_ai S (S + Lambda_a)^{-1} nu_i
    R      = S (Lambda_a^{-1} + Lambda_b^{-1}) + I,   z_ij = Lambda_a^{-1} nu_i + Lambda_b^{-1} nu_j
    Q_ij   = k_a(x_i, m) k_b(x_j, m) |R|^{-1/2} exp(1/2 z_ij^T R^{-1} S z_ij)
    S_ab   = beta_a^T Q beta_b - M_a M_b + [a = b] (alpha_a^2 - tr(K_a^{-1} Q))

These are the exact mean and covariance of `f(x)` with `x ~ N(m, S)` (they include
`E_x[var f(x)]`); PILCO then treats that distribution as Gaussian.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Callable, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import optax

from forethought.errors import ForethoughtError, check_finite
from forethought.faults import NumericalFault
from forethought.models.ensemble import state_features
from forethought.models.normalize import Normalizer


@dataclasses.dataclass(frozen=True)
class GPConfig:
    """How to fit a GP's hyperparameters."""

    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    steps: int | None = None
    """Most optimizer iterations; None: 100 for L-BFGS (each iteration's line search may evaluate
    the likelihood a few times), 300 for Adam."""
    tolerance: float = 1e-6
    """L-BFGS stops once an iteration lowers the objective (negative log marginal likelihood per
    data point, normalised units) by less than this."""
    learning_rate: float = 0.05
    """Adam's step size on the log hyperparameters (unused by L-BFGS)."""
    restarts: int = 2
    """Starts per output dimension, the best kept: the first from the default initial values
    (length-scale 1 and signal variance 1 in normalised units, noise `init_noise`), the others
    from random perturbations of it."""
    max_points: int = 1000
    """The hyperparameters are fit on a random subset of at most this many points (each step
    costs `O(points^3)`); the posterior always conditions on all the data."""
    jitter: float | None = None
    """Added to the diagonal of `K`, relative to the signal variance; None: 1e-6 in float64,
    1e-4 in float32."""
    max_lengthscale_ratio: float = 100.0
    """Curb: length-scales stay within [1/ratio, ratio] normalised input standard deviations."""
    max_snr: float = 1000.0
    """Curb: the signal-to-noise ratio alpha / sigma stays below this (PILCO uses 500)."""
    init_noise: float = 0.1
    """Initial noise standard deviation as a fraction of the target standard deviation."""

    def __post_init__(self):
        if self.optimizer not in ("lbfgs", "adam"):
            raise ForethoughtError(f"GP optimizer must be 'lbfgs' or 'adam', got {self.optimizer!r}")
        for name in ("steps", "restarts", "max_points"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ForethoughtError(f"GP {name} must be >= 1, got {getattr(self, name)}")
        if self.jitter is not None and not self.jitter >= 0:
            raise ForethoughtError(f"GP jitter must be >= 0, got {self.jitter}")
        for name in ("max_lengthscale_ratio", "max_snr"):
            if not getattr(self, name) > 1:
                raise ForethoughtError(f"GP {name} must be > 1, got {getattr(self, name)}")
        if not self.tolerance >= 0:
            raise ForethoughtError(f"GP tolerance must be >= 0, got {self.tolerance}")
        if not self.init_noise > 0:
            raise ForethoughtError(f"GP init_noise must be > 0, got {self.init_noise}")


@dataclasses.dataclass(frozen=True)
class GPSpec:
    """The shape of a GP: what `save` records and `load` rebuilds."""

    input_dim: int
    output_dim: int
    points: int
    jitter: float
    state_dim: int | None = None
    """Set for dynamics GPs (`GP.fit_dynamics`): inputs `[state_features(s), u]`, targets `s' - s`."""
    action_dim: int | None = None
    angles: tuple[int, ...] = ()
    sparse: bool = False
    """Built by `GP.sparse`: `X` holds inducing inputs and `beta`, `iK` are FITC's (`L` unused)."""


# ----- the kernel and the likelihood, in normalised units, one output dimension -------------------

def _scaled_sq_dist(A: jax.Array, B: jax.Array, log_ell: jax.Array) -> jax.Array:
    """`(a - b)^T Lambda^{-1} (a - b)` for rows of `A [N, D]` and `B [M, D]` -> `[N, M]`."""
    a, b = A * jnp.exp(-log_ell), B * jnp.exp(-log_ell)
    d2 = jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :] - 2.0 * a @ b.T
    return jnp.maximum(d2, 0.0)


def _kernel(A: jax.Array, B: jax.Array, log_ell: jax.Array, log_sf2: jax.Array) -> jax.Array:
    """`k(a, b) = alpha^2 exp(-1/2 (a - b)^T Lambda^{-1} (a - b))` for rows of `A [N, D]` and `B [M, D]`."""
    return jnp.exp(log_sf2 - 0.5 * _scaled_sq_dist(A, B, log_ell))


def _gram(X: jax.Array, params: dict, jitter: float, mask: jax.Array) -> jax.Array:
    """`K = [k(x_i, x_j)] + (sigma^2 + jitter alpha^2) I` over the real points (`mask` 1); padding
    points (`mask` 0) get a row and column of the identity, so they change neither `log|K|` nor
    `y^T K^{-1} y` (their targets are 0)."""
    sf2 = jnp.exp(params["log_sf2"])
    K = sf2 * jnp.exp(-0.5 * _scaled_sq_dist(X, X, params["log_ell"])) * (mask[:, None] * mask[None, :])
    return K + jnp.diag((jnp.exp(params["log_sn2"]) + jitter * sf2) * mask + (1 - mask))


def _neg_log_marginal(params: dict, X: jax.Array, y: jax.Array, jitter: float, mask: jax.Array) -> jax.Array:
    L = jnp.linalg.cholesky(_gram(X, params, jitter, mask))
    alpha = jsl.cho_solve((L, True), y)
    return 0.5 * y @ alpha + jnp.sum(jnp.log(jnp.diag(L))) + 0.5 * jnp.sum(mask) * math.log(2 * math.pi)


def _curb(params: dict, max_ratio: float, max_snr: float) -> jax.Array:
    """PILCO's flat-bottomed penalty (`hypCurb`): ~0 inside the bounds, steep outside."""
    p = 30
    ell = jnp.sum((params["log_ell"] / math.log(max_ratio)) ** p)
    snr = ((0.5 * (params["log_sf2"] - params["log_sn2"])) / math.log(max_snr)) ** p
    return ell + snr


@functools.partial(jax.jit, static_argnames=("optimizer", "steps", "tolerance", "learning_rate",
                                             "jitter", "max_ratio", "max_snr"))
def _optimise(X, Y, init, mask, *, optimizer, steps, tolerance, learning_rate, jitter, max_ratio, max_snr):
    """Minimise the per-point negative log marginal likelihood plus the curb for every output
    dimension and restart at once: `Y [N, d]`, `init` leaves `[d, R, ...]`; returns the best
    parameters seen per (output, restart), their objective `[d, R]` (inf if never finite) and the
    iterations taken `[d, R]`. L-BFGS stops early once an iteration lowers the objective by less
    than `tolerance`; Adam runs all `steps`."""
    N = jnp.sum(mask)

    def one(y, params0):
        def objective(params):
            return _neg_log_marginal(params, X, y, jitter, mask) / N + _curb(params, max_ratio, max_snr)

        if optimizer == "lbfgs":
            opt = optax.lbfgs()
            value_and_grad = optax.value_and_grad_from_state(objective)
        else:
            opt = optax.adam(learning_rate)
            value_and_grad = jax.value_and_grad(objective)

        def step(carry):
            i, params, state, best_value, best, _, previous = carry  # previous: last iteration's value
            if optimizer == "lbfgs":
                value, grad = value_and_grad(params, state=state)
                updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                            value_fn=objective)
            else:
                value, grad = value_and_grad(params)
                updates, state = opt.update(grad, state, params)
            # keep the best finite point: a step into a failed Cholesky must not poison the result
            better = jnp.isfinite(value) & (value < best_value)
            best = jax.tree.map(lambda new, old: jnp.where(better, new, old), params, best)
            best_value = jnp.where(better, value, best_value)
            return i + 1, optax.apply_updates(params, updates), state, best_value, best, previous, value

        def going(carry):
            i, *_, previous, value = carry
            if optimizer == "adam":
                return i < steps
            return (i < steps) & ~(jnp.abs(previous - value) < tolerance)

        inf = jnp.asarray(jnp.inf, X.dtype)
        start = (jnp.asarray(0), params0, opt.init(params0), inf, params0, inf, inf)
        i, params, _, best_value, best, _, _ = jax.lax.while_loop(going, step, start)
        last = objective(params)
        better = jnp.isfinite(last) & (last < best_value)
        best = jax.tree.map(lambda new, old: jnp.where(better, new, old), params, best)
        return best, jnp.where(better, last, best_value), i

    over_restarts = jax.vmap(one, in_axes=(None, 0))
    return jax.vmap(over_restarts, in_axes=(1, 0))(Y, init)


@functools.partial(jax.jit, static_argnames=("jitter",))
def _posterior(X, Y, params, mask, *, jitter):
    """Per output: Cholesky factor `L [d, N, N]` of `K_a`, `K_a^{-1} [d, N, N]`, `beta [d, N]`."""

    def one(y, p):
        L = jnp.linalg.cholesky(_gram(X, p, jitter, mask))
        eye = jnp.eye(X.shape[0], dtype=X.dtype)
        return L, jsl.cho_solve((L, True), eye), jsl.cho_solve((L, True), y)

    return jax.vmap(one, in_axes=(1, 0))(Y, params)


PAD = 1e4
"""Padding rows sit at this input (in normalised units, every dimension): their kernel values with
anything real underflow to exactly 0, so padded GPs predict and moment-match exactly as unpadded
ones, and every fit to at most `capacity` points has the same shapes (one compilation)."""


def _pad(Xn: jax.Array, Yn: jax.Array, rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pad normalised data to `rows` rows; returns them and the mask (1 real, 0 padding)."""
    extra = rows - Xn.shape[0]
    mask = jnp.concatenate([jnp.ones(Xn.shape[0], Xn.dtype), jnp.zeros(extra, Xn.dtype)])
    return (jnp.concatenate([Xn, jnp.full((extra, Xn.shape[1]), PAD, Xn.dtype)]),
            jnp.concatenate([Yn, jnp.zeros((extra, Yn.shape[1]), Yn.dtype)]), mask)


def _default_jitter(dtype) -> float:
    return 1e-6 if jnp.dtype(dtype) == jnp.float64 else 1e-4


class GP(eqx.Module):
    """Exact GPs, one per output dimension, conditioned on data. Build with `GP.fit`,
    `GP.fit_dynamics` or `GP.from_hyperparameters`; all arrays below are in normalised units."""

    X: jax.Array
    """Training inputs `[N, D]`."""
    Y: jax.Array
    """Training targets `[N, d]`."""
    log_lengthscale: jax.Array
    """`log l_a`, `[d, D]`."""
    log_signal_var: jax.Array
    """`log alpha_a^2`, `[d]`."""
    log_noise_var: jax.Array
    """`log sigma_a^2`, `[d]`."""
    L: jax.Array
    """Cholesky factors of `K_a`, `[d, N, N]`."""
    iK: jax.Array
    """`K_a^{-1}`, `[d, N, N]` (moment matching needs it whole)."""
    beta: jax.Array
    """`K_a^{-1} y_a`, `[d, N]`."""
    input_norm: Normalizer
    target_norm: Normalizer
    spec: GPSpec = eqx.field(static=True)
    mask: jax.Array
    """`[N]`: 1 for a data point, 0 for padding (`fit_dynamics(..., capacity=)`)."""

    # ----- construction -------------------------------------------------------------------------
    @classmethod
    def from_hyperparameters(cls, X, Y, lengthscale, signal_var, noise_var, *, jitter: float = 0.0,
                             normalise: bool = False) -> "GP":
        """Condition GPs with fixed hyperparameters on `X [N, D]`, `Y [N, d]`.

        `lengthscale [d, D]` (or `[D]`, shared), `signal_var [d]` and `noise_var [d]` (or
        scalars) are in the data's units, or in normalised units with `normalise=True`, which
        first normalises `X` and `Y` with their own statistics. `jitter` (relative to the signal
        variance) is added to the diagonal. Raises `ForethoughtError` if a Cholesky factor fails.
        """
        X, Y = _check_xy(X, Y, "GP.from_hyperparameters")
        N, D = X.shape
        d = Y.shape[1]
        if normalise:
            input_norm, target_norm = Normalizer.fit(X), Normalizer.fit(Y)
        else:
            input_norm = Normalizer(jnp.zeros(D, X.dtype), jnp.ones(D, X.dtype))
            target_norm = Normalizer(jnp.zeros(d, X.dtype), jnp.ones(d, X.dtype))
        ell = jnp.broadcast_to(jnp.asarray(lengthscale, X.dtype), (d, D))
        sf2 = jnp.broadcast_to(jnp.asarray(signal_var, X.dtype), (d,))
        sn2 = jnp.broadcast_to(jnp.asarray(noise_var, X.dtype), (d,))
        if not (bool(jnp.all(ell > 0)) and bool(jnp.all(sf2 > 0)) and bool(jnp.all(sn2 >= 0))):
            raise ForethoughtError("GP.from_hyperparameters: lengthscale and signal_var must be > 0 and "
                                   f"noise_var >= 0, got {np.asarray(ell).tolist()}, "
                                   f"{np.asarray(sf2).tolist()}, {np.asarray(sn2).tolist()}")
        params = {"log_ell": jnp.log(ell), "log_sf2": jnp.log(sf2), "log_sn2": jnp.log(sn2)}
        spec = GPSpec(D, d, N, float(jitter))
        return cls._condition(input_norm(X), target_norm(Y), params, input_norm, target_norm, spec)

    @classmethod
    def _condition(cls, Xn, Yn, params, input_norm, target_norm, spec, mask=None) -> "GP":
        mask = jnp.ones(Xn.shape[0], Xn.dtype) if mask is None else mask
        L, iK, beta = _posterior(Xn, Yn, params, mask, jitter=spec.jitter)
        bad = ~(np.all(np.isfinite(np.asarray(L)), axis=(1, 2)) & np.all(np.isfinite(np.asarray(beta)), axis=1))
        if bad.any():
            dims = np.where(bad)[0].tolist()
            sn2 = np.exp(np.asarray(params["log_sn2"]))[bad].tolist()
            precision = "" if Xn.dtype == jnp.float64 else ", or work in float64 (jax.enable_x64)"
            raise NumericalFault(
                "GP Cholesky", f"conditioning on {int(np.asarray(mask).sum())} points",
                f"the Cholesky factorisation of K + (noise + jitter) I failed (NaN in the factor) for "
                f"output dimension(s) {dims} (noise variance {sn2} in normalised units, jitter {spec.jitter} "
                "times the signal variance): the kernel matrix is not numerically positive definite, "
                "usually because of duplicated or nearly duplicated inputs with too little noise. Raise "
                "the jitter (GPConfig.jitter), raise the noise floor (a lower GPConfig.max_snr), or remove "
                f"duplicate inputs{precision}.")
        return cls(Xn, Yn, params["log_ell"], params["log_sf2"], params["log_sn2"], L, iK, beta,
                   input_norm, target_norm, spec, mask)

    @classmethod
    def fit(cls, X, Y, key: jax.Array, config: GPConfig = GPConfig()) -> "GP":
        """Fit hyperparameters by maximum marginal likelihood to `X [N, D]`, `Y [N, d]` and condition
        on all the data. `key` draws the restarts' perturbations and the fitting subset.

        Raises `ForethoughtError` on NaN/inf data, wrong shapes, or a failed Cholesky factor.
        """
        return cls._fit(X, Y, key, config, None)

    @classmethod
    def _fit(cls, X, Y, key, config: GPConfig, spec: GPSpec | None, capacity: int | None = None) -> "GP":
        X, Y = _check_xy(X, Y, "GP.fit")
        N, D = X.shape
        d = Y.shape[1]
        jitter = float(config.jitter if config.jitter is not None else _default_jitter(X.dtype))
        input_norm, target_norm = Normalizer.fit(X), Normalizer.fit(Y)
        Xn, Yn = input_norm(X), target_norm(Y)

        subset_key, init_key = jax.random.split(key)
        if capacity is not None:
            if capacity < N:
                raise ForethoughtError(f"GP.fit: capacity ({capacity}) is smaller than the data ({N} points)")
            Xn, Yn, mask = _pad(Xn, Yn, capacity)
        else:
            mask = jnp.ones(N, X.dtype)
        if N > config.max_points:
            index = jax.random.permutation(subset_key, N)[: config.max_points]
            Xfit, Yfit, fit_mask = Xn[index], Yn[index], mask[index]
        else:
            Xfit, Yfit, fit_mask = Xn, Yn, mask
        R = config.restarts
        noise = jax.random.normal(init_key, (d, R, D + 2), X.dtype).at[:, 0].set(0.0)
        init = {"log_ell": 0.5 * noise[..., :D],
                "log_sf2": 0.5 * noise[..., D],
                "log_sn2": jnp.full((d, R), 2 * math.log(config.init_noise), X.dtype) + noise[..., D + 1]}
        steps = config.steps or (100 if config.optimizer == "lbfgs" else 300)
        best, value, _ = _optimise(Xfit, Yfit, init, fit_mask, optimizer=config.optimizer, steps=steps,
                                   tolerance=config.tolerance, learning_rate=config.learning_rate,
                                   jitter=jitter, max_ratio=config.max_lengthscale_ratio,
                                   max_snr=config.max_snr)
        value = np.asarray(value)
        if not np.all(np.any(np.isfinite(value), axis=1)):
            dims = np.where(~np.any(np.isfinite(value), axis=1))[0].tolist()
            raise NumericalFault("GP fit", f"{N} points", f"the marginal likelihood was never finite for output "
                                 f"dimension(s) {dims}; raise GPConfig.jitter or check the data for duplicates")
        pick = jnp.asarray(np.argmin(np.where(np.isfinite(value), value, np.inf), axis=1))
        params = jax.tree.map(lambda a: a[jnp.arange(d), pick], best)
        spec = spec or GPSpec(D, d, Xn.shape[0], jitter)
        spec = dataclasses.replace(spec, jitter=jitter, points=Xn.shape[0])
        return cls._condition(Xn, Yn, params, input_norm, target_norm, spec, mask)

    @classmethod
    def fit_dynamics(cls, obs, action, next_obs, key: jax.Array, config: GPConfig = GPConfig(),
                     angles: tuple[int, ...] = (), capacity: int | None = None) -> "GP":
        """A dynamics GP from transitions `obs [N, n]`, `action [N, m]`, `next_obs [N, n]`: inputs
        `[state_features(obs, angles), action]`, targets `next_obs - obs` (one GP per state dim).
        `capacity` pads the data to that many rows (exactly: see `PAD`), so that a loop whose data
        grows compiles its fits and predictions once per capacity instead of once per size."""
        obs, next_obs, action = (jnp.asarray(a) for a in (obs, next_obs, action))
        if action.ndim == 1:
            action = action[:, None]
        if obs.ndim != 2 or next_obs.shape != obs.shape or action.ndim != 2 or len(action) != len(obs):
            raise ForethoughtError(f"GP.fit_dynamics: expected obs and next_obs [N, n] and action [N, m], got "
                                   f"{obs.shape}, {next_obs.shape} and {action.shape}")
        n, m = obs.shape[1], action.shape[1]
        angles = tuple(int(i) for i in angles)
        if any(not 0 <= i < n for i in angles):
            raise ForethoughtError(f"GP.fit_dynamics: angles must index the state (0..{n - 1}), got {angles}")
        for name, array in (("obs", obs), ("action", action), ("next_obs", next_obs)):
            check_finite(array, name, where="GP.fit_dynamics")
        inputs = jnp.concatenate([state_features(obs, angles), action], axis=1)
        spec = GPSpec(inputs.shape[1], n, len(obs), 0.0, n, m, angles)
        return cls._fit(inputs, next_obs - obs, key, config, spec, capacity)

    # ----- hyperparameters in the data's units ---------------------------------------------------
    @property
    def lengthscale(self) -> jax.Array:
        """`l_a` in input units, `[d, D]`."""
        return jnp.exp(self.log_lengthscale) * self.input_norm.std

    @property
    def signal_var(self) -> jax.Array:
        """`alpha_a^2` in target units squared, `[d]`."""
        return jnp.exp(self.log_signal_var) * self.target_norm.std**2

    @property
    def noise_var(self) -> jax.Array:
        """The observation noise in target units squared, `[d]`: `sigma_a^2` plus the jitter
        (`jitter alpha_a^2`), which the likelihood sees as noise too."""
        return self._noise() * self.target_norm.std**2

    def _noise(self) -> jax.Array:
        """`sigma_a^2 + jitter alpha_a^2` in normalised units, `[d]`."""
        return jnp.exp(self.log_noise_var) + self.spec.jitter * jnp.exp(self.log_signal_var)

    def log_marginal_likelihood(self) -> jax.Array:
        """`log p(y_a | X)` per output `[d]`, of the normalised targets (add `-N log std_a` for the
        targets' own units)."""
        if self.spec.sparse:
            raise ForethoughtError("GP.log_marginal_likelihood: this GP is a sparse approximation "
                                   "(GP.sparse); take the likelihood of the exact GP it came from")
        y = self.Y.T
        fit_term = 0.5 * jnp.sum(y * self.beta, axis=1)
        log_det = jnp.sum(jnp.log(jnp.diagonal(self.L, axis1=1, axis2=2)), axis=1)
        return -(fit_term + log_det + 0.5 * jnp.sum(self.mask) * math.log(2 * math.pi))

    # ----- predictions -----------------------------------------------------------------------------
    def predict(self, x: jax.Array, noise: bool = False) -> tuple[jax.Array, jax.Array]:
        """Posterior mean and variance of `f(x)` for deterministic inputs `x [..., D]` -> `[..., d]`
        each, in the targets' units; `noise=True` adds the noise (`noise_var`: the variance of a new
        observation)."""
        x = jnp.asarray(x)
        lead = x.shape[:-1]
        z = self.input_norm(x.reshape(-1, self.spec.input_dim))
        mean, var = jax.vmap(self._predict_one, in_axes=(0, None))(z, noise)
        mean = self.target_norm.inverse(mean)
        var = var * self.target_norm.std**2
        d = self.spec.output_dim
        return mean.reshape(*lead, d), var.reshape(*lead, d)

    def predict_mean(self, x: jax.Array) -> jax.Array:
        """Only the posterior mean `[..., d]` (no `O(N^2)` variance), for `x [..., D]`."""
        z = self.input_norm(jnp.asarray(x))

        def per_output(log_ell, log_sf2, beta):
            return _kernel(z.reshape(-1, self.spec.input_dim), self.X, log_ell, log_sf2) @ beta

        mean = jax.vmap(per_output, out_axes=-1)(self.log_lengthscale, self.log_signal_var, self.beta)
        return self.target_norm.inverse(mean).reshape(*z.shape[:-1], self.spec.output_dim)

    def _predict_one(self, z: jax.Array, noise: bool) -> tuple[jax.Array, jax.Array]:
        def per_output(log_ell, log_sf2, noise_var, L, iK, beta):
            k = _kernel(self.X, z[None], log_ell, log_sf2)[:, 0]
            if self.spec.sparse:
                explained = k @ iK @ k
            else:
                v = jsl.solve_triangular(L, k, lower=True)
                explained = v @ v
            var = jnp.maximum(jnp.exp(log_sf2) - explained, 0.0)
            return k @ beta, var + (noise_var if noise else 0.0)

        return jax.vmap(per_output)(self.log_lengthscale, self.log_signal_var, self._noise(),
                                    self.L, self.iK, self.beta)

    def sparse(self, inducing: int) -> "GP":
        """The FITC approximation (Snelson and Ghahramani 2006; PILCO's code switches to it past
        a few hundred points) on `inducing` of the data's own inputs, chosen by farthest-point
        sampling in normalised input space so that rare regions (the cart-pole upright) keep
        their points; the hyperparameters stay this GP's. Per output, with `Q = K_fu K_uu^{-1} K_uf`
        and `Lambda = diag(K_ff - Q) + sigma^2`,

            Sigma = K_uu + K_uf Lambda^{-1} K_fu,   beta = Sigma^{-1} K_uf Lambda^{-1} y,
            mean = k_u^T beta,   var = alpha^2 - k_u^T (K_uu^{-1} - Sigma^{-1}) k_u,

        so moment matching, prediction and PILCO use it unchanged with `iK = K_uu^{-1} - Sigma^{-1}`
        and cost `O(inducing^2)` instead of `O(N^2)`. Returns `self` when the data has at most
        `inducing` points. `log_marginal_likelihood` is refused on the result (not FITC's)."""
        if inducing < 1:
            raise ForethoughtError(f"GP.sparse: inducing must be >= 1, got {inducing}")
        real = np.flatnonzero(np.asarray(self.mask) > 0)
        if len(real) <= inducing or self.spec.sparse:
            return self
        Z = self.X[jnp.asarray(_farthest_points(np.asarray(self.X)[real], inducing, real))]
        beta, iK = _fitc(Z, self.X, self.Y, self.mask, self.log_lengthscale, self.log_signal_var,
                         self._noise(), jitter=self.spec.jitter)
        if not (bool(jnp.all(jnp.isfinite(beta))) and bool(jnp.all(jnp.isfinite(iK)))):
            raise NumericalFault("GP Cholesky", f"FITC on {inducing} of {len(real)} points",
                                 "a Cholesky factor of the sparse approximation failed; raise GPConfig.jitter")
        M = Z.shape[0]
        return dataclasses.replace(self, X=Z, Y=jnp.zeros((M, self.spec.output_dim), Z.dtype),
                                   L=jnp.full_like(iK, jnp.nan), iK=iK, beta=beta, mask=jnp.ones(M, Z.dtype),
                                   spec=dataclasses.replace(self.spec, points=M, sparse=True))

    def moment_match(self, m: jax.Array, S: jax.Array, noise: bool = False
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Exact mean and covariance of `f(x)` for a Gaussian input `x ~ N(m [D], S [D, D])` in the
        GP's input space, and the input-output cross-covariance.

        Returns `M [d]`, `S_out [d, d]` (the covariance of `f(x)`, including `E_x[var f(x)]` and the
        cross terms between output dimensions) and `C = cov[x, f(x)] [D, d]`, all in the data's
        units. `noise=True` adds the noise variances (`noise_var`) to the diagonal of `S_out`.

        Conventions: the input space is whatever the GP was fit on; for a dynamics GP that is
        `[state_features(s), u]` (non-angle state dims, then sin and cos of the angle dims, then
        the action), so a caller such as PILCO builds the joint Gaussian over those features
        itself (the sin/cos expectations of a Gaussian angle and the policy's moments). The output
        is the state *difference*: the next state is `s + f`, and PILCO chains the cross-covariance
        to the state as `cov[s, f] ~= cov[s, x~] S^{-1} C` (PILCO's code returns `V = S^{-1} C`
        instead of `C`). `S` may be singular (e.g. an action that is a deterministic function of
        the state); nothing here inverts it.

        Cost `O(d^2 N^2 D)`; the `[N, N]` terms are recomputed in the backward pass
        (`jax.checkpoint`) rather than stored, so differentiating a long rollout stays small.
        """
        M, Sf, V = self.propagate(m, S, noise)
        return M, Sf, jnp.asarray(S, M.dtype) @ V

    def propagate(self, m: jax.Array, S: jax.Array, noise: bool = False
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`moment_match` in the form `models.moments` chains: `M`, `S_out` and
        `V = S^{-1} cov[x, f(x)] [D, d]`, computed without inverting `S` (PILCO's `V`)."""
        m = jnp.asarray(m, self.X.dtype)
        S = jnp.asarray(S, self.X.dtype)
        D = self.spec.input_dim
        if m.shape != (D,) or S.shape != (D, D):
            raise ForethoughtError(f"GP.moment_match: m must have shape ({D},) and S ({D}, {D}), "
                                   f"got {m.shape} and {S.shape}")
        s_in, s_out = self.input_norm.std, self.target_norm.std
        mz = self.input_norm(m)
        Sz = S / (s_in[:, None] * s_in[None, :])
        M, Sf, V = se_moments(self.X, self.beta, self.log_lengthscale, self.log_signal_var, mz, Sz, self.iK)
        if noise:
            Sf = Sf + jnp.diag(self._noise())
        M = self.target_norm.inverse(M)
        Sf = Sf * (s_out[:, None] * s_out[None, :])
        V = V * (s_out[None, :] / s_in[:, None])
        return M, Sf, V

    # ----- dynamics -------------------------------------------------------------------------------
    def inputs(self, x: jax.Array, u: jax.Array) -> jax.Array:
        """GP inputs `[state_features(x), u]` from states `[..., n]` and actions `[..., m]` (or `[m]`)."""
        self._require_dynamics("inputs")
        u = jnp.broadcast_to(jnp.atleast_1d(u), (*x.shape[:-1], self.spec.action_dim))
        return jnp.concatenate([state_features(x, self.spec.angles), u], axis=-1)

    def as_dynamics(self) -> Callable:
        """`dynamics(x [n] or [..., n], u [m], t) -> x + E[f(x~)]`, the posterior-mean next state
        (the planners' contract). No key: the mean is deterministic; PILCO propagates the full
        Gaussian with `moment_match` instead."""
        self._require_dynamics("as_dynamics")

        def dynamics(x, u, t):
            del t
            return x + self.predict_mean(self.inputs(x, u))

        return dynamics

    def evaluate(self, obs, action, next_obs) -> dict[str, float]:
        """One-step metrics in the system's units (the keys of the ensemble's `evaluate`): Gaussian
        NLL of the next state under the predictive `N(mean, var + noise_var)`, MSE of the mean, and
        calibration (fraction of true next states within 1 and 2 predicted standard deviations,
        ideally 0.683 and 0.954)."""
        self._require_dynamics("evaluate")
        dtype = self.X.dtype
        obs, action, next_obs = (jnp.asarray(a, dtype) for a in (obs, action, next_obs))
        if action.ndim == 1:
            action = action[:, None]
        mean, var = _predict_jit(self, self.inputs(obs, action), True)
        mean = obs + mean
        var = jnp.maximum(var, jnp.finfo(dtype).tiny)
        err = next_obs - mean
        z = jnp.abs(err) / jnp.sqrt(var)
        nll = 0.5 * jnp.mean(err**2 / var + jnp.log(2 * jnp.pi * var))
        return {"nll": float(nll), "mse": float(jnp.mean(err**2)),
                "within_1sigma": float(jnp.mean(z <= 1.0)), "within_2sigma": float(jnp.mean(z <= 2.0))}

    def open_loop_error(self, states, actions) -> np.ndarray:
        """Mean squared error per step `[T]` of the posterior-mean rollout from `states[0]` under
        `actions [T, m]` against the recorded `states [T + 1, n]` (multi-step open-loop error)."""
        self._require_dynamics("open_loop_error")
        states = jnp.asarray(states, self.X.dtype)
        actions = jnp.asarray(actions, self.X.dtype)
        if actions.ndim == 1:
            actions = actions[:, None]
        if states.shape[0] != actions.shape[0] + 1:
            raise ForethoughtError(f"open_loop_error: states must have one row more than actions, got "
                                   f"{states.shape} and {actions.shape}")
        return np.asarray(_open_loop(self, states, actions))

    def _require_dynamics(self, what: str) -> None:
        if self.spec.state_dim is None:
            raise ForethoughtError(f"GP.{what} needs a dynamics GP (built with GP.fit_dynamics); this one "
                                   "was fit to plain inputs and targets")

    # ----- persistence ----------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Arrays to an `.npz` with the spec as JSON metadata (no pickle), atomically."""
        from forethought.checkpoint import save

        spec = dataclasses.asdict(self.spec)
        save(Path(path), self, {"kind": "gp", "spec": spec, "dtype": str(self.X.dtype)})

    @classmethod
    def load(cls, path: Path) -> "GP":
        from forethought.checkpoint import load, load_meta

        meta = load_meta(Path(path))
        if meta.get("kind") != "gp":
            raise ForethoughtError(f"{path} is not a GP checkpoint (kind {meta.get('kind')!r})")
        fields = dict(meta["spec"])
        fields["angles"] = tuple(fields.get("angles", ()))
        spec = GPSpec(**fields)
        dtype = jnp.dtype(meta["dtype"])
        if dtype == jnp.float64 and not jax.config.jax_enable_x64:
            raise ForethoughtError(f"{path} holds a float64 GP; load it with float64 enabled "
                                   "(jax.enable_x64(True) or JAX_ENABLE_X64=1)")
        N, D, d = spec.points, spec.input_dim, spec.output_dim

        def zeros(*shape):
            return jnp.zeros(shape, dtype)

        like = cls(zeros(N, D), zeros(N, d), zeros(d, D), zeros(d), zeros(d), zeros(d, N, N),
                   zeros(d, N, N), zeros(d, N), Normalizer(zeros(D), zeros(D)),
                   Normalizer(zeros(d), zeros(d)), spec, zeros(N))
        model, _ = load(Path(path), like)
        return model


def se_moments(X: jax.Array, beta: jax.Array, log_ell: jax.Array, log_sf2: jax.Array, m: jax.Array,
               S: jax.Array, iK: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Moments of `f_a(x) = sum_i beta_ai k_a(X_i, x)` (SE kernels, `log_ell [d, D]`, `log_sf2 [d]`,
    `beta [d, N]`, centres `X [N, D]`) for a Gaussian `x ~ N(m, S)` (the module docstring's
    equations). With `iK [d, N, N]` (a GP's `K_a^{-1}`) the covariance includes the posterior
    variance `E_x[var f_a(x)] = alpha_a^2 - tr(K_a^{-1} Q_aa)`; without it `f` is a deterministic
    RBF network (PILCO's RBF policy). Returns `M [d]`, `cov[f] [d, d]` and
    `V = S^{-1} cov[x, f] [D, d]`, computed without inverting `S` (which may be singular)."""
    D = m.shape[0]
    eye = jnp.eye(D, dtype=m.dtype)
    nu = X - m  # [N, D]

    def mean_and_slope(log_ell, log_sf2, beta):
        iell = jnp.exp(-log_ell)
        inp = nu * iell  # Lambda^{-1/2} nu_i
        B = iell[:, None] * S * iell[None, :] + eye  # Lambda^{-1/2} S Lambda^{-1/2} + I
        t = jnp.linalg.solve(B, inp.T).T
        _, logdet = jnp.linalg.slogdet(B)
        q = jnp.exp(log_sf2 - 0.5 * jnp.sum(inp * t, axis=1) - 0.5 * logdet)
        bq = beta * q
        # (S + Lambda)^{-1} nu_i = Lambda^{-1/2} B^{-1} Lambda^{-1/2} nu_i = iell * t_i
        return jnp.sum(bq), (t * iell).T @ bq

    M, V = jax.vmap(mean_and_slope)(log_ell, log_sf2, beta)

    scaled = nu[None] * jnp.exp(-log_ell)[:, None]  # [d, N, D]
    log_k = log_sf2[:, None] - 0.5 * jnp.sum(scaled**2, -1)  # log k_a(x_i, m), [d, N]

    @jax.checkpoint
    def Q(log_ell_a, log_ell_b, log_k_a, log_k_b):
        """`Q_ij` for outputs a and b, `[N, N]`."""
        ia, ib = jnp.exp(-2 * log_ell_a), jnp.exp(-2 * log_ell_b)
        R = S * (ia + ib)[None, :] + eye
        A = jnp.linalg.solve(R, S) / 2
        A = (A + A.T) / 2
        za, zb = nu * ia, nu * ib  # Lambda_a^{-1} nu_i, Lambda_b^{-1} nu_j
        maha = (jnp.sum((za @ A) * za, 1)[:, None] + jnp.sum((zb @ A) * zb, 1)[None, :]
                + 2 * (za @ A) @ zb.T)
        _, logdet = jnp.linalg.slogdet(R)
        return jnp.exp(log_k_a[:, None] + log_k_b[None, :] + maha - 0.5 * logdet)

    # Q_ab = Q_ba: one Q per unordered pair, the d diagonal pairs (which also give the expected
    # variance's trace) apart from the d(d-1)/2 others
    def diagonal(ell, k, beta, iK):
        Q_aa = Q(ell, ell, k, k)
        trace = jnp.zeros((), m.dtype) if iK is None else jnp.sum(iK * Q_aa)
        return beta @ Q_aa @ beta, trace

    def off_diagonal(a_ell, a_k, a_beta, b_ell, b_k, b_beta):
        return a_beta @ Q(a_ell, b_ell, a_k, b_k) @ b_beta

    d = log_ell.shape[0]
    second, trace = jax.vmap(diagonal, in_axes=(0, 0, 0, None if iK is None else 0))(log_ell, log_k, beta, iK)
    EfF = jnp.diag(second)
    if d > 1:
        a, b = np.triu_indices(d, 1)
        upper = jax.vmap(off_diagonal)(log_ell[a], log_k[a], beta[a], log_ell[b], log_k[b], beta[b])
        EfF = EfF.at[a, b].set(upper).at[b, a].set(upper)
    Sf = EfF - jnp.outer(M, M)
    if iK is not None:  # E_x[var f_a(x)] = alpha_a^2 - tr(K_a^{-1} Q_aa)
        Sf = Sf + jnp.diag(jnp.exp(log_sf2) - trace)
    return M, (Sf + Sf.T) / 2, V.T


def _farthest_points(X: np.ndarray, count: int, index: np.ndarray) -> np.ndarray:
    """`index` of `count` rows of `X` picked greedily, each the farthest from those picked (the
    first: the row farthest from the mean)."""
    chosen = [int(np.argmax(np.sum((X - X.mean(0)) ** 2, 1)))]
    dist = np.sum((X - X[chosen[0]]) ** 2, 1)
    for _ in range(count - 1):
        chosen.append(int(np.argmax(dist)))
        dist = np.minimum(dist, np.sum((X - X[chosen[-1]]) ** 2, 1))
    return index[np.asarray(chosen)]


@functools.partial(jax.jit, static_argnames=("jitter",))
def _fitc(Z, X, Y, mask, log_ell, log_sf2, noise, *, jitter):
    """FITC's `beta [d, M]` and `K_uu^{-1} - Sigma^{-1} [d, M, M]` (`GP.sparse`), through
    `Sigma = L_uu B L_uu^T`, `B = I + V Lambda^{-1} V^T`, `V = L_uu^{-1} K_uf`, which stays well
    conditioned when the noise is small."""
    eye = jnp.eye(Z.shape[0], dtype=Z.dtype)

    def one(y, log_ell, log_sf2, noise):
        sf2 = jnp.exp(log_sf2)
        Kuu = _kernel(Z, Z, log_ell, log_sf2) + jitter * sf2 * eye
        Kuf = _kernel(Z, X, log_ell, log_sf2) * mask[None, :]
        Luu = jnp.linalg.cholesky(Kuu)
        V = jsl.solve_triangular(Luu, Kuf, lower=True)
        lam = jnp.maximum(sf2 - jnp.sum(V * V, 0), 0.0) + noise
        LB = jnp.linalg.cholesky(eye + (V / lam) @ V.T)
        # beta = L_uu^{-T} B^{-1} V Lambda^{-1} y;  iK = L_uu^{-T} (I - B^{-1}) L_uu^{-1}
        w = jsl.cho_solve((LB, True), V @ (y * mask / lam))
        beta = jsl.solve_triangular(Luu.T, w, lower=False)
        inner = eye - jsl.cho_solve((LB, True), eye)
        left = jsl.solve_triangular(Luu.T, inner, lower=False)
        iK = jsl.solve_triangular(Luu.T, left.T, lower=False)
        return beta, (iK + iK.T) / 2

    return jax.vmap(one)(Y.T, log_ell, log_sf2, noise)


@eqx.filter_jit
def _predict_jit(gp: GP, x, noise):
    return gp.predict(x, noise)


@eqx.filter_jit
def _open_loop(gp: GP, states, actions):
    dynamics = gp.as_dynamics()

    def step(x, u):
        x = dynamics(x, u, 0)
        return x, x

    _, predicted = jax.lax.scan(step, states[0], actions)
    return jnp.mean((predicted - states[1:]) ** 2, axis=-1)


def _check_xy(X, Y, where: str) -> tuple[jax.Array, jax.Array]:
    X, Y = jnp.asarray(X), jnp.asarray(Y)
    if not jnp.issubdtype(X.dtype, jnp.floating):
        X = X.astype(jnp.result_type(float))
    Y = Y.astype(X.dtype)
    if Y.ndim == 1:
        Y = Y[:, None]
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
        raise ForethoughtError(f"{where}: expected inputs X [N, D] and targets Y [N, d], "
                               f"got {X.shape} and {Y.shape}")
    if len(X) < 2:
        raise ForethoughtError(f"{where}: need at least 2 data points, got {len(X)}")
    check_finite(X, "inputs X", where=where)
    check_finite(Y, "targets Y", where=where)
    return X, Y
