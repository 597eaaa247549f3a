import json
import subprocess
import sys
from pathlib import Path

from raymoe.policies.cli import plan_main
from tests.policies.tiny import tiny_trace, write_npz

REPO = Path(__file__).resolve().parents[2]


def trace_dir(tmp_path):
    for i, seq in enumerate(tiny_trace().sequences):
        write_npz(tmp_path, i, seq.experts, seq.token_ids)
    return tmp_path


def test_plan_prints_plan_and_metrics(tmp_path, capsys):
    folder = trace_dir(tmp_path)
    assert plan_main(["--trace", str(folder), "--nodes", "2", "--slots-per-node", "5",
                      "--speeds", "1,2", "--batch-size", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["topology"] == {"num_nodes": 2, "slots_per_node": 5, "speeds": [1.0, 2.0]}
    assert len(out["plan"]["phy2log"]) == 2 and len(out["plan"]["phy2log"][0]) == 10
    assert out["metrics"]["policy"] == "replication"


def test_speed_zero_exits_2_with_the_fix(tmp_path, capsys):
    folder = trace_dir(tmp_path)
    assert plan_main(["--trace", str(folder), "--nodes", "2", "--slots-per-node", "5",
                      "--speeds", "1,0"]) == 2
    assert "node 1 has speed 0.0" in capsys.readouterr().err


def test_runs_as_module(tmp_path):
    folder = trace_dir(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "raymoe.policies.cli", "--trace", str(folder), "--nodes", "2",
         "--slots-per-node", "4", "--policy", "contiguous", "--no-plan", "--batch-size", "2", "--json"],
        cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["metrics"]["policy"] == "contiguous"
