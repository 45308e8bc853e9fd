"""Guided policy search on a linear system, where the best policy is known: local LQR-FLM
controllers from four starts teach one MLP policy, which then matches LQR's optimal cost from four
starts it never saw; a cut-off run resumes to the same numbers; bad settings are refused."""

import jax
import numpy as np
import pytest

from forethought import systems
from forethought.agents import gps
from forethought.agents.base import MemoryRun
from forethought.errors import ForethoughtError
from forethought.systems.gym import SystemEnv
from tests.agents.resume import Cut, without_timing

# a force bound the optimum never meets: the problem is linear-quadratic, iLQR's costs are LQR's
SYSTEM = systems.make("double-integrator", start_position=1.0, max_action=100.0, horizon=30)
SMALL = dict(spread=(0.5, 0.5), hidden=32, policy_steps=500, kl_step=1.0)


def test_the_global_policy_matches_lqr_from_new_starts():
    run = MemoryRun()
    result = gps.train(gps.Config(episodes=4, **SMALL), SystemEnv(SYSTEM), jax.random.key(0), run)
    np.testing.assert_allclose(result.train_costs, result.reference_train, rtol=0.02)
    np.testing.assert_allclose(result.test_costs, result.reference_test, rtol=0.02)
    # the first local controllers (noise about zero force) are far from it
    assert run.rows[0]["local_cost"] > 5 * run.rows[-1]["local_cost"]
    for row in run.rows:
        assert np.isfinite(row["policy_loss"]) and row["global_test_cost"] > 0


def test_resume_repeats_the_uninterrupted_run():
    config = gps.Config(episodes=3, rollouts=3, spread=(0.5, 0.5), hidden=8, policy_steps=50)
    whole = MemoryRun()
    gps.train(config, SystemEnv(SYSTEM), jax.random.key(1), whole)
    cut = Cut(stop=1)
    with pytest.raises(KeyboardInterrupt):
        gps.train(config, SystemEnv(SYSTEM), jax.random.key(1), cut)
    resumed = Cut(saved=cut.saved)
    gps.train(config, SystemEnv(SYSTEM), jax.random.key(1), resumed)
    assert without_timing(cut.rows + resumed.rows) == without_timing(whole.rows)


def test_bad_settings_are_refused():
    with pytest.raises(ForethoughtError, match="spread"):
        gps.Config(spread=(0.5, -1.0))
    with pytest.raises(ForethoughtError, match="lambda_growth"):
        gps.Config(lambda_growth=0.5)
    with pytest.raises(ForethoughtError, match="rollouts"):
        gps.Config(rollouts=1)
    with pytest.raises(ForethoughtError, match="init must be"):
        gps.Config(init="demo")
    with pytest.raises(ForethoughtError, match="reference_starts"):
        gps.Config(reference_starts=0)
