"""Property-based tests (hypothesis): invariants of the planners and the buffer, and the input
validation of planners, buffers and models, over many generated cases.

Shapes are drawn from small fixed sets so JAX compiles each function a few times, not once per
example."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forethought.control.lqr import lqr
from forethought.control.shooting import cem, mppi, random_shooting, rollout_costs
from forethought.errors import ForethoughtError
from forethought.models.ensemble import Ensemble, EnsembleSpec
from forethought.models.gp import GP
from forethought.models.train import TrainConfig, fit
from forethought.rl.buffer import ReplayBuffer

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
floats = st.floats(-3.0, 3.0, allow_nan=False, width=32)


# ----- LQR: a better controller never costs more ----------------------------------------------
N, M, T = 2, 1, 8


@st.composite
def lq_problems(draw):
    """A random time-invariant linear system with PSD state cost and PD action cost."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    A = np.eye(N) + 0.3 * rng.normal(size=(N, N))
    B = rng.normal(size=(N, M))
    L = rng.normal(size=(N, N))
    Q = L @ L.T * draw(st.floats(0.0, 2.0)) + 1e-3 * np.eye(N)
    R = np.eye(M) * draw(st.floats(0.05, 2.0))
    C = np.zeros((T, N + M, N + M))
    C[:, :N, :N], C[:, N:, N:] = Q, R
    F = np.broadcast_to(np.concatenate([A, B], 1), (T, N, N + M))
    x0 = rng.normal(size=N)
    return (jnp.asarray(F, jnp.float32), jnp.zeros((T, N), jnp.float32), jnp.asarray(C, jnp.float32),
            jnp.zeros((T, N + M), jnp.float32), jnp.asarray(x0, jnp.float32), rng)


def _cost_of(F, C, c, x0, U):
    """The objective of plan `U` from `x0`, rolled out and summed in float64 NumPy."""
    F, C, U = np.asarray(F, np.float64), np.asarray(C, np.float64), np.asarray(U, np.float64)
    x, total = np.asarray(x0, np.float64), 0.0
    for t in range(T):
        z = np.concatenate([x, U[t]])
        total += 0.5 * z @ C[t] @ z
        x = F[t] @ z
    return total  # no terminal cost (C_T None)


@SETTINGS
@given(lq_problems(), st.floats(0.01, 1.0))
def test_lqr_is_never_beaten_and_moving_towards_it_never_costs_more(problem, scale):
    F, f, C, c, x0, rng = problem
    solution = lqr(F, f, C, c, x0)
    best = _cost_of(F, C, c, x0, solution.u)
    assert best == pytest.approx(float(solution.cost), rel=1e-3, abs=1e-3)
    other = solution.u + scale * jnp.asarray(rng.normal(size=(T, M)), jnp.float32)
    worse = _cost_of(F, C, c, x0, other)
    assert best <= worse + 1e-3 * (1 + abs(worse))
    # the cost is convex in U: halfway to the optimum costs at most the average of the two ends
    halfway = _cost_of(F, C, c, x0, (other + solution.u) / 2)
    assert halfway <= worse + 1e-3 * (1 + abs(worse))


# ----- sampling planners stay in their bounds ---------------------------------------------------
def _dynamics(x, u, t):
    return x + 0.1 * jnp.concatenate([x[1:], u])


def _cost(x, u, t):
    return jnp.sum(x**2) + 0.1 * jnp.sum(u**2)


@st.composite
def bounds(draw):
    lo = draw(floats)
    width = draw(st.floats(0.125, 4.0, width=32))
    return np.float32(lo), np.float32(lo + width)


PLANNERS = {
    "random": lambda x0, U0, key, lo, hi: random_shooting(_cost, _dynamics, x0, U0, key, lower=lo, upper=hi,
                                                          population=16),
    "cem": lambda x0, U0, key, lo, hi: cem(_cost, _dynamics, x0, U0, key, lower=lo, upper=hi, population=16,
                                           iterations=2),
    "mppi": lambda x0, U0, key, lo, hi: mppi(_cost, _dynamics, x0, U0, key, lower=lo, upper=hi, population=16,
                                             iterations=2),
}


@SETTINGS
@given(st.sampled_from(sorted(PLANNERS)), bounds(), st.lists(floats, min_size=2, max_size=2),
       st.integers(0, 1000), st.floats(-10.0, 10.0, width=32))
