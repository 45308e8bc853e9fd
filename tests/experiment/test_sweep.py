"""Sweeps (issue #10): seeds x settings as Ray Tune trials, each a complete run folder, a killed
worker's trial resumed to the same result, and the aggregate figures and table."""

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from forethought.agents.dyna_q import Config as DynaConfig
from forethought.cli import main
from forethought.errors import ForethoughtError
from forethought.experiment import aggregate, sweep
from forethought.experiment.run import read_metrics

CLI = [sys.executable, "-m", "forethought.cli"]


def comparable(path):
    """The run's metrics without their wall-clock column."""
    return {k: v for k, v in read_metrics(path).items() if "seconds" not in k}


def needs_ray():
    """Skip without Ray Tune, found without importing it: Ray's protobuf runtime loaded beside
    jaxlib's may crash JAX's compilation-cache writes later in the same test process."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray[tune] is not installed")


def events(path):
    return [json.loads(line) for line in (path / "events.jsonl").read_text().splitlines()]


# ----- planning the trials (no Ray needed) -------------------------------------------------------

def test_seeds_expand_ranges_and_lists():
    assert sweep.parse_seeds("0-3") == [0, 1, 2, 3]
    assert sweep.parse_seeds("5,0,3") == [0, 3, 5]
    assert sweep.parse_seeds("0-2,7") == [0, 1, 2, 7]
    for bad in ("x", "3-1", "-1", "1-2-3", "", "0,0"):
        with pytest.raises(ForethoughtError, match="--seeds"):
            sweep.parse_seeds(bad)


def test_grid_values_are_parsed_by_the_agent_config_and_every_combination_is_a_setting():
    settings = sweep.parse_grid(["planning-steps=0,5", "alpha=0.5,1"], DynaConfig, ["--episodes", "3"], "p")
    assert [s.name for s in settings] == ["planning-steps=0_alpha=0.5", "planning-steps=0_alpha=1",
                                          "planning-steps=5_alpha=0.5", "planning-steps=5_alpha=1"]
    assert settings[3].overrides == {"planning_steps": 5, "alpha": 1.0}
    assert settings[3].config == DynaConfig(episodes=3, planning_steps=5, alpha=1.0)
    assert [s.name for s in sweep.parse_grid([], DynaConfig, [], "p")] == ["default"]


@pytest.mark.parametrize("grid,flags,message", [
    (["planning-steps=0,x"], [], "--grid planning-steps=x"),
    (["bogus=1,2"], [], "--grid bogus=1,2: the agent's config has no field 'bogus'"),
    (["planning-steps"], [], "expected FIELD=V1,V2"),
    (["planning-steps=1,1"], [], "a value is given twice"),
    (["alpha=2"], [], "alpha must be in (0, 1], got 2.0"),
    (["episodes=2,3"], ["--episodes", "4"], "--episodes is also given as an agent flag"),
    (["episodes=2", "episodes=3"], [], "already in another --grid"),
    ([], ["--bogus", "1"], "agent flags --bogus 1"),
])
def test_grid_mistakes_are_one_error_naming_the_flag(grid, flags, message):
    with pytest.raises(ForethoughtError) as error:
        sweep.parse_grid(grid, DynaConfig, flags, "p")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_sweep_cli_mistakes_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "sweep"
    for args, message in [
        (["sweep", "random", "--seeds", "a-b"], "--seeds"),
        (["sweep", "random", "--grid", "episodes=0,2"], "--grid episodes=0: Error parsing Config: episodes must be >= 1"),
        (["sweep", "random", "--env", "pendulm"], "unknown env 'pendulm'"),
        (["sweep", "random", "--cpus-per-trial", "0"], "--cpus-per-trial"),
        (["sweep", "random", "--address", "auto", "--num-cpus", "2"], "--num-cpus sizes the local Ray"),
        (["sweep"], "missing AGENT"),
        (["sweep", "dyna-q", "--env", "dyna-maze", "--vectorize"], "--vectorize: agent dyna-q has no vectorized form"),
        (["sweep", "pets", "--env", "gym:Pendulum-v1", "--vectorize"], "--vectorize needs a built-in system"),
    ]:
        if importlib.util.find_spec("ray") is None and args != ["sweep"] and "--cpus-per-trial" not in args:
            message = "pip install 'forethought[ray]'"
        assert main([*args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith("forethought: error: "), err
    assert not out.exists()


def test_without_ray_the_sweep_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name.split(".")[0] == "ray" else real(name, *args))
    assert main(["sweep", "random", "--seeds", "0-1", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err == "forethought: error: sweep needs Ray Tune, which is not installed: pip install 'forethought[ray]'\n"
    assert not (tmp_path / "s").exists()


# ----- aggregation ------------------------------------------------------------------------------

def test_run_scores_final_return_auc_and_steps_to_threshold():
    metrics = {"env_steps": [10.0 * (i + 1) for i in range(20)], "return": [float(i) for i in range(20)]}
    scores = aggregate.run_scores(metrics, threshold=4.5)
    assert scores["final"] == 18.5  # the last 10% of 20 episodes: 18 and 19
    assert scores["auc"] == pytest.approx(np.trapezoid(np.arange(20.0), 10.0 * np.arange(1, 21)))
    assert scores["steps_to_threshold"] == 60.0  # return 5 at episode 5
    assert np.isnan(aggregate.run_scores(metrics, threshold=100.0)["steps_to_threshold"])


def test_bootstrap_interval_covers_the_mean_and_repeats():
    values = np.random.default_rng(1).normal(3.0, 1.0, size=50)
    mean, lo, hi = aggregate.bootstrap_interval(values)
    assert lo < mean < hi and mean == pytest.approx(values.mean())
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)  # the normal interval, for scale
    assert hi - lo == pytest.approx(2 * half, rel=0.2)
    assert aggregate.bootstrap_interval(values) == (mean, lo, hi)
    assert aggregate.bootstrap_interval([2.0]) == (2.0, 2.0, 2.0)
    assert aggregate.bootstrap_interval([2.0, 2.0, np.nan]) == (2.0, 2.0, 2.0)


# ----- sweeps on local Ray ------------------------------------------------------------------------

def test_a_2x2_sweep_on_local_ray_writes_four_run_folders_figures_and_a_summary(tmp_path):
    needs_ray()
    out = tmp_path / "sweep"
    result = subprocess.run([*CLI, "sweep", "random", "--env", "pendulum", "--seeds", "0-1", "--grid",
                             "episodes=2,3", "--num-cpus", "2", "--threshold=-1e9", "--tensorboard", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "sweep.json").read_text())
    assert record["agent"] == "random" and record["seeds"] == [0, 1]
    assert [s["overrides"] for s in record["settings"]] == [{"episodes": 2}, {"episodes": 3}]
    for episodes in (2, 3):
        for seed in (0, 1):
            run = out / f"episodes={episodes}" / f"seed-{seed}"
            assert sweep.finished(run)
            assert {"config.json", "metrics.csv", "checkpoint.npz", "learning_curve.png"} <= {
                p.name for p in run.iterdir()}
            assert json.loads((run / "config.json").read_text())["seed"] == seed
            trial = next(e for e in events(run) if e["event"] == "trial")  # the worker's JAX: one thread
            assert "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" in trial["xla_flags"]
            assert read_metrics(run)["episode"] == list(range(episodes))
            (tensorboard,) = run.glob("events.out.tfevents.*")
            assert len(read_records(tensorboard)) == 1 + episodes
    # the same seed gives the same episodes whatever the setting
    assert comparable(out / "episodes=2/seed-1")["return"] == comparable(out / "episodes=3/seed-1")["return"][:2]
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["setting"], r["episodes"], r["seeds"], r["finished"], r["reached"]) for r in rows] == [
        ("episodes=2", "2", "2", "2", "2"), ("episodes=3", "3", "2", "2", "2")]
    finals = [np.mean(read_metrics(out / f"episodes=2/seed-{s}")["return"][-1:]) for s in (0, 1)]
    assert float(rows[0]["final_return_mean"]) == pytest.approx(np.mean(finals))
    assert float(rows[0]["final_return_lo"]) <= float(rows[0]["final_return_mean"]) <= float(rows[0]["final_return_hi"])
    assert float(rows[0]["steps_to_threshold_mean"]) == 100.0  # every return clears -1e9 at once
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["episodes=2.png", "episodes=3.png", "settings.png"]
    assert "episodes=3  2" in result.stdout and "final return" in result.stdout
    # `forethought plot SWEEP_DIR` writes the same summary again
    (out / "summary.csv").unlink()
    assert main(["plot", str(out)]) == 0
    assert "steps_to_threshold_mean" not in (out / "summary.csv").read_text().splitlines()[0]


def test_a_trial_whose_ray_worker_is_killed_resumes_and_the_sweep_completes_with_intact_data(tmp_path):
    """SIGKILL the Ray worker process of one trial mid-run: Tune retries the trial, which resumes its
    run folder from its last checkpoint; its metrics equal an uninterrupted run of the same seed."""
    needs_ray()
    out = tmp_path / "sweep"
    flags = ["--env", "dyna-maze", "--episodes", "300", "--planning-steps", "50"]
    process = subprocess.Popen([*CLI, "sweep", "dyna-q", *flags, "--seeds", "0-1", "--num-cpus", "2",
                                "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = out / "default" / "seed-0"
    pid, deadline = None, time.time() + 180
    while pid is None and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
        metrics = victim / "metrics.csv"
        if metrics.exists() and len(metrics.read_text().splitlines()) > 20:
            pid = next(e["pid"] for e in events(victim) if e["event"] == "trial")
    assert pid is not None, "the trial should be running: " + (process.stderr.read() if process.poll() is not None else "")
    assert not sweep.finished(victim)
    os.kill(pid, signal.SIGKILL)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert "trial default/seed-0: its worker failed; retrying" in err
    log = events(victim)
    trials = [e for e in log if e["event"] == "trial"]
    assert len(trials) == 2 and trials[0]["pid"] == pid and trials[1]["pid"] != pid and trials[1]["resumed"]
    assert any(e["event"] == "resume" for e in log) and log[-1]["event"] == "finish"
    for seed in (0, 1):
        run = out / "default" / f"seed-{seed}"
        assert sweep.finished(run) and read_metrics(run)["episode"] == list(range(300))
    reference = tmp_path / "reference"
    assert main(["run", "dyna-q", *flags, "--seed", "0", "--out", str(reference)]) == 0
    assert comparable(victim) == comparable(reference)


def test_a_vectorized_sweep_runs_each_settings_seeds_as_one_program(tmp_path):
    """--vectorize: one trial (one worker) per setting; its seeds' run folders are complete and each
    equals a separate run of that seed up to float reassociation."""
    needs_ray()
    out = tmp_path / "sweep"
    flags = ["--episodes", "2", "--horizon", "5", "--population", "16", "--iterations", "2", "--particles", "2",
             "--members", "2", "--hidden", "16", "--layers", "1", "--batch-size", "32", "--max-epochs", "3"]
    result = subprocess.run([*CLI, "sweep", "pets", "--env", "double-integrator", "--seeds", "0-2", "--vectorize",
                             "--no-gif", "--num-cpus", "1", "--out", str(out), *flags],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "trial default/seeds-0-1-2: done" in result.stderr
    pids = set()
    for seed in (0, 1, 2):
        run = out / "default" / f"seed-{seed}"
        assert sweep.finished(run) and "final_episode.gif" not in {p.name for p in run.iterdir()}
        pids |= {e["pid"] for e in events(run) if e["event"] == "trial"}
        assert json.loads((run / "config.json").read_text())["seed"] == seed
    assert len(pids) == 1
    alone = tmp_path / "alone"
    assert main(["run", "pets", "--env", "double-integrator", "--seed", "2", "--no-gif", "--out", str(alone),
                 *flags]) == 0
    vectorized, separate = comparable(out / "default" / "seed-2"), comparable(alone)
    assert vectorized.keys() == separate.keys()
    for column in vectorized:
        np.testing.assert_allclose(vectorized[column], separate[column], rtol=1e-4)
    assert (out / "summary.csv").is_file()


# ----- TensorBoard event files --------------------------------------------------------------------

def read_records(path):
    """The payloads of a TFRecord file, each checked against its masked CRC-32C."""
    import struct

    data, records, at = path.read_bytes(), [], 0
    while at < len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        assert data[at + 8:at + 12] == aggregate._masked_crc(header)
        payload = data[at + 12:at + 12 + length]
        assert data[at + 12 + length:at + 16 + length] == aggregate._masked_crc(payload)
        records.append(payload)
        at += 16 + length
    return records


PARSE = """
import json, sys
from tensorboardX.proto import event_pb2
from tests.experiment.test_sweep import read_records
from pathlib import Path
events = [event_pb2.Event.FromString(r) for r in read_records(Path(sys.argv[1]))]
print(json.dumps({"version": events[0].file_version, "steps": [e.step for e in events[1:]],
                  "values": [{v.tag: v.simple_value for v in e.summary.value} for e in events[1:]]}))
"""


def test_tensorboard_event_files_hold_every_metrics_row(tmp_path):
    """Parsed by tensorboardX's protobuf classes in a subprocess: a protobuf runtime loaded beside
    jaxlib's crashed JAX's later cache writes in the same test process."""
    assert aggregate.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    if importlib.util.find_spec("tensorboardX") is None:
        pytest.skip("tensorboardX is not installed")
    out = tmp_path / "run"
    assert main(["run", "random", "--env", "pendulum", "--episodes", "3", "--tensorboard", "--out", str(out)]) == 0
    (file,) = out.glob("events.out.tfevents.*")
    parsed = json.loads(subprocess.run([sys.executable, "-c", PARSE, str(file)], capture_output=True, text=True,
                                       check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
                                       ).stdout)
    assert parsed["version"] == "brain.Event:2"
    metrics = read_metrics(out)
    assert parsed["steps"] == [100, 200, 300]
    assert [v["metrics/return"] for v in parsed["values"]] == pytest.approx(metrics["return"], rel=1e-6)
    assert set(parsed["values"][0]) == {"metrics/return", "metrics/length", "metrics/wall_seconds"}
