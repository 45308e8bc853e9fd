import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought.errors import ForethoughtError
from forethought.models.ensemble import Ensemble, EnsembleSpec, particle_cost, state_features
from forethought.models.train import TrainConfig, evaluate, fit, gaussian_nll
from tests.models.data import noisy_sine



@pytest.fixture(scope="module")
def fitted():
    spec = EnsembleSpec(1, 1, members=5, hidden=64, layers=2)
    model = Ensemble.create(spec, jax.random.key(0))
    model, report = fit(model, *noisy_sine(2000, 0), jax.random.key(1),
                        TrainConfig(max_epochs=60, learning_rate=3e-3))
    return model, report


def test_nll_is_the_notes_formula():
    mean, logvar, y = jnp.array([[0.5, -1.0]]), jnp.array([[0.2, -0.3]]), jnp.array([[1.0, 0.0]])
    by_hand = np.mean([(0.5**2) / np.exp(0.2) + 0.2, (1.0**2) / np.exp(-0.3) - 0.3])
    assert float(gaussian_nll(mean, logvar, y)) == pytest.approx(by_hand, rel=1e-6)


def test_log_variance_stays_inside_the_learned_bounds(fitted):
    model, _ = fitted
    z = jax.random.normal(jax.random.key(3), (5, 100, model.spec.input_dim)) * 50.0  # far outside the data
    _, logvar = model.heads(model.net, z)
    # PETS' soft bounds can overshoot by softplus's tail, exp(-(max - min)) ~ 5e-5 here
    assert bool(jnp.all(logvar <= model.net.max_logvar[:, None] + 1e-3))
    assert bool(jnp.all(logvar >= model.net.min_logvar[:, None] - 1e-3))
    assert float(jnp.min(logvar)) < float(jnp.max(logvar)) - 1.0  # and they are not collapsed


def test_the_ensemble_recovers_the_noise_level_and_is_calibrated(fitted):
    model, report = fitted
    assert report.holdout_loss[-1] < report.holdout_loss[0]
    metrics = evaluate(model, *noisy_sine(4000, 1))
    assert metrics["mse"] == pytest.approx(0.01, rel=0.3)  # noise variance 0.1^2
    assert 0.63 <= metrics["within_1sigma"] <= 0.74
    assert 0.93 <= metrics["within_2sigma"] <= 0.98


def test_members_disagree_more_away_from_the_data(fitted):
    model, _ = fitted
    inside = evaluate(model, *noisy_sine(500, 2))["epistemic_std"]
    outside = evaluate(model, *noisy_sine(500, 2, low=6.0, high=9.0))["epistemic_std"]
    assert outside > 10 * inside


def test_propagation_modes_give_particles_near_the_truth(fitted):
    model, _ = fitted
    X = jnp.full((20, 1), 1.0)
    truth = 1.0 + np.sin(1.0) + 0.5 * 0.3
    for propagation in ("ts_inf", "ts1", "expectation"):
        step = jax.jit(model.as_dynamics(jax.random.key(0), particles=20, propagation=propagation))
        nxt = np.asarray(step(X, jnp.array([0.3]), 0))
        assert nxt.shape == (20, 1)
        assert abs(nxt.mean() - truth) < 0.1
        spread = nxt.std()
        assert spread < 1e-6 if propagation == "expectation" else 0.03 < spread < 0.3
    step = model.as_dynamics(jax.random.key(0), particles=20)
    np.testing.assert_array_equal(step(X, jnp.array([0.3]), 4), step(X, jnp.array([0.3]), 4))  # common numbers


def test_particle_cost_is_the_mean_over_particles():
    cost = particle_cost(lambda x, u, t: jnp.sum(x**2) + jnp.sum(u**2))
    X = jnp.arange(6.0).reshape(3, 2)
    assert float(cost(X, jnp.ones(1), 0)) == pytest.approx(np.mean((np.arange(6.0).reshape(3, 2) ** 2).sum(1)) + 1)


def test_angles_become_sin_and_cos():
    x = jnp.array([[0.5, 1.0, 2.0]])
    np.testing.assert_allclose(state_features(x, (1,)), [[0.5, 2.0, np.sin(1.0), np.cos(1.0)]], rtol=1e-6)


def test_save_and_load_round_trip(fitted, tmp_path):
    model, _ = fitted
    model.save(tmp_path / "m.npz")
    loaded = Ensemble.load(tmp_path / "m.npz")
    x, u = jnp.ones((4, 1)), jnp.zeros((4, 1))
    for a, b in zip(model.predict_all(x, u), loaded.predict_all(x, u)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.elite_index, loaded.elite_index)


