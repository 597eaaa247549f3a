"""raymoe's log output and progress bars.

`configure(level)`: raymoe's loggers to stderr (the CLI calls it; `--log-level`).
`progress(items, desc)`: a tqdm bar on stderr when stderr is a terminal; inside a Ray worker, Ray's
own progress bars (`ray.experimental.tqdm_ray`, drawn by the driver); silent otherwise (logs, tests).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVEL_ENV = "RAYMOE_LOG_LEVEL"  # the level Ray actors log at (default: info)
MIN_BAR = 16  # shorter loops draw no progress bar


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test's captured stderr, then the real one)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure(level: str = "info") -> None:
    """Send the `raymoe` loggers' records at `level` and above to stderr, with time and source."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
    root = logging.getLogger("raymoe")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def configure_actor() -> None:
    """In a Ray actor: raymoe's records at RAYMOE_LOG_LEVEL (default info) to the worker's stderr,
    which Ray shows on the driver (or in its worker log files)."""
    if not logging.getLogger("raymoe").handlers:
        configure(os.environ.get(LEVEL_ENV, "info"))


def progress(items: Iterable | None, desc: str, total: int | None = None, unit: str = "it"):
    """`items`, drawing a progress bar where someone can see it (items None: a bar to `update(n)`).
    Fewer than MIN_BAR items get no bar."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    if items is not None and total is not None and total < MIN_BAR:
        return items
    if _in_ray_worker():
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        bar = ray_tqdm(items, desc=desc, total=total, unit=unit)
        return bar if items is None else _closing(bar)
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, disable=None, leave=False, file=sys.stderr)


def _closing(bar):
    """Iterate a Ray progress bar, closing it at the end (Ray's does not close itself)."""
    try:
        yield from bar
    finally:
        bar.close()


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().worker.mode == ray._private.worker.WORKER_MODE
