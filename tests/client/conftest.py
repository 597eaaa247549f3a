import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
import serve_harness  # noqa: E402


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The running `raymoe serve` (shared with tests/serve)."""
    yield serve_harness.acquire(tmp_path_factory.mktemp("serve"))
    exit_code = serve_harness.release()
    assert exit_code in (None, 0), f"raymoe serve did not exit cleanly on Ctrl-C (exit code {exit_code})"
