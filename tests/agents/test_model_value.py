"""Tests of the MVE / SVG / BPTT building blocks (seed 002 sec 5.3-5.4, seed 000, 001, 003)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought.agents import model_value as mv
from forethought.errors import ForethoughtError
from forethought.rl import sac


def _spec():
    return sac.SACSpec(obs_dim=3, action_dim=1, action_low=(-2.0,), action_high=(2.0,), hidden=16, layers=1)


def _batch(key, B=8):
    k = jax.random.split(key, 4)
    return sac.Batch(jax.random.normal(k[0], (B, 3)), jax.random.uniform(k[1], (B, 1), minval=-2, maxval=2),
                     jax.random.normal(k[2], (B,)), jax.random.normal(k[3], (B, 3)),
                     jnp.arange(B) % 3 == 0)


def test_mve_horizon_zero_is_sac_target():
    spec = _spec()
    state = sac.init(spec, jax.random.PRNGKey(0))
    batch, key = _batch(jax.random.PRNGKey(1)), jax.random.PRNGKey(2)
    dyn = lambda x, a, t: x + 0.1 * a
    rew = lambda x, a: -jnp.sum(x ** 2, -1)
    y0 = mv.mve_target(spec, state, batch, key, None, dyn, rew, 0)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(sac.td_target(spec, state, batch, key)))
    y3 = mv.mve_target(spec, state, batch, key, None, dyn, rew, 3)
    assert y3.shape == y0.shape and bool(jnp.all(jnp.isfinite(y3)))
    # done transitions keep only r
    done = np.asarray(batch.done)
    np.testing.assert_allclose(np.asarray(y3)[done], np.asarray(batch.reward)[done])


A = jnp.array([[1.0, 0.1], [0.0, 1.0]])
Bm = jnp.array([[0.0], [0.1]])


def _lin_dyn(x, a, t):
    return x @ A.T + a @ Bm.T


def _quad_rew(x, a):
    return -jnp.sum(x ** 2, -1) - 0.1 * jnp.sum(a ** 2, -1)


def test_svg_gradient_matches_finite_difference_float64():
    with jax.enable_x64(True):
        K = jnp.array([[-0.5, -0.3]], jnp.float64)
        s0 = jax.random.normal(jax.random.PRNGKey(0), (16, 2), jnp.float64)
        P = jnp.eye(2, dtype=jnp.float64)
        value = lambda x, k: -jnp.einsum("bi,ij,bj->b", x, P, x)  # known quadratic tail

        def pol(params, x, k):  # linear-Gaussian, reparameterised
            eps = jax.random.normal(k, (x.shape[0], 1), jnp.float64)
            return x @ params["K"].T + 0.2 * eps, jnp.zeros(x.shape[0], jnp.float64)

        f = lambda p: mv.svg_objective(pol, p, _lin_dyn, _quad_rew, value, s0, jax.random.PRNGKey(3), 5, 0.95)
        g = jax.grad(f)({"K": K})["K"]
        fd = np.zeros((1, 2))
        for j in range(2):
            e = jnp.zeros_like(K).at[0, j].set(1e-6)
            fd[0, j] = (f({"K": K + e}) - f({"K": K - e})) / 2e-6
        np.testing.assert_allclose(np.asarray(g), fd, rtol=1e-6, atol=1e-8)


def test_bptt_gradient_explodes_svg_with_value_tail_bounded():
    Au = jnp.array([[1.3, 0.2], [0.0, 1.2]])  # unstable
    dyn = lambda x, a, t: x @ Au.T + a @ Bm.T
    s0 = jax.random.normal(jax.random.PRNGKey(0), (32, 2))
    pol = lambda p, x: x @ p.T
    K = jnp.array([[-0.1, -0.1]])
    norms = [float(jnp.linalg.norm(jax.grad(lambda p: mv.bptt_objective(pol, p, dyn, _quad_rew, s0, H))(K)))
             for H in (5, 10, 20, 40)]
    assert all(b > a for a, b in zip(norms, norms[1:]))
    assert norms[-1] > 1e4 * norms[0]
    value = lambda x, k: -jnp.sum(x ** 2, -1)
    svg = mv.svg_objective(lambda p, x, k: (pol(p, x), jnp.zeros(x.shape[0])), K, dyn, _quad_rew, value, s0,
                           jax.random.PRNGKey(0), 1, 0.99)
    g = jax.grad(lambda p: mv.svg_objective(lambda q, x, k: (pol(q, x), jnp.zeros(x.shape[0])), p, dyn, _quad_rew,
                                            value, s0, jax.random.PRNGKey(0), 1, 0.99))(K)
    assert jnp.isfinite(svg) and float(jnp.linalg.norm(g)) < norms[0]


def test_config_validation_names_field():
    with pytest.raises(ForethoughtError, match="horizon"):
        mv.HorizonConfig(horizon=-1)
    with pytest.raises(ForethoughtError, match="horizon"):
        mv.HorizonConfig(horizon=0, min_horizon=1)
    with pytest.raises(ForethoughtError, match="max_grad_norm"):
        mv.HorizonConfig(max_grad_norm=0.0)
    assert mv.HorizonConfig(horizon=0).horizon == 0


def test_clipped_bptt_learns_double_integrator():
    dyn = lambda x, a, t: _lin_dyn(x, jnp.clip(a, -5, 5), t)
    pol = lambda p, x: x @ p.T
    s0 = jax.random.normal(jax.random.PRNGKey(1), (64, 2))
    cfg = mv.HorizonConfig(horizon=30, min_horizon=1, max_grad_norm=1.0)
    opt = mv.bptt_optimizer(cfg, 0.05)
    params = jnp.zeros((1, 2))
    state = opt.init(params)
    step = jax.jit(lambda p, s: mv.clipped_bptt_step(pol, p, s, opt, dyn, _quad_rew, s0, cfg.horizon))
    start = float(mv.bptt_objective(pol, params, dyn, _quad_rew, s0, cfg.horizon))
    for _ in range(200):
        params, state, value, norm = step(params, state)
    end = float(mv.bptt_objective(pol, params, dyn, _quad_rew, s0, cfg.horizon))
    assert end > start + 0.3 * abs(start), (start, end)
    assert float(params[0, 0]) < 0 and float(params[0, 1]) < 0  # stabilising feedback


def test_mve_agent_smoke_on_point_mass():
    from forethought import systems
    from forethought.agents import load
    from forethought.agents.base import MemoryRun
    from forethought.systems.gym import SystemEnv
    module = load("mve")
    with pytest.raises(ForethoughtError, match="horizon"):
        module.Config(horizon=-1)
    system = systems.make("double-integrator", start_position=2.0, init_std=0.2, horizon=30)
    cfg = module.Config(episodes=3, random_steps=30, update_every=15, updates_per_step=2, model_train_every=30,
                        members=2, elites=1, model_hidden=16, model_layers=1, model_max_epochs=2, horizon=2,
                        hidden=16, batch_size=32, model_retain_steps=15)
    run = MemoryRun()
    result = module.train(cfg, SystemEnv(system), jax.random.key(0), run)
    assert len(result.returns) == 3 and all(np.isfinite(result.returns))
    assert run.rows[-1]["updates"] > 0
