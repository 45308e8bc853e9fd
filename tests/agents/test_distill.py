"""Distillation: the soft targets and losses against hand computations and Monte Carlo, the
multi-task mask, a student that recovers a linear teacher's gain under DAgger, a multi-task agent
run that resumes bit for bit, and bad settings refused by name."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought.agents import distill
from forethought.agents.base import MemoryRun
from forethought.errors import ForethoughtError
from forethought.rl.distill import (action_mask, discrete_distill_loss, gaussian_kl, masked_gaussian_kl,
                                    pad_actions, soft_targets, task_input, train_epochs)
from forethought.systems import make_env
from tests.agents.resume import Cut, without_timing


def test_soft_targets_by_hand_and_in_the_limits():
    z = jnp.array([1.0, 2.0, 4.0])
    e = np.exp(np.array([1.0, 2.0, 4.0]) / 2.0)
    np.testing.assert_allclose(soft_targets(z, 2.0), e / e.sum(), rtol=1e-6)
    np.testing.assert_allclose(soft_targets(z, 1e4), np.full(3, 1 / 3), atol=1e-4)  # T -> inf: uniform
    np.testing.assert_allclose(soft_targets(z, 1e-3), [0.0, 0.0, 1.0], atol=1e-6)  # T -> 0: argmax
    batch = soft_targets(jnp.array([[0.0, 3.0], [5.0, 1.0]]), 0.01)
    np.testing.assert_allclose(batch, [[0.0, 1.0], [1.0, 0.0]], atol=1e-6)


def test_discrete_loss_is_the_scaled_cross_entropy_and_masks_missing_actions():
    s, z, T = jnp.array([[0.3, -1.0, 2.0]]), jnp.array([[1.0, 0.0, -0.5]]), 3.0
    p = np.exp(np.array([1.0, 0.0, -0.5]) / T)
    p /= p.sum()
    log_q = np.array([0.3, -1.0, 2.0]) / T
    log_q -= np.log(np.exp(log_q).sum())
    np.testing.assert_allclose(discrete_distill_loss(s, z, T), T ** 2 * -(p * log_q).sum(), rtol=1e-6)
    # the student's best logits are the teacher's (up to a constant): zero gradient there
    grad = jax.grad(lambda a: discrete_distill_loss(a, z, T))(z + 7.0)
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)
    # Hinton et al.'s large-T limit: the gradient is (s - z) / N for zero-mean logits
    s0, z0 = jnp.array([[0.4, -0.1, -0.3]]), jnp.array([[-0.2, 0.5, -0.3]])
    np.testing.assert_allclose(jax.grad(lambda a: discrete_distill_loss(a, z0, 1e3))(s0), (s0 - z0) / 3, atol=1e-3)
    # a task with two actions inside a three-action student: the third is ignored on both sides
    mask = jnp.array([[True, True, False]])
    big = jnp.array([[0.3, -1.0, 50.0]])
    np.testing.assert_allclose(discrete_distill_loss(big, z.at[0, 2].set(-80.0), T, mask),
                               discrete_distill_loss(s[:, :2], z[:, :2], T), rtol=1e-6)


def test_gaussian_kl_against_monte_carlo_and_zero_for_the_same_policy():
    mp, lp = jnp.array([0.5, -1.0]), jnp.log(jnp.array([0.7, 1.3]))
    mq, lq = jnp.array([0.0, 0.2]), jnp.log(jnp.array([1.1, 0.6]))
    x = mp + jnp.exp(lp) * jax.random.normal(jax.random.key(0), (200_000, 2))

    def log_density(x, m, ls):
        return jnp.sum(-0.5 * ((x - m) / jnp.exp(ls)) ** 2 - ls - 0.5 * jnp.log(2 * jnp.pi), -1)

    samples = np.asarray(log_density(x, mp, lp) - log_density(x, mq, lq), np.float64)
    error = samples.std() / np.sqrt(len(samples))
    assert abs(float(gaussian_kl(mp, lp, mq, lq)) - samples.mean()) < 5 * error
    assert float(gaussian_kl(mp, lp, mq, lq)) > 0.1
    np.testing.assert_allclose(gaussian_kl(mp, lp, mp, lp), 0.0, atol=1e-7)


def test_masked_kl_ignores_the_padded_dimensions():
    mp, lp = jnp.array([0.5, 0.0, 0.0]), jnp.array([-1.0, 0.0, 0.0])
    mq, lq = jnp.array([0.1, jnp.nan, 30.0]), jnp.array([-0.5, jnp.inf, -40.0])
    mask = action_mask(1, 3)
    np.testing.assert_array_equal(mask, [True, False, False])
    value = masked_gaussian_kl(mp, lp, mq, lq, mask)
    np.testing.assert_allclose(value, gaussian_kl(mp[:1], lp[:1], mq[:1], lq[:1]), rtol=1e-6)
    grad = jax.grad(lambda m: masked_gaussian_kl(mp, lp, m, lq, mask))(mq)
    assert np.isfinite(grad[0]) and grad[0] != 0 and np.all(np.asarray(grad[1:]) == 0)
    # the multi-task layout: padded features, then the one-hot task id
    np.testing.assert_array_equal(task_input(jnp.array([1.0, 2.0]), 1, 3, 4), [1, 2, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(pad_actions(jnp.array([[3.0]]), 2), [[3.0, 0.0]])


class LinearStudent(eqx.Module):
    W: jax.Array
    log_std: jax.Array

    def __call__(self, x):
        return self.W @ x, self.log_std


def _kl(student, batch):
    mean, log_std = jax.vmap(student)(batch["x"])
    return gaussian_kl(batch["mean"], jnp.full_like(batch["mean"], jnp.log(0.2)), mean,
                       jnp.broadcast_to(log_std, mean.shape))


def test_dagger_student_recovers_a_linear_teachers_gain():
    A = jnp.array([[1.0, 0.1], [0.0, 1.0]])
    B = jnp.array([[0.0], [0.1]])
    K = jnp.array([[-3.0, -2.5]])                    # the teacher: N(K x, 0.2^2), stable in closed loop
    T, R, iterations = 30, 4, 4
    capacity = iterations * R * T
    data = {"x": jnp.zeros((capacity, 2)), "mean": jnp.zeros((capacity, 1))}
    student = LinearStudent(jnp.zeros((1, 2)), jnp.zeros(1))
    count = 0
    for i in range(iterations):
        key = jax.random.key(i)
        x = jax.random.normal(key, (R, 2))
        states = []
        for t in range(T):                         # DAgger: the student acts, the teacher labels
            states.append(x)
            mean, log_std = jax.vmap(student)(x)
            u = mean + jnp.exp(log_std) * jax.random.normal(jax.random.fold_in(key, t + 1), mean.shape)
            x = x @ A.T + u @ B.T
        X = jnp.concatenate(states)
        data = {"x": data["x"].at[count:count + len(X)].set(X),
                "mean": data["mean"].at[count:count + len(X)].set(X @ K.T)}
        count += len(X)
        student, losses, skipped = train_epochs(student, data, count, jax.random.key(100 + i), _kl,
                                                epochs=60, batch_size=64, learning_rate=0.05)
        assert int(skipped) == 0 and np.all(np.isfinite(losses))
    np.testing.assert_allclose(student.W, K, atol=0.05)
    np.testing.assert_allclose(student.log_std, [np.log(0.2)], atol=0.05)
    assert float(losses[-1]) < 1e-2


def test_one_student_comes_within_ten_percent_of_two_teachers():
    config = distill.Config(tasks=("pendulum", "double-integrator"), episodes=5, rollouts=8, epochs=40, hidden=64,
                            eval_starts=4)
    run = MemoryRun()
    result = distill.train(config, make_env("pendulum"), jax.random.key(0), run)
    assert all(ratio < 1.1 for ratio in result.ratios.values()), result.ratios
    # the pendulum's swing-up is not learnt from the first iteration's teacher rollouts alone
    assert run.rows[0]["ratio_pendulum"] > 1.3
    assert result.ratios["pendulum"] == run.rows[-1]["ratio_pendulum"]


class LogitStudent(eqx.Module):
    W: jax.Array

    def __call__(self, x):
        return self.W @ x


def _soft_cross_entropy(student, batch):
    logits = jax.vmap(student)(batch["x"])
    return jax.vmap(lambda s, z: discrete_distill_loss(s, z, 2.0))(logits, batch["z"])


def test_a_discrete_student_recovers_the_teachers_logits_at_temperature():
    Z = jax.random.normal(jax.random.key(0), (4, 3))
    Z = Z - Z.mean(0)
    x = jax.random.normal(jax.random.key(1), (256, 3))
    student, losses, _ = train_epochs(LogitStudent(jnp.zeros((4, 3))), {"x": x, "z": x @ Z.T}, 256,
                                      jax.random.key(2), _soft_cross_entropy, epochs=150, batch_size=64,
                                      learning_rate=0.05)
    # softmax(s / T) = softmax(z / T) fixes the logits up to a constant per state (Adam's
    # per-coordinate steps do move that constant), so compare the centred gains
    np.testing.assert_allclose(student.W - student.W.mean(0), Z, atol=0.02)
    assert losses[-1] < losses[0]


TINY = dict(episodes=3, tasks=("pendulum", "double-integrator"), rollouts=2, eval_starts=2, epochs=2,
            batch_size=64, hidden=8)


def test_resume_repeats_the_uninterrupted_run():
    config = distill.Config(**TINY)
    whole = MemoryRun()
    result = distill.train(config, make_env("pendulum"), jax.random.key(3), whole)
    assert [row["episode"] for row in whole.rows] == [0, 1, 2]
    for column in ("return_pendulum", "teacher_return_double_integrator", "ratio_pendulum", "kl"):
        assert all(np.isfinite(row[column]) for row in whole.rows)
    assert whole.rows[-1]["dataset"] == 3 * 2 * (100 + make_env("double-integrator").unwrapped.system.horizon)
    assert set(result.ratios) == {"pendulum", "double-integrator"}
    action = result.policy(np.zeros(2, np.float32), 0)
    assert action.shape == (1,) and abs(float(action[0])) <= 4.0
    cut = Cut(stop=1)
    with pytest.raises(KeyboardInterrupt):
        distill.train(config, make_env("pendulum"), jax.random.key(3), cut)
    resumed = Cut(saved=cut.saved)
    distill.train(config, make_env("pendulum"), jax.random.key(3), resumed)
    assert without_timing(cut.rows + resumed.rows) == without_timing(whole.rows)


def test_bad_settings_are_refused_by_name():
    for bad, name in ((dict(temperature=0.0), "temperature"), (dict(tasks=()), "tasks"),
                      (dict(tasks=("pendulum", "nope")), "tasks"), (dict(tasks=("pendulum", "pendulum")), "tasks"),
                      (dict(teacher_std=-1.0), "teacher_std"), (dict(rollouts=0), "rollouts")):
        with pytest.raises(ForethoughtError, match=name):
            distill.Config(**bad)
    with pytest.raises(ForethoughtError, match="temperature"):
        soft_targets(jnp.zeros(3), -1.0)
    with pytest.raises(ForethoughtError, match="env"):
        distill.train(distill.Config(tasks=("pendulum",)), make_env("cartpole"), jax.random.key(0))
    with pytest.raises(ForethoughtError, match="continuous system"):
        distill.train(distill.Config(tasks=("dyna-maze", "pendulum")), make_env("pendulum"), jax.random.key(0))
