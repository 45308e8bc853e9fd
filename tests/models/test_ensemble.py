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


# ----- bfloat16 training (mixed precision) ---------------------------------------------------------

def _relative(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("outputs", [1, 2, 17])  # one row (a reshape), even, odd (the rotation)
def test_bf16_matmul_gradients_match_float32_and_the_naive_bfloat16_cast(outputs):
    """The hand-written backward pass against autodiff: the float32 product's gradient to bfloat16
    precision (each factor rounded: ~3e-3 relative here), and `jax.grad` of the bfloat16-cast
    product (which rounds its results instead of the cotangent: ~2.5e-3 apart). A wrong transpose,
    rotation or factor would be off by O(1)."""
    from forethought.models.ensemble import bf16_matmul

    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (5, 64, 30))
    w = jax.random.normal(k[1], (5, outputs, 30)) / 5
    c = jax.random.normal(k[2], (5, 64, outputs))

    def loss(product):
        return lambda x, w: jnp.sum(c * jnp.tanh(product(x, w)))  # a cotangent that depends on y

    def cast(x, w):
        return jnp.einsum("eni,eoi->eno", x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                          preferred_element_type=jnp.float32)

    ours = jax.jit(jax.grad(loss(bf16_matmul), (0, 1)))(x, w)
    exact = jax.grad(loss(lambda x, w: jnp.einsum("eni,eoi->eno", x, w)), (0, 1))(x, w)
    naive = jax.grad(loss(cast), (0, 1))(x, w)
    for got, want, rounded in zip(ours, exact, naive):
        assert got.dtype == jnp.float32
        assert _relative(got, want) < 1e-2
        assert _relative(got, rounded) < 6e-3
    np.testing.assert_array_equal(bf16_matmul(x, w), cast(x, w))  # the forward is the cast product


def test_round_to_bf16_is_astype_for_every_float32():
    from forethought.models.ensemble import round_to_bf16

    bits = np.random.default_rng(0).integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x7F7F8000, 0x00008000,
                      0x00018000, 0x3F808000, 0x3F818000, 0x7FC00000, 0xFFFFFFFF], np.uint32)
    x = jnp.asarray(np.concatenate([bits, edges]).view(np.float32))
    ours = np.asarray(jax.jit(round_to_bf16)(x)).astype(np.float32)
    cast = np.asarray(x.astype(jnp.bfloat16)).astype(np.float32)
    np.testing.assert_array_equal(ours, cast)  # NaNs compare equal here; ties round to even


def _dot_operand_types(hlo: str) -> list[tuple[str, str]]:
    """Element types of the two factors of every `dot` in compiled HLO text."""
    import re

    found = []
    for computation in re.split(r"\n(?=%|ENTRY)", hlo):
        for lhs, rhs in re.findall(r"dot\(%([\w.\-]+), %([\w.\-]+)\)", computation):
            found.append(tuple(re.search(r"%" + re.escape(name) + r" = (\w+)\[", computation).group(1)
                               for name in (lhs, rhs)))
    return found


def test_a_bfloat16_training_step_runs_every_product_in_bfloat16():
    """The compiled epoch (forward, input and weight gradients of every layer) has only bfloat16
    products: XLA turns a product it cannot run in bfloat16 back into a float32 one (see
    `ensemble._rotated_transpose`), which this would catch; and the epoch runs."""
    import equinox as eqx

    from forethought.models.train import _epoch, _optimizer

    spec = EnsembleSpec(4, 1, members=5, hidden=64, layers=2)  # inputs 5, outputs 8
    model = Ensemble.create(spec, jax.random.key(0))
    params, _ = eqx.partition(model.net, eqx.is_array)
    optimizer = _optimizer(1e-3, 0.0)
    args = (model, params, optimizer.init(params), jax.random.normal(jax.random.key(1), (512, 5)),
            jax.random.normal(jax.random.key(2), (512, 4)), jnp.int32(500), jax.random.key(3),
            optimizer, 128, 0.01, False)
    products = {dtype: _dot_operand_types(_epoch.lower(*args, dtype).compile().compiled.as_text())
                for dtype in ("float32", "bfloat16")}
    assert len(products["bfloat16"]) == 2 * 3 + 2  # forward and weight gradient of 3 layers, 2 input gradients
    assert set(products["bfloat16"]) == {("bf16", "bf16")}
    assert set(products["float32"]) == {("f32", "f32")}
    _, _, loss = _epoch(*args, "bfloat16")
    assert np.isfinite(float(loss))


def test_fitting_with_bfloat16_products_reaches_the_float32_held_out_loss():
    """Same data, initialisation and key: the members' best held-out NLL (normalised units, about
    -3.05 here) with bfloat16 products is within 0.03 of float32's. Measured gaps are 0.002-0.004,
    while refitting with another key moves it by about 0.2: 0.03 allows bfloat16's rounding but not
    a training that learns less."""
    spec = EnsembleSpec(1, 1, members=3, hidden=32, layers=2)
    data = noisy_sine(1000, 0)
    held_out = {}
    for dtype in ("float32", "bfloat16"):
        config = TrainConfig(max_epochs=40, learning_rate=3e-3, matmul_dtype=dtype)
        _, report = fit(Ensemble.create(spec, jax.random.key(0)), *data, jax.random.key(1), config)
        held_out[dtype] = float(np.mean(report.member_holdout))
    assert held_out["float32"] < -2.5  # it did learn the noise level
    assert held_out["bfloat16"] == pytest.approx(held_out["float32"], abs=0.03)
    assert held_out["bfloat16"] != held_out["float32"]  # and it did take the bfloat16 path


def test_fit_many_passes_the_matmul_dtype_to_its_vmapped_epoch(monkeypatch):
    """fit_many's epoch (`_epoch` vmapped over seeds) gets the setting, and its vmapped program has
    bfloat16 products (checked on the lowered program: compiling fit_many takes 5-10 s; the
    compiled single-seed epoch is checked above, and fit_many's results equal fit's)."""
    from forethought.models import train

    seen = []

    def spy(*args):
        seen.append(args)
        raise InterruptedError  # stop after the first epoch's arguments

    monkeypatch.setattr(train, "_epochs", spy)
    spec = EnsembleSpec(1, 1, members=2, hidden=16, layers=1)
    config = TrainConfig(max_epochs=3, matmul_dtype="bfloat16")
    with pytest.raises(InterruptedError):
        train.fit_many([Ensemble.create(spec, jax.random.key(s)) for s in range(2)],
                       [noisy_sine(100, 0), noisy_sine(100, 1)], [jax.random.key(1), jax.random.key(2)], config)
    assert seen[0][-1] == "bfloat16"
    monkeypatch.undo()
    lowered = train._epochs.lower(*seen[0]).lowered.as_text()
    products = [line for line in lowered.splitlines() if "dot_general" in line and "->" in line]
    assert len(products) == 2 * 2 + 1  # forward and weight gradient of 2 layers, 1 input gradient
    assert all(line.split("->")[0].count("bf16>") == 2 for line in products)


def test_train_config_refuses_an_unknown_matmul_dtype():
    with pytest.raises(ForethoughtError, match="TrainConfig.matmul_dtype"):
        TrainConfig(matmul_dtype="float16")
