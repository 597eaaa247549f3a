import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep local Ray clusters on 127.0.0.1

from checkpoints import FAMILIES, build_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """family -> path of a tiny random checkpoint, built once per test session."""
    cache = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_checkpoint(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


ALL_FAMILIES = list(FAMILIES)
