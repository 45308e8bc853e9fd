"""Policy distillation: one student trained on the soft targets of one or several teachers
(seed 000, "Global Policy", Distillation; Hinton et al. 2015; Rusu et al. 2016, policy
distillation; Parisotto et al. 2016, actor-mimic).

Discrete actions. A teacher's logits `z` give the soft targets of the note,

    p_i = exp(z_i / T) / sum_j exp(z_j / T)                                  (`soft_targets`)

and the student with logits `s` minimises the cross-entropy to them at the same temperature,

    L = T^2 * E_batch[ - sum_i p_i log softmax(s / T)_i ]               (`discrete_distill_loss`)

The cross-entropy is the note's actor-mimic loss `sum_a pi_i(a|s) log pi_AMN(a|s)` with the sign
that makes it a loss; it differs from `D_KL(p || softmax(s / T))` only by the teacher's entropy,
which the student cannot change. The factor `T^2` is Hinton et al.'s: the gradient with respect to
`s` is `T (softmax(s / T) - p)`, which for large `T` tends to `(s - z) / N` for zero-mean logits
(matching logits), so the gradient's scale does not vanish as `T` grows and one learning rate
serves every temperature. With `T = 1` the loss is the plain cross-entropy of the actor-mimic
network.

Continuous actions. Teachers and student are diagonal Gaussians and the student minimises
`D_KL(pi_teacher || pi_student)` (`gaussian_kl`): the continuous form of the same cross-entropy
(again up to the teacher's entropy). It is invariant under any affine change of action units
applied to both, so each task's actions may be scaled to its bounds first.

Multi-task (actor-mimic). One student serves tasks whose observations and actions have different
sizes: observations are zero-padded to the largest and a one-hot task id is appended
(`task_input`); actions are zero-padded and a mask (`action_mask`) removes the padded dimensions
from the loss (`masked_gaussian_kl`, or `mask=` of `discrete_distill_loss` for different numbers of
discrete actions), so the student's outputs there are free and never used.

Training (`train_epochs`): whole epochs in one jitted call, `lax.scan` over epochs and, inside,
over minibatches of a shuffled dataset with Optax Adam. The dataset has a fixed capacity (so an
aggregated DAgger dataset that grows does not recompile) and a count of the rows in use; rows past
the count are never drawn. A step whose loss or new parameters are not finite is thrown away and
counted.
"""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from forethought.errors import ForethoughtError
from forethought.faults import keep_finite


def _check_temperature(temperature) -> None:
    """A concrete temperature must be > 0 (a traced one cannot be checked and is trusted)."""
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ForethoughtError(f"temperature must be > 0, got {temperature}")


def soft_targets(logits: jax.Array, temperature: float | jax.Array = 1.0) -> jax.Array:
    """The note's soft targets `softmax(z / T)` over the last axis of `logits [..., A]`.

    `T -> 0` gives the one-hot argmax, `T -> inf` the uniform distribution. Returns `[..., A]`.
    """
    _check_temperature(temperature)
    return jax.nn.softmax(logits / temperature, axis=-1)


def _masked_logits(logits, mask):
    # a large negative logit rather than -inf: exp underflows to 0 and 0 * log-prob stays finite
    return logits if mask is None else jnp.where(mask, logits, -1e9)


def discrete_distill_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                          temperature: float | jax.Array = 1.0, mask: jax.Array | None = None) -> jax.Array:
    """`T^2 * mean_batch[ -sum_a p_a log softmax(s / T)_a ]` with `p = soft_targets(z, T)`.

    Args:
      student_logits: `[..., A]` the student's logits `s`.
      teacher_logits: `[..., A]` the teacher's logits `z` (gradients do not flow into them).
      temperature: `T > 0`, the same for teacher and student.
      mask: optional `[..., A]` booleans: the actions that exist in each row's task (multi-task
        students with different numbers of actions); the others get probability 0 on both sides.

    Returns:
      Scalar: the mean over the leading axes of the `T^2`-scaled cross-entropy (module docstring
      on why `T^2`).
    """
    _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ForethoughtError(f"student_logits {student_logits.shape} and teacher_logits "
                               f"{teacher_logits.shape} must have the same shape")
    p = soft_targets(jax.lax.stop_gradient(_masked_logits(teacher_logits, mask)), temperature)
    log_q = jax.nn.log_softmax(_masked_logits(student_logits, mask) / temperature, axis=-1)
    return temperature ** 2 * jnp.mean(-jnp.sum(p * log_q, axis=-1))


def _kl_terms(mean_p, log_std_p, mean_q, log_std_q):
    """Per-dimension `D_KL(N(mean_p, e^{2 log_std_p}) || N(mean_q, e^{2 log_std_q}))`."""
    var_ratio = jnp.exp(2.0 * (log_std_p - log_std_q))
    return log_std_q - log_std_p + 0.5 * (var_ratio + jnp.square((mean_p - mean_q) * jnp.exp(-log_std_q)) - 1.0)


def gaussian_kl(mean_p: jax.Array, log_std_p: jax.Array, mean_q: jax.Array, log_std_q: jax.Array) -> jax.Array:
    """`D_KL(p || q)` of diagonal Gaussians in closed form, summed over the last axis:

        sum_i log(sigma_q,i / sigma_p,i) + (sigma_p,i^2 + (mu_p,i - mu_q,i)^2) / (2 sigma_q,i^2) - 1/2

    All arguments `[..., m]` (broadcastable); returns `[...]`. Distillation calls it with the
    teacher as `p` and the student as `q` (the actor-mimic cross-entropy up to a constant).
    """
    return jnp.sum(_kl_terms(mean_p, log_std_p, mean_q, log_std_q), axis=-1)


