import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_harness  # noqa: E402


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The running `raymoe serve` (shared with tests/client)."""
    yield serve_harness.acquire(tmp_path_factory.mktemp("serve"))
    serve_harness.release()


@pytest.fixture
def headers():
    return {"Authorization": f"Bearer {serve_harness.API_KEY}"}
