
from forethought.cli import main


def test_bench_lists_and_refuses_unknown_names(capsys):
    assert main(["bench"]) == 0
    assert main(["bench", "no-such-benchmark"]) == 2
    assert "unknown benchmark 'no-such-benchmark'" in capsys.readouterr().err
