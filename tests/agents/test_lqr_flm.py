"""The LQR-FLM agent: on a linear system (exact linear dynamics, quadratic cost) it reaches the LQR
optimum; every update respects its KL bound; a cut-off run resumes to the same numbers; what it
cannot handle is refused clearly."""

import jax
import numpy as np
import pytest

from forethought import systems
from forethought.agents import lqr_flm
from forethought.agents.base import MemoryRun
from forethought.errors import ForethoughtError
from forethought.systems.gym import SystemEnv
from tests.agents.resume import Cut, without_timing

# a wide force bound, so the optimal controller never meets it and the problem is exactly LQR
SYSTEM = systems.make("double-integrator", start_position=1.0, max_action=100.0, horizon=30)
LINEAR = dict(rollouts=5, squash=False, init_std=0.01)


def test_exact_linear_dynamics_reach_the_lqr_optimum_and_stay():
    # the reference is iLQR on the true model, which on a linear-quadratic problem is LQR
    result = lqr_flm.train(lqr_flm.Config(episodes=6, kl_step=2.0, **LINEAR), SystemEnv(SYSTEM),
                           jax.random.key(0))
    assert result.costs[0] == pytest.approx(result.reference_cost, rel=1e-4), result.costs
    # a convex problem has one optimum: iLQR from random controls finds the same one
    assert result.best_reference_cost == pytest.approx(result.reference_cost, rel=1e-6)
    # and stays: measured drift up to 8e-4 by iteration 6. With the prior on the data's own spread
    # (`local_prior`), the fit's absolute ridge (1e-6) shrinks the slopes once the controller's
    # noise variance has fallen toward it; GPS's wide prior hid that
    for cost in result.costs:
        assert cost == pytest.approx(result.reference_cost, rel=2e-3), result.costs
    # plain linear regression on the first five noisy rollouts identifies the system exactly too
    # (later ones, from a controller whose noise has all but vanished, no longer span [x, u]:
    # that is what the prior is for)
    plain = lqr_flm.train(lqr_flm.Config(episodes=1, kl_step=2.0, prior="none", **LINEAR),
                          SystemEnv(SYSTEM), jax.random.key(0))
    assert plain.costs[0] == pytest.approx(plain.reference_cost, rel=1e-3)


def test_every_update_keeps_within_its_kl_bound():
    run = MemoryRun()
    lqr_flm.train(lqr_flm.Config(episodes=4, kl_step=0.05, prior="none", **LINEAR), SystemEnv(SYSTEM),
                  jax.random.key(1), run)
    for row in run.rows:
        assert row["kl"] <= row["epsilon"] * (1 + 1e-6), row
    # a small bound binds: each step goes as far as it may
    assert any(row["kl"] == pytest.approx(row["epsilon"], rel=1e-3) for row in run.rows)


def test_resume_repeats_the_uninterrupted_run():
    config = lqr_flm.Config(episodes=4, rollouts=3, prior_rollouts=6, reference=False)
    env = lambda: SystemEnv(systems.make("pendulum", horizon=30))  # noqa: E731
    whole = MemoryRun()
    lqr_flm.train(config, env(), jax.random.key(2), whole)
    cut = Cut(stop=2)
    with pytest.raises(KeyboardInterrupt):
        lqr_flm.train(config, env(), jax.random.key(2), cut)
    resumed = Cut(saved=cut.saved)
    lqr_flm.train(config, env(), jax.random.key(2), resumed)
    # the iLQR costs are NaN without the reference, and NaN != NaN
    nan = ["ilqr_cost", "ilqr_best_cost"]
    assert without_timing(cut.rows + resumed.rows, also=nan) == without_timing(whole.rows, also=nan)


def test_unsupported_envs_and_configs_are_refused():
    import gymnasium

    with pytest.raises(ForethoughtError, match="built-in continuous system"):
        lqr_flm.train(lqr_flm.Config(episodes=1), gymnasium.make("MountainCarContinuous-v0"), jax.random.key(0))
    with pytest.raises(ForethoughtError, match="kl_step must be > 0"):
        lqr_flm.Config(kl_step=0.0)
    with pytest.raises(ForethoughtError, match="rollouts >= 2"):
        lqr_flm.Config(prior="none", rollouts=1)


# ----- the fit LQR-FLM uses: rollout weights and the local prior (models/linear_gaussian.py) -----

def _narrow_rollouts(A, B, c, N, scale, seed, noise=1e-3):
    """`N` rollouts of `x' = A_t x + B_t u + c_t + w` whose starts and actions have standard
    deviation `scale` about fixed means: a converged controller's few, close rollouts."""
    rng = np.random.default_rng(seed)
    horizon, n, m = B.shape
    X = np.zeros((N, horizon + 1, n))
    U = 0.5 + scale * rng.normal(size=(N, horizon, m))
    X[:, 0] = 1.0 + scale * rng.normal(size=(N, n))
    for t in range(horizon):
        X[:, t + 1] = X[:, t] @ A[t].T + U[:, t] @ B[t].T + c[t] + noise * rng.normal(size=(N, n))
    return X, U