def test_sampling_planners_stay_in_bounds_and_report_the_cost_of_their_plan(name, box, x0, seed, start):
    lo, hi = box
    U0 = jnp.full((6, 1), start, jnp.float32)  # a warm start that may lie outside the bounds
    solution = PLANNERS[name](jnp.asarray(x0, jnp.float32), U0, jax.random.key(seed), lo, hi)
    u = np.asarray(solution.u)
    assert np.all(u >= lo) and np.all(u <= hi)
    again = float(rollout_costs(_cost, _dynamics, jnp.asarray(x0, jnp.float32), solution.u[None])[0])
    assert float(solution.cost) == pytest.approx(again, rel=1e-4, abs=1e-4)


# ----- the buffer keeps every transition once -----------------------------------------------------
@SETTINGS
@given(st.lists(st.integers(1, 40), min_size=1, max_size=12), st.one_of(st.none(), st.integers(1, 150)),
       st.lists(st.booleans(), min_size=12, max_size=12))
def test_the_buffer_keeps_every_transition_once_in_order_until_evicted(lengths, capacity, ends):
    buffer = ReplayBuffer(1, 1, capacity=capacity)
    added = []
    counter = 0
    for length, terminated in zip(lengths, ends):
        obs = np.arange(counter, counter + length + 1, dtype=np.float32)[:, None]  # ids in the obs
        buffer.add_episode(obs, np.zeros((length, 1)), np.arange(counter, counter + length), terminated)
        added.extend(range(counter, counter + length))
        counter += length + 1
    kept = added if capacity is None else added[-capacity:]
    data = buffer.all()
    assert data.reward.tolist() == kept  # each once, oldest first, FIFO eviction
    assert data.obs[:, 0].tolist() == kept and (data.next_obs[:, 0] == data.obs[:, 0] + 1).all()
    assert sum(len(e) for e in buffer.episodes()) == len(kept)
    sample = buffer.sample(np.random.default_rng(0), 64)
    assert set(sample.reward.tolist()) <= set(kept)


@SETTINGS
@given(st.lists(st.integers(1, 20), min_size=1, max_size=6))
def test_the_buffer_round_trips_through_its_file_exactly(tmp_path_factory, lengths):
    path = tmp_path_factory.mktemp("buffer") / "b.npz"
    buffer = ReplayBuffer(2, 1, capacity=50)
    rng = np.random.default_rng(len(lengths))
    for length in lengths:
        buffer.add_episode(rng.normal(size=(length + 1, 2)), rng.normal(size=(length, 1)), rng.normal(size=length),
                           bool(length % 2))
    buffer.save(path)
    loaded = ReplayBuffer.load(path)
    for name in ("obs", "action", "reward", "next_obs", "terminated"):
        np.testing.assert_array_equal(getattr(loaded.all(), name), getattr(buffer.all(), name))
    assert loaded.episode_starts == buffer.episode_starts