def test_deterministic_ensemble_fits_with_mse():
    spec = EnsembleSpec(1, 1, members=2, hidden=32, layers=2, probabilistic=False)
    model, report = fit(Ensemble.create(spec, jax.random.key(0)), *noisy_sine(500, 0, noise=0.0),
                        jax.random.key(1), TrainConfig(max_epochs=100, learning_rate=3e-3, batch_size=32, patience=20))
    metrics = evaluate(model, *noisy_sine(500, 3, noise=0.0))
    assert metrics["mse"] < 0.01


def test_bad_data_is_refused_with_a_clear_message():
    model = Ensemble.create(EnsembleSpec(1, 1, members=2, hidden=8, layers=1), jax.random.key(0))
    x, u, nx = noisy_sine(50, 0)
    x[3, 0] = np.nan
    with pytest.raises(ForethoughtError, match="fit: obs must be finite, got 1 NaN or inf value"):
        fit(model, x, u, nx, jax.random.key(0))
    with pytest.raises(ForethoughtError, match=r"obs/next_obs \[N, 1\]"):
        fit(model, np.zeros((5, 2)), u[:5], nx[:5], jax.random.key(0))
    with pytest.raises(ForethoughtError, match="elites"):
        EnsembleSpec(1, 1, members=2, elites=3)
    with pytest.raises(ForethoughtError, match="multiple of the number of elites"):
        model.as_dynamics(jax.random.key(0), particles=3)


def test_open_loop_error_grows_with_the_horizon_and_is_zero_for_a_perfect_model(fitted):
    from forethought.models.train import open_loop_error

    model, _ = fitted
    rng = np.random.default_rng(4)
    actions = rng.uniform(-1, 1, (40, 1)).astype(np.float32)
    # a real episode of the noise-free system: it settles near the stable point pi
    actions *= 0.2
    x = [np.array([-2.5], np.float32)]
    for u in actions:
        x.append(x[-1] + np.sin(x[-1]) + 0.5 * u)
    obs = np.stack(x)
    errors = open_loop_error(model, obs, actions, horizon=5)
    assert errors.shape == (5,)
    assert errors[0] < 0.15
    assert errors[-1] >= errors[0]
    with pytest.raises(ForethoughtError, match="horizon"):
        open_loop_error(model, obs, actions, horizon=41)


def test_the_hand_derived_silu_matches_jax():
    from forethought.models.ensemble import silu

    x = jnp.linspace(-8.0, 8.0, 101)
    np.testing.assert_allclose(silu(x), jax.nn.silu(x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jax.vmap(jax.grad(silu))(x), jax.vmap(jax.grad(jax.nn.silu))(x), rtol=1e-5, atol=1e-6)


def test_bfloat16_matmuls_give_nearly_the_float32_prediction(fitted):
    model, _ = fitted
    X = jnp.linspace(-2.5, 2.5, 20)[:, None]
    u = jnp.zeros(1)
    exact = model.as_dynamics(jax.random.key(0), particles=20)(X, u, 0)
    rounded = model.as_dynamics(jax.random.key(0), particles=20, matmul_dtype=jnp.bfloat16)(X, u, 0)
    assert rounded.dtype == exact.dtype
    np.testing.assert_allclose(rounded, exact, atol=0.05)
    assert float(jnp.max(jnp.abs(rounded - exact))) > 0  # it did take the bfloat16 path


def test_fit_many_repeats_separate_fits_and_stops_each_on_its_own():
    """Three fits as one vmapped program equal three `fit` calls (up to float reassociation), with
    data of different sizes (padded to the largest) and different early-stopping epochs."""
    from forethought.models.train import fit_many

    spec = EnsembleSpec(1, 1, members=2, hidden=16, layers=1)
    models = [Ensemble.create(spec, jax.random.key(s)) for s in range(3)]
    datasets = [noisy_sine(n, s) for n, s in ((100, 0), (110, 1), (300, 2))]
    keys = [jax.random.key(10 + s) for s in range(3)]
    config = TrainConfig(max_epochs=40, batch_size=32, patience=2, learning_rate=3e-3)
    together, reports = fit_many(models, datasets, keys, config)
    alone = [fit(m, *d, k, config) for m, d, k in zip(models, datasets, keys)]
    assert len({r.epochs for r in reports}) > 1  # the fits stopped at different epochs
    for model, report, (model_alone, report_alone), data in zip(together, reports, alone, datasets):
        # 90 and 99 training points pad to 128 as they do alone, 270 to 512; the first two fits
        # are padded to 512 here (another shuffle): compare those by their quality only
        if len(data[0]) == 300:
            assert report.epochs == report_alone.epochs
            assert report.member_holdout == pytest.approx(report_alone.member_holdout, rel=1e-3)
            np.testing.assert_array_equal(model.elite_index, model_alone.elite_index)
        assert evaluate(model, *data)["mse"] == pytest.approx(evaluate(model_alone, *data)["mse"], rel=0.3)
    with pytest.raises(ForethoughtError, match="as many models, datasets and keys"):
        fit_many(models, datasets[:2], keys, config)
