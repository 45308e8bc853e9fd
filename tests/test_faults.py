"""Numerical faults are detected, named (component and step) and handled as the policy says:
"stop" raises, "skip" keeps the last good values; a NaN never reaches a checkpoint."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought import checkpoint, faults
from forethought.agents.base import MemoryRun
from forethought.cli import main
from forethought.experiment.run import read_metrics
from forethought.faults import NumericalFault
from forethought.models.ensemble import Ensemble, EnsembleSpec
from forethought.models.gp import GP
from forethought.models.train import TrainConfig, fit
from forethought.rl import sac
from tests.models.data import noisy_sine


def test_keep_finite_picks_the_old_values_when_anything_is_nan_or_inf():
    old = {"w": jnp.ones(3), "n": jnp.int32(4)}
    good = {"w": jnp.full(3, 2.0), "n": jnp.int32(5)}
    chosen, ok = jax.jit(faults.keep_finite)(good, old)
    assert bool(ok) and float(chosen["w"][0]) == 2.0 and int(chosen["n"]) == 5
    for bad_value in (jnp.nan, jnp.inf, -jnp.inf):
        bad = {"w": jnp.array([2.0, bad_value, 2.0]), "n": jnp.int32(5)}
        chosen, ok = jax.jit(faults.keep_finite)(bad, old)
        assert not bool(ok) and np.array_equal(chosen["w"], old["w"]) and int(chosen["n"]) == 4
    # an extra condition (a loss) counts too
    _, ok = faults.keep_finite(good, old, jnp.isfinite(jnp.float32(jnp.nan)))
    assert not bool(ok)


def test_stop_raises_naming_component_and_step_and_skip_records_an_event():
    with pytest.raises(NumericalFault, match=r"numerical fault in critic at update 7: loss is NaN"):
        faults.report("critic", "update 7", "loss is NaN")  # "stop" is the default
    run = MemoryRun()
    with faults.handling("skip", record=run.event), pytest.warns(RuntimeWarning, match="on_fault=skip"):
        faults.report("critic", "update 7", "loss is NaN")
    assert run.events == [{"event": "numerical_fault", "component": "critic", "step": "update 7",
                           "detail": "loss is NaN", "handled": "skipped"}]
    assert faults.policy() == "stop"  # the block restored the default
    with pytest.raises(ValueError, match="on_fault policy 'ignore'"):
        with faults.handling("ignore"):
            pass


def test_a_checkpoint_holding_nan_is_refused_and_the_previous_one_kept(tmp_path):
    path = tmp_path / "c.npz"
    checkpoint.save(path, {"params": {"w": np.ones(3)}, "best": np.float64(np.inf)}, {"n": 1})  # inf: allowed
    with pytest.raises(NumericalFault, match=r"checkpoint.*NaN in \['params'\]\['w'\]"):
        checkpoint.save(path, {"params": {"w": np.array([1.0, np.nan, 0.0])}, "best": np.float64(0.0)}, {"n": 2})
    _, meta = checkpoint.load(path, {"params": {"w": np.ones(3)}, "best": np.float64(0.0)})
    assert meta == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]


@pytest.fixture(scope="module")
def exploding_fit():
    """An ensemble fit whose learning rate makes the loss overflow within a few epochs."""
    spec = EnsembleSpec(1, 1, members=2, hidden=16, layers=2)
    model = Ensemble.create(spec, jax.random.key(0))
    data = noisy_sine(300, 0)
    return model, data, TrainConfig(max_epochs=30, learning_rate=1e4, patience=100)


def test_an_exploding_ensemble_fit_stops_with_the_epoch(exploding_fit):
    model, data, config = exploding_fit
    with pytest.raises(NumericalFault, match=r"ensemble fit at epoch \d+: the held-out loss became NaN or inf"):
        fit(model, *data, jax.random.key(1), config)


def test_an_exploding_ensemble_fit_skipped_keeps_its_last_good_epoch(exploding_fit):
    model, data, config = exploding_fit
    run = MemoryRun()
    with faults.handling("skip", record=run.event), pytest.warns(RuntimeWarning):
        fitted, report = fit(model, *data, jax.random.key(1), config)
    assert [e["component"] for e in run.events] == ["ensemble fit"]
    assert bool(faults.all_finite(eqx.filter(fitted, eqx.is_array)))
    assert report.epochs < config.max_epochs and np.isfinite(report.holdout_loss[-1])
    # it still predicts: finite means on the data
    mean, var = fitted.predict_all(jnp.asarray(data[0]), jnp.asarray(data[1]))
    assert bool(jnp.all(jnp.isfinite(mean)) & jnp.all(jnp.isfinite(var)))


def test_an_exploding_bnn_fit_stops_or_keeps_its_last_good_epoch():
    from forethought.models.bnn import BNN, BNNSpec, BNNTrainConfig
    from forethought.models.bnn import fit as fit_bnn

    model = BNN.create(BNNSpec(1, 1, hidden=16, layers=2), jax.random.key(0))
    data, config = noisy_sine(300, 0), BNNTrainConfig(learning_rate=1e6, batch_size=64, max_epochs=30, patience=100)
    with pytest.raises(NumericalFault, match=r"BNN fit at epoch \d+"):
        fit_bnn(model, *data, jax.random.key(1), config)
    with faults.handling("skip"), pytest.warns(RuntimeWarning):
        fitted, report = fit_bnn(model, *data, jax.random.key(1), config)
    assert bool(faults.all_finite(eqx.filter(fitted, eqx.is_array))) and np.isfinite(report.holdout_loss[-1])


SPEC = sac.SACSpec(obs_dim=2, action_dim=1, action_low=(-1.0,), action_high=(1.0,), hidden=16, layers=2,
                   batch_size=8)


def _pool(reward):
    rng = np.random.default_rng(0)
    s, a = rng.normal(size=(64, 2)), rng.uniform(-1, 1, (64, 1))
    return sac.padded_pool(s, a, reward, s, np.zeros(64, bool))


def test_sac_updates_on_nan_rewards_are_skipped_and_reported():
    state = sac.init(SPEC, jax.random.key(0))
    poisoned = _pool(np.full(64, np.nan))
    with pytest.raises(NumericalFault, match=r"SAC update at update 0: 5 update\(s\) gave NaN"):
        sac.update(SPEC, state, (poisoned,), (8,), jax.random.key(1), 5)
    with faults.handling("skip"), pytest.warns(RuntimeWarning):
        kept, metrics = sac.update(SPEC, state, (poisoned,), (8,), jax.random.key(1), 5)
    assert int(metrics["skipped_updates"]) == 5
    for new, old in zip(jax.tree_util.tree_leaves(eqx.filter(kept, eqx.is_array)),
                        jax.tree_util.tree_leaves(eqx.filter(state, eqx.is_array))):
        np.testing.assert_array_equal(new, old)
    # clean data: nothing skipped, the parameters move
    moved, metrics = sac.update(SPEC, state, (_pool(np.zeros(64)),), (8,), jax.random.key(1), 5)
    assert int(metrics["skipped_updates"]) == 0 and np.isfinite(float(metrics["critic_loss"]))
    assert any(not np.array_equal(new, old) for new, old in zip(
        jax.tree_util.tree_leaves(eqx.filter(moved, eqx.is_array)),
        jax.tree_util.tree_leaves(eqx.filter(state, eqx.is_array))))


def test_the_mpc_planner_follows_its_last_good_plan_when_the_model_gives_nan():
    from forethought import systems
    from forethought.agents.mpc import PETSConfig, Planner

    system = systems.make("pendulum")
    config = PETSConfig(horizon=5, population=32, iterations=2, particles=4, members=2)
    spec = EnsembleSpec(system.state_dim, system.action_dim, members=2, hidden=8, layers=2,
                        angles=system.angles)
    model = Ensemble.create(spec, jax.random.key(0))
    planner = Planner(config, system, spec)
    x, U = system.initial_state(), jnp.full((5, 1), 0.7, jnp.float32)
    u, _, ok = planner.act(model, x, U, jax.random.key(1))
    assert bool(ok) and bool(jnp.all(jnp.isfinite(u)))
    broken = jax.tree.map(lambda a: a * jnp.nan if eqx.is_inexact_array(a) else a, model)
    u, U_next, ok = planner.act(broken, x, U, jax.random.key(1))
    assert not bool(ok)
    np.testing.assert_array_equal(u, U[0])  # the warm-start plan, shifted
    np.testing.assert_array_equal(U_next[:-1], U[1:])


def test_a_failed_gp_cholesky_is_a_numerical_fault():
    X = jnp.zeros((5, 1), jnp.float32)  # five copies of one input and no noise: K is singular
    with pytest.raises(NumericalFault, match=r"GP Cholesky at conditioning on 5 points"):
        GP.from_hyperparameters(X, jnp.arange(5.0)[:, None], lengthscale=1.0, signal_var=1.0,
                                noise_var=0.0, jitter=0.0, normalise=False)


SAC_FLAGS = ["--episodes", "3", "--random-steps", "100", "--update-every", "50", "--batch-size", "32",
             "--hidden", "16"]


def test_the_cli_stops_on_a_fault_with_status_3_and_a_consistent_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "sac", "--env", "pendulum", "--out", str(out), *SAC_FLAGS, "--critic-lr", "1e30"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "numerical fault in SAC update" in err and err.count("\n") == 2  # the run folder line, then one error
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "numerical_fault" and events[-1]["handled"] == "stopped"
    rows = checkpoint.load_meta(out / "checkpoint.npz")["metric_rows"]
    assert len(read_metrics(out)["episode"]) == rows  # metrics end where the checkpoint does


def test_the_cli_skips_faults_when_told_and_records_each(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "sac", "--env", "pendulum", "--out", str(out), "--on-fault", "skip", *SAC_FLAGS,
                 "--critic-lr", "1e30"]) == 0
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    skipped = [e for e in events if e["event"] == "numerical_fault"]
    assert skipped and all(e["handled"] == "skipped" and e["component"] == "SAC update" for e in skipped)
    assert json.loads((out / "config.json").read_text())["on_fault"] == "skip"
    assert len(read_metrics(out)["episode"]) == 3
