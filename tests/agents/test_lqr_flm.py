"""The LQR-FLM agent: on a linear system (exact linear dynamics, quadratic cost) it reaches the LQR
optimum; every update respects its KL bound; a cut-off run resumes to the same numbers; what it
cannot handle is refused clearly."""

import jax
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
    for cost in result.costs:
        assert cost == pytest.approx(result.reference_cost, rel=1e-4), result.costs
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
    # ilqr_cost is NaN without the reference, and NaN != NaN
    assert without_timing(cut.rows + resumed.rows, also=["ilqr_cost"]) == without_timing(whole.rows, also=["ilqr_cost"])


def test_unsupported_envs_and_configs_are_refused():
    import gymnasium

    with pytest.raises(ForethoughtError, match="built-in continuous system"):
        lqr_flm.train(lqr_flm.Config(episodes=1), gymnasium.make("MountainCarContinuous-v0"), jax.random.key(0))
    with pytest.raises(ForethoughtError, match="kl_step must be > 0"):
        lqr_flm.Config(kl_step=0.0)
    with pytest.raises(ForethoughtError, match="rollouts >= 2"):
        lqr_flm.Config(prior="none", rollouts=1)