# ----- input validation: one clear message naming the argument, expected and given ---------------
def _message(call) -> str:
    with pytest.raises(ForethoughtError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    return message


@SETTINGS
@given(st.sampled_from(sorted(PLANNERS)), st.sampled_from([(), (3,), (2, 2), (6, 3), (1, 6, 1)]))
def test_planners_name_a_badly_shaped_plan(name, shape):
    U0 = jnp.zeros(shape, jnp.float32)
    message = _message(lambda: PLANNERS[name](jnp.zeros(2), U0, jax.random.key(0), -1.0, 1.0))
    if len(shape) != 2:
        assert "U0 must have shape (T, m)" in message and str(shape) in message
    else:  # an action size the dynamics does not take
        assert "must accept x0 of shape (2,) and a row of U0 of shape" in message and str(shape[1:]) in message


@SETTINGS
@given(st.sampled_from(sorted(PLANNERS)), st.sampled_from([(), (2, 2), (1, 2)]))
def test_planners_name_a_start_state_the_dynamics_do_not_take(name, shape):
    message = _message(lambda: PLANNERS[name](jnp.zeros(shape), jnp.zeros((6, 1)), jax.random.key(0), -1.0, 1.0))
    assert ("x0 must have shape (n,)" in message or "must accept x0 of shape" in message
            or "next state with x0's shape" in message), message


@SETTINGS
@given(st.sampled_from(sorted(PLANNERS)), bounds())
def test_planners_refuse_reversed_or_nan_bounds(name, box):
    lo, hi = box
    message = _message(lambda: PLANNERS[name](jnp.zeros(2), jnp.zeros((6, 1)), jax.random.key(0), hi + 1, lo))
    assert "lower must be <= upper" in message and re.search(r"lower=\[.*\], upper=\[.*\]", message)
    message = _message(lambda: PLANNERS[name](jnp.zeros(2), jnp.zeros((6, 1)), jax.random.key(0), np.nan, hi))
    assert "must not be NaN" in message


@SETTINGS
@given(st.sampled_from(sorted(PLANNERS)), st.sampled_from([np.int32, np.int64, bool]))
def test_planners_refuse_an_integer_plan(name, dtype):
    message = _message(lambda: PLANNERS[name](jnp.zeros(2), np.zeros((6, 1), dtype), jax.random.key(0), -1.0, 1.0))
    assert "U0 must be a floating-point array" in message and "dtype" in message


def test_an_empty_buffer_cannot_be_sampled():
    assert "empty replay buffer" in _message(lambda: ReplayBuffer(2, 1).sample(np.random.default_rng(0), 4))


@SETTINGS
@given(st.sampled_from([(0, 1), (0, 3), (1, 2), (2, 1), (-1, 2)]))
def test_the_buffer_names_mismatched_episode_shapes(wrong):
    extra, obs_dim = wrong  # obs [T+1+extra, obs_dim] for a buffer of obs_dim 2 and T = 4
    buffer = ReplayBuffer(2, 1)
    message = _message(lambda: buffer.add_episode(np.zeros((5 + extra, obs_dim)), np.zeros((4, 1)), np.zeros(4)))
    assert "expected obs [T+1, 2]" in message and f"got obs ({5 + extra}, {obs_dim})" in message


@SETTINGS
@given(st.sampled_from(["obs", "actions", "rewards"]), st.sampled_from([np.nan, np.inf, -np.inf]))
def test_the_buffer_refuses_non_finite_data_naming_the_array(which, bad):
    arrays = {"obs": np.zeros((5, 2)), "actions": np.zeros((4, 1)), "rewards": np.zeros(4)}
    arrays[which] = arrays[which].copy()
    arrays[which].flat[1] = bad
    message = _message(lambda: ReplayBuffer(2, 1).add_episode(arrays["obs"], arrays["actions"], arrays["rewards"]))
    assert f"{which} must be finite" in message and "the first at index" in message


MODEL = Ensemble.create(EnsembleSpec(2, 1, members=2, hidden=8, layers=1), jax.random.key(0))


@SETTINGS
@given(st.sampled_from(["obs", "action", "next_obs"]), st.sampled_from([(10, 3), (10,), (9, 2), (10, 2, 1)]))
def test_model_fits_name_wrong_shapes(which, shape):
    data = {"obs": np.zeros((10, 2)), "action": np.zeros((10, 1)), "next_obs": np.zeros((10, 2))}
    data[which] = np.zeros(shape)
    if which == "action" and shape == (10,):
        return  # a 1-D action array is the m = 1 shorthand
    message = _message(lambda: fit(MODEL, data["obs"], data["action"], data["next_obs"], jax.random.key(0),
                                   TrainConfig(max_epochs=1)))
    assert "expected obs/next_obs [N, 2] and action [N, 1]" in message and str(shape) in message


@SETTINGS
@given(st.sampled_from(["obs", "action", "next_obs"]), st.sampled_from([np.nan, np.inf]))
def test_model_fits_refuse_non_finite_data(which, bad):
    data = {"obs": np.zeros((10, 2)), "action": np.zeros((10, 1)), "next_obs": np.zeros((10, 2))}
    data[which] = data[which].copy()
    data[which][3, 0] = bad
    message = _message(lambda: fit(MODEL, data["obs"], data["action"], data["next_obs"], jax.random.key(0)))
    assert f"{which} must be finite" in message and "(3, 0)" in message


@SETTINGS
@given(st.sampled_from([(5, 2, 1), (5,)]), st.sampled_from([np.nan, None]))
def test_gp_fits_name_wrong_shapes_and_non_finite_data(shape, bad):
    X, Y = np.zeros((5, 2)), np.zeros((5, 1))
    if bad is None:
        message = _message(lambda: GP.fit(np.zeros(shape), Y, jax.random.key(0)))
        assert "GP.fit" in message and str(shape) in message
    else:
        X = X.copy()
        X[1, 1] = bad
        message = _message(lambda: GP.fit(X, Y, jax.random.key(0)))
        assert "GP.fit" in message and "finite" in message
