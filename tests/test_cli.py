import json
import os
import signal
import subprocess
import sys
import time

import pytest

from forethought.cli import main
from forethought.experiment.run import read_metrics

CLI = [sys.executable, "-m", "forethought.cli"]


def run_cli(*args, **kwargs):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, **kwargs)


def test_random_agent_writes_a_complete_run_folder(tmp_path):
    out = tmp_path / "run"
    result = run_cli("run", "random", "--env", "pendulum", "--episodes", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.npz", "config.json", "events.jsonl", "final_episode.gif", "learning_curve.png",
        "metrics.csv"]
    metrics = read_metrics(out)
    assert metrics["episode"] == [0, 1, 2] and metrics["env_steps"] == [100, 200, 300]
    config = json.loads((out / "config.json").read_text())
    assert config["agent"] == "random" and config["config"] == {"episodes": 3}
    events = [json.loads(line)["event"] for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "finish"
    assert "\x1b[" not in result.stderr  # no progress bar when not on a terminal


@pytest.mark.parametrize("args,message", [
    (["run", "random", "--env", "pendulm"], "unknown env 'pendulm'"),
    (["run", "rand"], "unknown agent 'rand'"),
    (["run", "random", "--episodes", "abc"], "--episodes"),
    (["run", "random", "--episodes", "0"], "episodes must be >= 1, got 0"),
    (["run", "random", "--bogus", "1"], "--bogus"),
    (["run", "random", "--seed", "x"], "--seed"),
    (["run", "random", "--env", "maze"], "needs a layout"),
    (["run", "random", "--env", "maze", "--env-layout", "/no/such/file"], "cannot read"),
    (["plot", "/no/such/run"], "not a run folder"),
    (["frobnicate"], "invalid choice"),
    (["run"], "missing AGENT"),
])
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, args, message):
    before = set(tmp_path.iterdir())
    code = main(args + (["--out", str(tmp_path / "out")] if args[0] == "run" and len(args) > 1 else []))
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("forethought: error: ")
    assert set(tmp_path.iterdir()) == before  # nothing half-written