def masked_gaussian_kl(mean_p: jax.Array, log_std_p: jax.Array, mean_q: jax.Array, log_std_q: jax.Array,
                       mask: jax.Array) -> jax.Array:
    """`gaussian_kl` over the action dimensions where `mask [..., m]` is true only: the KL of the
    task's own action marginals when actions are zero-padded to a common size `m`. Whatever the
    padded entries hold (even inf or NaN in the student's unused outputs) does not reach the
    result or its gradient. Returns `[...]`."""
    terms = _kl_terms(jnp.where(mask, mean_p, 0.0), jnp.where(mask, log_std_p, 0.0),
                      jnp.where(mask, mean_q, 0.0), jnp.where(mask, log_std_q, 0.0))
    return jnp.sum(jnp.where(mask, terms, 0.0), axis=-1)


def task_input(features: jax.Array, task: int | jax.Array, tasks: int, width: int) -> jax.Array:
    """The multi-task student's input: `features [..., d]` zero-padded to `width >= d`, then the
    one-hot id of `task` among `tasks`. Returns `[..., width + tasks]`."""
    d = features.shape[-1]
    if d > width:
        raise ForethoughtError(f"task_input: features have {d} entries, more than width={width}")
    padded = jnp.concatenate([features, jnp.zeros(features.shape[:-1] + (width - d,), features.dtype)], -1)
    one_hot = jnp.broadcast_to(jax.nn.one_hot(task, tasks, dtype=features.dtype), features.shape[:-1] + (tasks,))
    return jnp.concatenate([padded, one_hot], -1)


def pad_actions(a: jax.Array, width: int) -> jax.Array:
    """`a [..., m]` zero-padded to `[..., width]`."""
    m = a.shape[-1]
    if m > width:
        raise ForethoughtError(f"pad_actions: actions have {m} entries, more than width={width}")
    return jnp.concatenate([a, jnp.zeros(a.shape[:-1] + (width - m,), a.dtype)], -1)


def action_mask(m: int, width: int) -> jax.Array:
    """`[width]` booleans, true for the task's own `m` action dimensions."""
    return jnp.arange(width) < m


def train_epochs(model: Any, data: Any, count: jax.Array | int, key: jax.Array,
                 loss: Callable[[Any, Any], jax.Array], *, epochs: int, batch_size: int,
                 learning_rate: float) -> tuple[Any, jax.Array, jax.Array]:
    """Minimise the mean of `loss(model, batch) -> [B]` over the first `count` rows of `data`.

    Args:
      model: an Equinox module (its inexact arrays are trained).
      data: a pytree of arrays with a common leading axis `N` (the capacity).
      count: rows in use, `1 <= count <= N` (a traced scalar: changing it does not recompile).
      key: shuffles each epoch.
      loss: `loss(model, batch) -> [B]`, per-row losses of a minibatch (a module-level function,
        so the compiled program is reused).
      epochs: passes over the `count` rows, each in a new random order.
      batch_size: rows per Adam step; an epoch takes `ceil(count / batch_size)` steps, the last one
        over the remaining rows only.
      learning_rate: Adam's step size (a fresh Adam state per call).

    Returns:
      `(model, losses [epochs], skipped)`: the trained model, each epoch's mean minibatch loss, and
      the number of steps thrown away because the loss or the new parameters were not finite.
    """
    if epochs < 1 or batch_size < 1:
        raise ForethoughtError(f"train_epochs: epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if not learning_rate > 0:
        raise ForethoughtError(f"train_epochs: learning_rate must be > 0, got {learning_rate}")
    return _train_epochs(model, data, jnp.asarray(count), key, loss, epochs, batch_size, learning_rate)


@eqx.filter_jit
def _train_epochs(model, data, count, key, loss, epochs: int, batch_size: int, learning_rate: float):
    N = jax.tree_util.tree_leaves(data)[0].shape[0]
    steps = -(-N // batch_size)                           # minibatches of a full dataset
    optimizer = optax.adam(learning_rate)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def batch_loss(p, batch, weights):
        per_row = loss(eqx.combine(p, static), batch)
        return jnp.sum(weights * per_row) / jnp.maximum(jnp.sum(weights), 1.0)

    def epoch(carry, epoch_key):
        # rows in use first, in random order; the rest (never drawn) after them
        score = jax.random.uniform(epoch_key, (N,)) + (jnp.arange(N) >= count)
        order = jnp.argsort(score)
        order = jnp.concatenate([order, jnp.zeros(steps * batch_size - N, order.dtype)])

        def step(carry, j):
            p, opt, skipped = carry
            rows = jax.lax.dynamic_slice_in_dim(order, j * batch_size, batch_size)
            positions = j * batch_size + jnp.arange(batch_size)
            weights = (positions < count).astype(jnp.result_type(float))
            batch = jax.tree.map(lambda a: a[rows], data)
            value, grad = jax.value_and_grad(batch_loss)(p, batch, weights)
            updates, new_opt = optimizer.update(grad, opt, p)
            new_p = optax.apply_updates(p, updates)
            active = j * batch_size < count
            (p, opt), ok = keep_finite((new_p, new_opt), (p, opt), jnp.isfinite(value) & active)
            skipped = skipped + (active & ~ok).astype(jnp.int32)
            return (p, opt, skipped), jnp.where(active, value, 0.0)

        carry, values = jax.lax.scan(step, carry, jnp.arange(steps))
        used = jnp.maximum(jnp.ceil(count / batch_size), 1.0)
        return carry, jnp.sum(values) / used

    init = (params, optimizer.init(params), jnp.int32(0))
    (params, _, skipped), losses = jax.lax.scan(epoch, init, jax.random.split(key, epochs))
    return eqx.combine(params, static), losses, skipped