def _wide_prior(F, horizon, n, spread=10.0, noise=0.01):
    """An `NIWPrior` (strength 1) whose joint Gaussian has slope `F [n, n+m]`, z-covariance
    `spread I` about zero and noise `noise I`: a GMM cluster's secant over a wide region."""
    from forethought.models.linear_gaussian import NIWPrior

    k = F.shape[1]
    S_zz = spread * np.eye(k)
    Sigma = np.block([[S_zz, S_zz @ F.T], [F @ S_zz, F @ S_zz @ F.T + noise * np.eye(n)]])
    d = k + n
    return NIWPrior(mu0=np.zeros((horizon, d)), Phi=np.tile(Sigma, (horizon, 1, 1)),
                    kappa=np.ones(horizon), n0=np.ones(horizon))


def test_weights_count_as_repeated_rollouts():
    from forethought.models.linear_gaussian import fit_linear_gaussian
    from tests.models.test_linear_gaussian import rollouts, time_varying_system

    A, B, c = time_varying_system(3, 2, 8, seed=1)
    X, U = (np.float64(a) for a in rollouts(A, B, c, 6, seed=2))
    repeat = np.array([1, 2, 1, 3, 1, 1])
    X_rep, U_rep = np.repeat(X, repeat, axis=0), np.repeat(U, repeat, axis=0)
    prior = _wide_prior(np.concatenate([A[0], B[0]], axis=1) + 0.2, 8, 3)
    with jax.enable_x64(True):
        for p in (None, prior):
            weighted = fit_linear_gaussian(X, U, prior=p, weights=repeat.astype(float))
            repeated = fit_linear_gaussian(X_rep, U_rep, prior=p)
            for name in ("A", "B", "c", "N"):
                np.testing.assert_allclose(getattr(weighted, name), getattr(repeated, name), rtol=1e-6,
                                           atol=1e-9)
    with pytest.raises(ForethoughtError, match="weights must have shape"):
        fit_linear_gaussian(X, U, weights=np.ones(5))
    with pytest.raises(ForethoughtError, match="weights must be finite and > 0"):
        fit_linear_gaussian(X, U, weights=np.array([1.0, 0, 1, 1, 1, 1]))


def test_local_prior_keeps_a_wide_prior_from_outweighing_close_rollouts():
    """The cause of LQR-FLM's cart-pole stalls, on a linear system: 20 close rollouts and a
    strength-1 prior whose slope is wrong. The prior's covariance as it is, a wide region's,
    outweighs the data; on the data's own spread it counts as the one rollout it claims to be.
    Its conditional is kept: with a strength far above the data it is what the fit returns."""
    from forethought.models.linear_gaussian import fit_linear_gaussian, local_prior
    from tests.models.test_linear_gaussian import parameter_error, time_varying_system

    horizon, n, m = 8, 3, 2
    A, B, c = time_varying_system(n, m, horizon, seed=3)
    X, U = _narrow_rollouts(A, B, c, 20, scale=0.05, seed=4)
    F_wrong = np.concatenate([A[0], B[0]], axis=1) + 0.3
    prior = _wide_prior(F_wrong, horizon, n)
    with jax.enable_x64(True):
        as_is = parameter_error(fit_linear_gaussian(X, U, prior=prior), A, B)
        local = parameter_error(fit_linear_gaussian(X, U, prior=local_prior(prior, X, U)), A, B)
        strong = type(prior)(mu0=prior.mu0, Phi=1e6 * prior.Phi, kappa=1e6 * prior.kappa, n0=1e6 * prior.n0)
        trusted = fit_linear_gaussian(X, U, prior=local_prior(strong, X, U))
    # measured: 1.27 as it is, 0.073 on the data's spread (the prior's own slope is off by 1.35)
    assert local < 0.1 * as_is
    # the fit's ridge (1e-6) against the rollouts' variance (0.05^2) shrinks slopes by 4e-4
    np.testing.assert_allclose(np.asarray(trusted.F), np.broadcast_to(F_wrong, trusted.F.shape), atol=5e-3)
    with pytest.raises(ForethoughtError, match="spread must be"):
        local_prior(prior, X, U, spread=-1.0)


def test_reference_restarts_escape_the_zero_start_optimum_and_its_controller_tracks_it():
    """iLQR from zero controls ends in a slow-pumping local optimum of the pendulum swing-up; the
    best of several random starts is cheaper, and the tracking controller's mean run on the true
    system reproduces that trajectory's cost."""
    import jax.numpy as jnp
    with jax.enable_x64(True):
        env = SystemEnv(systems.make("pendulum"))
        problem = lqr_flm.Problem(lqr_flm.Config(cost="quadratic", squash=True), env)
        best, from_zero = lqr_flm.reference_solution(problem, problem.x0, starts=8, key=jax.random.key(0))
        assert float(best.cost) < 0.9 * from_zero
        controller = lqr_flm.tracking_controller(problem, best, 0.1)
        assert bool(jnp.all(jnp.isfinite(controller.K)))
        mean_cost = float(lqr_flm._mean_cost(problem, controller, jnp.asarray(problem.x0)))
        assert mean_cost == pytest.approx(float(best.cost), rel=1e-6)
        with pytest.raises(ForethoughtError, match="starts must be >= 1"):
            lqr_flm.reference_solution(problem, problem.x0, starts=0)
