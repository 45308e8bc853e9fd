"""Random shooting, CEM and MPPI as open-loop planners (swing-ups as MPC are in test_mpc.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought.control.shooting import (cem, colored_noise, mppi, random_shooting, rollout,
                                          rollout_costs)
from forethought.control.solution import trajax_objective
from forethought.errors import ForethoughtError

# A double integrator with a quadratic cost: the objective is a convex quadratic in U, so its
# minimiser is a least-squares solution (trajax convention: final term cost(x_T, 0, T)).
DT, T, R = 0.1, 10, 0.1
A = np.array([[1.0, DT], [0.0, 1.0]])
B = np.array([[0.0], [DT]])
X0 = np.array([1.0, 0.5])


def dynamics(x, u, t):
    return jnp.asarray(A, x.dtype) @ x + jnp.asarray(B, x.dtype) @ u


def cost(x, u, t):
    return 0.5 * jnp.sum(x * x) + 0.5 * R * jnp.sum(u * u)


@pytest.fixture(scope="module")
def optimum():
    """`(U*, J*)` by least squares over the stacked states `X = Phi x0 + G U`."""
    G = np.zeros((T + 1, 2, T))
    for t in range(T + 1):
        for s in range(t):
            G[t, :, s] = (np.linalg.matrix_power(A, t - 1 - s) @ B)[:, 0]
    free = np.concatenate([np.linalg.matrix_power(A, t) @ X0 for t in range(T + 1)])
    M = np.concatenate([G.reshape(-1, T), np.sqrt(R) * np.eye(T)])
    b = -np.concatenate([free, np.zeros(T)])
    U = np.linalg.lstsq(M, b, rcond=None)[0]
    return U[:, None], 0.5 * np.sum((M @ U - b) ** 2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cem_converges_on_convex_quadratic(optimum, dtype):
    U_star, J_star = optimum
    with jax.enable_x64(dtype == "float64"):
        solution = cem(cost, dynamics, jnp.asarray(X0, dtype), jnp.zeros((T, 1), dtype),
                       jax.random.key(0), lower=-10.0, upper=10.0, population=200,
                       iterations=30, init_std=1.0)
        assert solution.u.dtype == solution.x.dtype == jnp.dtype(dtype)
        # From J(0) ~ 12.5 to within 1e-4 of J*; the plan itself to 1e-2.
        assert float(solution.cost) - J_star < 1e-4
        np.testing.assert_allclose(solution.u, U_star, atol=1e-2)
        assert int(solution.iterations) == 30 and solution.history.shape == (30,)
        if dtype == "float64":
            assert float(solution.cost) - J_star < 1e-8


def test_solution_is_consistent_with_the_objective():
    x0, U0 = jnp.asarray(X0, jnp.float32), jnp.zeros((T, 1))
    solution = cem(cost, dynamics, x0, U0, jax.random.key(1), lower=-10.0, upper=10.0,
                   population=50, iterations=3, init_std=1.0)
    np.testing.assert_allclose(solution.x, rollout(dynamics, x0, solution.u), rtol=1e-6)
    X = rollout(dynamics, x0, U0)
    expected = [trajax_objective(cost, solution.x, solution.u), trajax_objective(cost, X, U0)]
    np.testing.assert_allclose(solution.cost, expected[0], rtol=1e-6)
    np.testing.assert_allclose(rollout_costs(cost, dynamics, x0, jnp.stack([solution.u, U0])),
                               expected, rtol=1e-6)
    # With a terminal cost, it replaces trajax's final stage term.
    terminal = lambda x: 100.0 * jnp.sum(x * x)  # noqa: E731
    np.testing.assert_allclose(rollout_costs(cost, dynamics, x0, U0[None], terminal)[0],
                               trajax_objective(cost, X, U0, terminal), rtol=1e-6)


def test_cem_returns_the_elite_mean_not_the_best_sample():
    # One step, two equally good modes at u = -1 and u = +1: the elites split between them, so
    # their mean sits near 0 (cost ~1) while the best sample costs almost nothing.
    def bimodal(x, u, t):
        return jnp.where(t < 1, jnp.minimum((u[0] - 1) ** 2, (u[0] + 1) ** 2), 0.0)

    solution = cem(bimodal, lambda x, u, t: x, jnp.zeros(1), jnp.zeros((1, 1)), jax.random.key(0),
                   lower=-3.0, upper=3.0, population=400, elite_fraction=0.2, iterations=1,
                   init_std=1.0)
    assert abs(float(solution.u[0, 0])) < 0.4
    assert float(solution.cost) > 0.3
    assert float(solution.history[0]) < 0.05  # the elites themselves were good


def test_cem_respects_binding_bounds(optimum):
    U_star, _ = optimum
    lower, upper = -1.0, 0.5  # the optimum starts at -3.1 and peaks at 0.22
    solution = cem(cost, dynamics, jnp.asarray(X0, jnp.float32), jnp.zeros((T, 1)),
                   jax.random.key(0), lower=lower, upper=upper, population=200, iterations=30,
                   init_std=1.0)
    assert np.all(np.asarray(solution.u) >= lower) and np.all(np.asarray(solution.u) <= upper)
    assert float(solution.u[0, 0]) == pytest.approx(lower, abs=1e-3)


def test_mppi_and_random_shooting_improve_on_the_quadratic(optimum):
    _, J_star = optimum
    x0, U0 = jnp.asarray(X0, jnp.float32), jnp.zeros((T, 1))
    J0 = float(rollout_costs(cost, dynamics, x0, U0[None])[0])
    solution = mppi(cost, dynamics, x0, U0, jax.random.key(0), lower=-10.0, upper=10.0,
                    population=200, iterations=20, lambda_=0.01, noise_std=0.3)
    assert float(solution.cost) - J_star < 1e-2 * (J0 - J_star)
    solution = random_shooting(cost, dynamics, x0, U0, jax.random.key(0), lower=-10.0,
                               upper=10.0, population=500, init_std=1.0)
    assert float(solution.cost) < J0
    assert float(solution.cost) == pytest.approx(float(solution.history[0]), rel=1e-5)


def test_vmap_over_x0_and_compiled_once():
    traces = []

    def counting_cost(x, u, t):
        traces.append(1)
        return cost(x, u, t)

    def plan(x0, key):
        return cem(counting_cost, dynamics, x0, jnp.zeros((T, 1)), key, lower=-10.0, upper=10.0,
                   population=50, iterations=3, init_std=1.0)

    X0s = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]])
    batched = jax.vmap(plan, in_axes=(0, None))(X0s, jax.random.key(3))
    for i in range(3):
        single = plan(X0s[i], jax.random.key(3))
        np.testing.assert_allclose(batched.u[i], single.u, atol=1e-5)
        np.testing.assert_allclose(batched.cost[i], single.cost, rtol=1e-5)
    # The unbatched calls after the first one hit the compiled program: no new trace.
    n = len(traces)
    plan(X0s[0] + 1.0, jax.random.key(4))
    assert len(traces) == n


def test_rollout_costs_passes_keys_to_stochastic_dynamics():
    def noisy(x, u, t, key):
        return x + u + 0.1 * jax.random.normal(key, x.shape)

    U = jnp.zeros((4, 5, 1))
    keys = jax.random.split(jax.random.key(0), (4, 5))
    costs = rollout_costs(cost, noisy, jnp.zeros(1), U, keys=keys)
    assert costs.shape == (4,) and len(set(np.asarray(costs).tolist())) == 4
    X = rollout(noisy, jnp.zeros(1), U[0], keys=keys[0])
    assert X.shape == (6, 1)


@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_colored_noise_has_unit_variance(beta):
    noise = np.asarray(colored_noise(jax.random.key(0), (4000, 16, 2), beta))
    np.testing.assert_allclose(noise.std(axis=0), 1.0, atol=0.06)
    lag1 = np.corrcoef(noise[:, 0, 0], noise[:, 1, 0])[0, 1]
    assert (lag1 > 0.7) if beta == 2.0 else (abs(lag1) < 0.06)


@pytest.mark.parametrize("planner", [cem, mppi, random_shooting])
def test_bad_bounds_name_the_argument(planner):
    x0, U0, key = jnp.zeros(2), jnp.zeros((T, 1)), jax.random.key(0)
    with pytest.raises(ForethoughtError, match="lower must be <= upper"):
        planner(cost, dynamics, x0, U0, key, lower=1.0, upper=-1.0)
    with pytest.raises(ForethoughtError, match=r"lower must be a scalar or have shape \(1,\)"):
        planner(cost, dynamics, x0, U0, key, lower=jnp.zeros(2), upper=1.0)
    with pytest.raises(ForethoughtError, match="upper must be a scalar"):
        planner(cost, dynamics, x0, U0, key, lower=-1.0, upper=jnp.ones((T, 1)))
    with pytest.raises(ForethoughtError, match="finite"):
        planner(cost, dynamics, x0, U0, key, lower=-jnp.inf, upper=1.0)
    with pytest.raises(ForethoughtError, match="U0 must have shape"):
        planner(cost, dynamics, x0, jnp.zeros(T), key, lower=-1.0, upper=1.0)


def test_rollout_costs_stop_at_a_terminal_state():
    from forethought.control.shooting import rollout_costs

    # x counts up by u; the episode ends once x >= 2; each step costs 1 (like -reward of 1)
    dynamics = lambda x, u, t: x + u  # noqa: E731
    cost = lambda x, u, t: jnp.sum(x * 0 + 1.0)  # noqa: E731
    is_terminal = lambda x: x[0] >= 2.0  # noqa: E731
    U = jnp.ones((2, 5, 1)).at[1].set(0.0)
    costs = rollout_costs(cost, dynamics, jnp.zeros(1), U, is_terminal=is_terminal)
    # plan 0 reaches 2 after its second step: two stage costs, no final term; plan 1 never ends
    np.testing.assert_allclose(costs, [2.0, 6.0])
    # per-particle costs and terminations are averaged over the particles
    Xp = jnp.array([[0.0], [1.0]])
    per_particle = rollout_costs(lambda X, u, t: jnp.ones(2), lambda X, u, t: X + u, Xp,
                                 jnp.ones((1, 5, 1)), is_terminal=lambda X: X[:, 0] >= 2.0)
    np.testing.assert_allclose(per_particle, [(2.0 + 1.0) / 2])


def test_rollout_costs_under_an_end_probability_are_the_expected_accrued_cost():
    from forethought.control.shooting import rollout_costs

    dynamics = lambda x, u, t: x + u  # noqa: E731
    cost = lambda x, u, t: jnp.sum(x * 0 + 1.0)  # noqa: E731
    U = jnp.ones((2, 5, 1)).at[1].set(0.0)
    # a 0/1 probability is the hard end test
    hard = rollout_costs(cost, dynamics, jnp.zeros(1), U, is_terminal=lambda x: x[0] >= 2.0)
    soft = rollout_costs(cost, dynamics, jnp.zeros(1), U,
                         end_probability=lambda x: jnp.where(x[0] >= 2.0, 1.0, 0.0))
    np.testing.assert_allclose(soft, hard)
    # a constant probability p of ending at each new state: the stage cost at step t (and the final
    # term at T) is paid with probability (1 - p)^t
    p, T = 0.3, 5
    soft = rollout_costs(cost, dynamics, jnp.zeros(1), U, end_probability=lambda x: jnp.float32(p))
    np.testing.assert_allclose(soft, [sum((1 - p) ** t for t in range(T + 1))] * 2, rtol=1e-6)
    # against Monte Carlo over sampled ends, with a state-dependent probability
    p_of = lambda x: jax.nn.sigmoid(x[0] - 2.0)  # noqa: E731
    exact = rollout_costs(cost, dynamics, jnp.zeros(1), U[:1], end_probability=p_of)[0]
    ends = jax.random.uniform(jax.random.key(0), (200_000, T))
    probs = jnp.array([p_of(jnp.array([t + 1.0])) for t in range(T)])
    alive = jnp.cumprod(ends >= probs, axis=1)  # alive after each step
    samples = 1.0 + alive.sum(1)  # the first stage cost is always paid
    se = float(jnp.std(samples)) / np.sqrt(samples.size)
    assert abs(float(jnp.mean(samples)) - float(exact)) < 5 * se
    with pytest.raises(ForethoughtError, match="not both"):
        rollout_costs(cost, dynamics, jnp.zeros(1), U, is_terminal=lambda x: x[0] > 0,
                      end_probability=lambda x: 0.0)
