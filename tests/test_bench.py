
from forethought.cli import main


def test_bench_lists_and_refuses_unknown_names(capsys):
    assert main(["bench"]) == 0
    assert main(["bench", "no-such-benchmark"]) == 2
    assert "unknown benchmark 'no-such-benchmark'" in capsys.readouterr().err


def test_bench_mbpo_merges_runs_from_several_processes(tmp_path, capsys):
    """`bench mbpo --merge` summarises saved runs without training anything: steps to the
    threshold per seed, on the evaluation returns with `--metric eval` (training ones beside)."""
    import json

    def saved(name, seeds, eval_shift):
        runs = [{"seed": s, "total_seconds": 1.0, "env_steps": [100, 200, 300, 400],
                 "training_returns": [0.0, 5.0, 10.0, 10.0], "returns": [0.0, 5.0, 10.0, 10.0],
                 "eval_returns": [0.0, 10.0 * eval_shift, 10.0, 10.0], "wall_seconds": [1, 2, 3, 4]}
                for s in seeds]
        path = tmp_path / f"{name}-{seeds[0]}.json"
        path.write_text(json.dumps({"agents": {name: {"config": {}, "runs": runs}}}))
        return str(path)

    files = ",".join([saved("sac", [0, 1], 0.0), saved("mbpo", [0], 1.0), saved("mbpo", [1], 1.0)])
    out = tmp_path / "out"
    out.mkdir()
    argv = ["bench", "mbpo", "--out", str(out), "--agents", "sac,mbpo", "--merge", files, "--threshold", "8",
            "--window", "1", "--eval", "1", "--metric", "eval"]
    assert main(argv) == 0
    summary = json.loads((out / "mbpo.json").read_text())
    fixed = summary["steps_to_reach"]["fixed"]["agents"]
    assert fixed["sac"]["per_seed"] == [300, 300] and fixed["mbpo"]["per_seed"] == [200, 200]
    assert fixed["mbpo"]["sac_steps_over_these"] == 1.5
    assert summary["steps_to_reach_training_returns"]["fixed"]["agents"]["mbpo"]["per_seed"] == [300, 300]
    assert (out / "mbpo.png").exists()
    capsys.readouterr()
    assert main(["bench", "mbpo", "--out", str(out), "--metric", "eval"]) == 2
    assert "--metric eval needs --eval" in capsys.readouterr().err
