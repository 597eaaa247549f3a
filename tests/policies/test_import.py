import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_policies_and_sim_import_neither_ray_nor_torch():
    code = ("import sys, raymoe.policies, raymoe.policies.cli, raymoe.sim; "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"
