"""The SVG/MAAC and policy-backprop agents: the SVG actor loss is what the SAC update minimises,
BPTT drives the point mass home, and both resume bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought import systems
from forethought.agents import bptt, model_value
from forethought.control.ilqr import ilqr
from forethought.errors import ForethoughtError
from forethought.models.ensemble import Ensemble, EnsembleSpec
from forethought.rl import sac
from forethought.systems.gym import SystemEnv
from forethought.experiment.run import read_metrics
from tests.agents.resume import cut_run_folder

def comparable(path):
    """A run's metrics without the wall-clock column, as one string (exact floats, NaN == NaN)."""
    return repr({k: v for k, v in read_metrics(path).items() if "seconds" not in k})


SYSTEM = systems.make("double-integrator", start_position=2.0, init_std=0.2, horizon=30)
MODEL = dict(members=2, elites=2, model_hidden=32, model_layers=2, model_batch_size=32, model_max_epochs=30)


def test_the_svg_update_steps_the_actor_down_the_model_based_loss():
    """One SAC step with the SVG actor objective moves each actor weight against the gradient of
    `sac_svg_loss` through the model (Adam's first step is -lr * sign(grad))."""
    import equinox as eqx

    spec = sac.SACSpec(obs_dim=2, action_dim=1, action_low=(-1.0,), action_high=(1.0,), hidden=16, layers=2,
                       batch_size=16, actor_lr=1e-3)
    state = sac.init(spec, jax.random.key(0))
    model = Ensemble.create(EnsembleSpec(2, 1, members=2, hidden=16, layers=2), jax.random.key(1))
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
    batch = sac.Batch(s, jnp.asarray(rng.uniform(-1, 1, (16, 1)), jnp.float32),
                      jnp.asarray(rng.normal(size=16), jnp.float32), s, jnp.zeros(16, bool))
    objective = model_value._svg_actor_for(SYSTEM, 2)
    key = jax.random.key(2)
    new, _ = sac.update_step(spec, state, batch, key, sac.td_target, model, objective)
    plain, _ = sac.update_step(spec, state, batch, key, sac.td_target, model)
    actor_key = jax.random.split(key)[1]
    grad = eqx.filter_grad(lambda a: objective(a, spec, new.critic, state.log_alpha, batch.obs, actor_key, model)[0])(
        state.actor)
    for g, before, after, other in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(state.actor),
                                       jax.tree_util.tree_leaves(new.actor), jax.tree_util.tree_leaves(plain.actor)):
        g, step = np.asarray(g), np.asarray(after) - np.asarray(before)
        clear = np.abs(g) > 1e-5
        np.testing.assert_array_equal(np.sign(step[clear]), -np.sign(g[clear]))
    assert not np.allclose(jax.tree_util.tree_leaves(new.actor)[0], jax.tree_util.tree_leaves(plain.actor)[0])


def test_svg_agent_resumes_bit_for_bit(tmp_path):
    config = model_value.SVGConfig(episodes=3, random_steps=30, update_every=15, updates_per_step=2,
                                   model_train_every=30, hidden=16, batch_size=32, model_retain_steps=15,
                                   horizon=2, **{**MODEL, "model_max_epochs": 3})
    full = cut_run_folder(tmp_path / "full")
    model_value.train_svg(config, SystemEnv(SYSTEM), jax.random.key(0), full)
    with pytest.raises(KeyboardInterrupt):
        model_value.train_svg(config, SystemEnv(SYSTEM), jax.random.key(0), cut_run_folder(tmp_path / "cut", stop=2))
    model_value.train_svg(config, SystemEnv(SYSTEM), jax.random.key(0), cut_run_folder(tmp_path / "cut"))
    assert comparable(tmp_path / "cut") == comparable(tmp_path / "full")
    rows = read_metrics(tmp_path / "full")
    assert rows["updates"][-1] > 0 and np.isfinite(rows["critic_loss"][-1])


def _optimal_return(system, x0):
    """The env return of the iLQR (here LQR) plan with the true model from `x0`."""
    T = system.horizon
    plan = ilqr(system.cost, system.dynamics, x0, jnp.zeros((T, system.action_dim)))
    return -float(sum(system.cost(plan.x[t], plan.u[t], t) for t in range(T)))


BPTT = dict(random_steps=30, horizon=30, policy_steps=150, hidden=32, **MODEL)


def test_bptt_drives_the_point_mass_home_nearly_as_well_as_lqr():
    result = bptt.train(bptt.Config(episodes=6, **BPTT), SystemEnv(SYSTEM), jax.random.key(0))
    x0 = SYSTEM.initial_state()
    optimal = _optimal_return(SYSTEM, x0)
    x, total = x0, 0.0
    for t in range(SYSTEM.horizon):
        u = jnp.clip(jnp.asarray(result.policy(np.asarray(x), t)), SYSTEM.action_low, SYSTEM.action_high)
        total -= float(SYSTEM.cost(x, u, t))
        x = SYSTEM.dynamics(x, u)
    assert result.returns[0] < 1.3 * optimal  # random actions are far worse
    assert total >= 1.15 * optimal, (total, optimal)  # returns are negative: within 15% of LQR


def test_bptt_resumes_bit_for_bit_and_checks_its_config(tmp_path):
    config = bptt.Config(episodes=3, **{**BPTT, "policy_steps": 20})
    bptt.train(config, SystemEnv(SYSTEM), jax.random.key(1), cut_run_folder(tmp_path / "full"))
    with pytest.raises(KeyboardInterrupt):
        bptt.train(config, SystemEnv(SYSTEM), jax.random.key(1), cut_run_folder(tmp_path / "cut", stop=2))
    bptt.train(config, SystemEnv(SYSTEM), jax.random.key(1), cut_run_folder(tmp_path / "cut"))
    assert comparable(tmp_path / "cut") == comparable(tmp_path / "full")
    for field, value, message in (("horizon", 0, "horizon must be an integer >= 1"),
                                  ("elites", 9, "elites must be <= members"),
                                  ("gamma", 0.0, "gamma must be in")):
        with pytest.raises(ForethoughtError, match=message):
            bptt.Config(**{**BPTT, field: value})
