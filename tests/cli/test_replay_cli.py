"""`raymoe replay`: bad arguments get one line on stderr and exit status 2, before any Ray starts."""

import pytest

from raymoe.cli import main
from tests.policies.tiny import write_tiny_trace


@pytest.mark.parametrize("args, message", [
    (["--nodes", "2", "--slots-per-node", "8"], "required: --trace"),
    (["--trace", "{trace}", "--nodes", "0", "--slots-per-node", "8"], "num_nodes=0"),
    (["--trace", "{trace}", "--nodes", "2", "--slots-per-node", "2"], "cannot hold 8 experts"),
    (["--trace", "{trace}", "--nodes", "2", "--slots-per-node", "8", "--policy", "best"], "invalid choice"),
    (["--trace", "{trace}", "--nodes", "2", "--slots-per-node", "8", "--speeds", "1,x"], "--speeds"),
    (["--trace", "{trace}", "--nodes", "2", "--slots-per-node", "8", "--max-tokens", "1"], "--max-tokens"),
    (["--trace", "/no/such/dir", "--nodes", "2", "--slots-per-node", "8"], "not a folder"),
])  # fmt: skip
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    write_tiny_trace(tmp_path / "trace")
    argv = ["replay"] + [a.replace("{trace}", str(tmp_path / "trace")) for a in args]
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own checks exit from the parser
        status = e.code
    assert status == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