def test_a_bad_maze_layout_is_a_user_error(tmp_path, capsys):
    layout = tmp_path / "maze.txt"
    layout.write_text("S..\n.#X\n..G\n")
    assert main(["run", "random", "--env", "maze", "--env-layout", str(layout),
                 "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    assert "X" in capsys.readouterr().err


def test_a_maze_from_a_layout_file_runs(tmp_path):
    layout = tmp_path / "maze.txt"
    layout.write_text("S.#.\n...G\n")
    result = run_cli("run", "random", "--env", "maze", "--env-layout", str(layout), "--episodes", "2",
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert len(read_metrics(tmp_path / "out")["return"]) == 2


def test_list_names_systems_and_agents(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("pendulum", "cartpole", "acrobot", "dyna-maze", "random"):
        assert name in out


def test_help_documents_the_agent_flags(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["run", "random", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--episodes" in out and "Number of episodes" in out and "--resume" in out


def test_a_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path):
    """SIGKILL mid-run loses at most the episode in progress; the resumed run is identical."""
    episodes = "60"
    full = tmp_path / "full"
    assert run_cli("run", "random", "--env", "cartpole", "--episodes", episodes, "--seed", "3",
                   "--out", str(full)).returncode == 0

    killed = tmp_path / "killed"
    process = subprocess.Popen([*CLI, "run", "random", "--env", "cartpole", "--episodes", episodes,
                                "--seed", "3", "--out", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (killed / "metrics.csv").exists() and len((killed / "metrics.csv").read_text().splitlines()) > 5:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(read_metrics(killed)["episode"])
    assert 4 <= done_before < int(episodes), "the kill should land mid-run"

    result = run_cli("run", "random", "--resume", str(killed))
    assert result.returncode == 0, result.stderr
    resumed, reference = read_metrics(killed), read_metrics(full)
    assert resumed["episode"] == reference["episode"]
    assert resumed["return"] == reference["return"]
    assert resumed["env_steps"] == reference["env_steps"]
    assert (killed / "learning_curve.png").exists()


def test_resume_refuses_another_agents_folder(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps({"agent": "pets", "env": "pendulum", "seed": 0, "config": {}}))
    assert main(["run", "random", "--resume", str(tmp_path / "r")]) == 2
    assert "agent 'pets'" in capsys.readouterr().err


def test_plan_solves_the_acrobot_and_writes_its_pictures(tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["plan", "ilqr", "--system", "acrobot", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] < 51.0 and summary["horizon"] == 50
    for name in ("solution.npz", "trajectory.png", "cost.png", "system.gif"):
        assert (out / name).stat().st_size > 0
    assert "objective" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["plan", "lqg"], "unknown planning method 'lqg'"),
    (["plan", "ilqr", "--system", "dyna-maze"], "continuous system"),
    (["plan", "ilqr", "--system", "pendulm"], "unknown system"),
])
def test_plan_errors(tmp_path, capsys, args, message):
    assert main(args + ["--out", str(tmp_path / "p")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


# ----- several seeds in one command --------------------------------------------------------------

SMALL_PETS = ["--episodes", "2", "--horizon", "5", "--population", "16", "--iterations", "2", "--particles", "2",
              "--members", "2", "--hidden", "16", "--layers", "1", "--batch-size", "32", "--max-epochs", "3"]


def comparable(path):
    return {k: v for k, v in read_metrics(path).items() if "seconds" not in k}


def test_seeds_run_as_one_vectorized_program_with_a_folder_each_and_an_aggregate_plot(tmp_path, capsys):
    """`run pets --seeds 0-2`: a folder per seed, each equal to that seed's own run up to float
    reassociation, and their mean curve; repeating the command finds them finished."""
    import numpy as np

    out = tmp_path / "seeds"
    args = ["run", "pets", "--env", "double-integrator", "--seeds", "0-2", "--no-gif", "--out", str(out), *SMALL_PETS]
    assert main(args) == 0
    assert "3 seed(s) as one vectorized program" in capsys.readouterr().err
    assert (out / "learning_curve.png").is_file()
    for seed in (0, 1, 2):
        assert json.loads((out / f"seed-{seed}" / "config.json").read_text())["seed"] == seed
        assert read_metrics(out / f"seed-{seed}")["episode"] == [0, 1]
    alone = tmp_path / "alone"
    assert main(["run", "pets", "--env", "double-integrator", "--seed", "1", "--no-gif", "--out", str(alone),
                 *SMALL_PETS]) == 0
    vectorized, separate = comparable(out / "seed-1"), comparable(alone)
    assert vectorized.keys() == separate.keys()
    for column in vectorized:
        np.testing.assert_allclose(vectorized[column], separate[column], rtol=1e-4)
    before = comparable(out / "seed-2")
    assert main(args) == 0  # continued: already finished, nothing is lost or repeated
    np.testing.assert_equal(comparable(out / "seed-2"), before)


def test_seeds_of_an_agent_without_a_vectorized_form_run_one_after_another(tmp_path, capsys):
    out = tmp_path / "seeds"
    flags = ["--env", "dyna-maze", "--episodes", "3", "--planning-steps", "5", "--no-gif"]
    assert main(["run", "dyna-q", *flags, "--seeds", "0,1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "2 seed(s):" in err and "vectorized" not in err.split("2 seed(s)")[1]
    assert main(["run", "dyna-q", *flags, "--seed", "1", "--out", str(tmp_path / "alone")]) == 0
    assert comparable(out / "seed-1") == comparable(tmp_path / "alone")
    assert comparable(out / "seed-0") != comparable(out / "seed-1")
    assert (out / "learning_curve.png").is_file()


def test_seeds_refuse_seed_and_resume(tmp_path, capsys):
    assert main(["run", "dyna-q", "--seeds", "0,1", "--seed", "3", "--out", str(tmp_path / "x")]) == 2
    assert "--seeds takes no --seed or --resume" in capsys.readouterr().err
    assert main(["run", "dyna-q", "--seeds", "1-0", "--out", str(tmp_path / "y")]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
