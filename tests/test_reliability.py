"""Runs survive interruption and untrusted input (issue #11): kills at random moments, SIGTERM and
SIGINT, `--config` repeats, and crafted config files that must be refused without running code."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from forethought import agents, checkpoint
from forethought.cli import main
from forethought.experiment.run import read_metrics

CLI = [sys.executable, "-m", "forethought.cli"]
EPISODES = 120
DYNA = ["run", "dyna-q", "--env", "dyna-maze", "--episodes", str(EPISODES), "--planning-steps", "20",
        "--seed", "4"]


def run_cli(*args):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def comparable(path):
    """The run's metrics without their wall-clock column."""
    return {k: v for k, v in read_metrics(path).items() if "seconds" not in k}


def rows(path):
    file = path / "metrics.csv"
    return max(len(file.read_text().splitlines()) - 1, 0) if file.exists() else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_cli(*DYNA, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return comparable(out)


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args):
    # A shell script's background job inherits SIGINT ignored, and Python then leaves it ignored
    # (no KeyboardInterrupt): the child gets the disposition an interactive run has.
    return subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def wait_for_rows(process, path, target, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and rows(path) < target:
        time.sleep(0.005)


def test_killed_at_random_moments_many_times_the_resumed_run_equals_the_uninterrupted_one(tmp_path, reference):
    """SIGKILL at random points (during start-up, mid-episode, mid-write), resume, repeat."""
    out = tmp_path / "run"
    rng = np.random.default_rng(0)
    targets = sorted(rng.integers(0, EPISODES - 10, size=7).tolist())
    kills = 0
    for i, target in enumerate(targets):
        process = start([*DYNA, "--out", str(out)] if i == 0 else ["run", "dyna-q", "--resume", str(out)])
        wait_for_rows(process, out, target)
        time.sleep(rng.uniform(0, 0.02))  # land anywhere inside an episode or a write
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
        assert (out / "config.json").exists()
    assert kills >= 5, "the kills should land before the run ends"
    result = run_cli("run", "dyna-q", "--resume", str(out))
    assert result.returncode == 0, result.stderr
    assert comparable(out) == reference
    events = [json.loads(line)["event"] for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "finish"


@pytest.mark.parametrize("sig,code,event", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_sigterm_and_sigint_leave_a_consistent_folder_that_resumes(tmp_path, reference, sig, code, event):
    out = tmp_path / "run"
    process = start([*DYNA, "--out", str(out)])
    wait_for_rows(process, out, 20)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert f"--resume {out}" in err
    # consistent: metrics hold exactly the rows the checkpoint covers
    assert rows(out) == checkpoint.load_meta(out / "checkpoint.npz")["metric_rows"] > 0
    assert json.loads((out / "events.jsonl").read_text().splitlines()[-1])["event"] == event
    assert run_cli("run", "dyna-q", "--resume", str(out)).returncode == 0
    assert comparable(out) == reference


def test_a_config_json_repeats_the_run_and_flags_override_it(tmp_path):
    first, again, longer = tmp_path / "first", tmp_path / "again", tmp_path / "longer"
    assert main(["run", "dyna-q", "--env", "dyna-maze", "--episodes", "4", "--planning-steps", "3",
                 "--seed", "2", "--out", str(first)]) == 0
    assert main(["run", "--config", str(first / "config.json"), "--out", str(again)]) == 0
    assert comparable(again) == comparable(first)
    assert main(["run", "dyna-q", "--config", str(first), "--episodes", "6", "--out", str(longer)]) == 0
    recorded = json.loads((longer / "config.json").read_text())
    assert recorded["config"]["episodes"] == 6 and recorded["config"]["planning_steps"] == 3
    assert recorded["seed"] == 2 and recorded["env"] == "dyna-maze"
    assert {"jax", "jaxlib", "equinox", "numpy", "jax_backend", "python"} <= set(recorded["environment"])
    assert comparable(longer)["return"][:4] == comparable(first)["return"]


GOOD = {"agent": "random", "env": "pendulum", "seed": 0, "config": {"episodes": 2}}


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object, got list"),
    (json.dumps({**GOOD, "seed": "0"}), "field 'seed' must be a JSON integer, got '0'"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "env"}), "field 'env' is missing"),
    (json.dumps({**GOOD, "config": {"episodes": "2"}}), "field 'episodes' must be an integer, got '2'"),
    (json.dumps({**GOOD, "config": {"episodes": 2.5}}), "field 'episodes' must be an integer, got 2.5"),
    (json.dumps({**GOOD, "config": {"episodes": True}}), "field 'episodes' must be an integer, got True"),
    ('{"agent": "random", "env": "pendulum", "seed": 0, "config": {"episodes": NaN}}', "NaN is not a JSON number"),
    (json.dumps({**GOOD, "config": {"episodes": 0}}), "episodes must be >= 1, got 0"),
    (json.dumps({**GOOD, "config": {"__class__": "os.system"}}), "unknown field(s) ['__class__']"),
    (json.dumps({**GOOD, "agent": "os.system"}), "unknown agent 'os.system'"),
    (json.dumps({**GOOD, "env": "gym:os:system"}), "ids of the form module:ID are refused"),
    (json.dumps({**GOOD, "on_fault": "ignore"}), "on_fault must be one of stop, skip, got 'ignore'"),
    (json.dumps({**GOOD, "config": []}), "field 'config' must be a JSON object"),
])
def test_crafted_config_files_are_refused_with_one_line_and_nothing_written(tmp_path, capsys, content, message):
    file = tmp_path / "config.json"
    file.write_text(content)
    before = set(tmp_path.iterdir())
    assert main(["run", "--config", str(file), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and err.startswith("forethought: error: ")
    assert set(tmp_path.iterdir()) == before


def test_a_crafted_resume_folder_is_refused_before_anything_runs(tmp_path, capsys):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**GOOD, "config": {"episodes": 2, "epochs": 3}}))
    assert main(["run", "random", "--resume", str(folder)]) == 2
    assert "unknown field(s) ['epochs']" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]


def test_resume_takes_no_new_settings_but_may_change_the_fault_policy(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "random", "--env", "pendulum", "--episodes", "2", "--out", str(out)]) == 0
    assert main(["run", "random", "--resume", str(out), "--seed", "3"]) == 2
    assert "takes no --config, --env, --seed" in capsys.readouterr().err
    assert main(["run", "random", "--resume", str(out), "--on-fault", "skip"]) == 0


def test_a_run_killed_before_its_first_checkpoint_restarts_cleanly(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "random", "--env", "pendulum", "--episodes", "3", "--out", str(out)]) == 0
    reference = comparable(out)
    (out / "checkpoint.npz").unlink()  # as if killed after logging a row, before the checkpoint
    assert main(["run", "random", "--resume", str(out)]) == 0
    assert comparable(out) == reference


@pytest.mark.parametrize("agent", [a for a in agents.names() if a != "random"])
def test_an_unsupported_gymnasium_env_is_refused_in_one_line_before_any_folder(tmp_path, capsys, agent):
    """Blackjack has a Tuple observation space and a Discrete action space: every learning agent
    says what it needs and what the env has, and no run folder is made."""
    assert main(["run", agent, "--env", "gym:Blackjack-v1", "--episodes", "2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("forethought: error: ")
    assert ("needs" in err or "support" in err) and ("Blackjack" in err or "Discrete" in err), err
    assert not (tmp_path / "out").exists()
