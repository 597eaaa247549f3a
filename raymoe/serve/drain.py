"""Draining on shutdown, across every replica of the app.

`raymoe serve`, on SIGTERM or SIGINT, sets a mark in Ray's internal key-value store (`start_draining`).
Each ingress replica reads it at most every CHECK_S (`DrainMark.is_set`): from then on new
generation requests get 503 with Retry-After and /health answers 503 (load balancers stop sending),
while the requests already admitted run to their end. `wait_idle` waits for the backend to have
none left, or for the grace period to end; then the app and Ray stop.
"""

from __future__ import annotations

import time

KEY, NAMESPACE = b"draining", b"raymoe"
CHECK_S = 0.25


def start_draining() -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(KEY, b"1", namespace=NAMESPACE)


def clear() -> None:
    """A fresh app on a joined cluster must not inherit an old mark."""
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(KEY, namespace=NAMESPACE)


class DrainMark:
    """An ingress replica's view of the mark, read at most every CHECK_S (a GCS round trip)."""

    def __init__(self):
        self._checked, self._set = 0.0, False

    def is_set(self) -> bool:
        from ray.experimental.internal_kv import _internal_kv_get

        now = time.monotonic()
        if not self._set and now - self._checked > CHECK_S:
            self._checked = now
            self._set = _internal_kv_get(KEY, namespace=NAMESPACE) is not None
        return self._set


def wait_idle(backend, deadline: float, cut_short) -> bool:
    """Wait until the backend (a deployment handle) has no admitted request, the monotonic deadline
    passes, or cut_short() is true. True: idle."""
    time.sleep(2 * CHECK_S)  # every ingress has seen the mark: nothing new gets admitted
    while time.monotonic() < deadline and not cut_short():
        if backend.stats.remote().result(timeout_s=10)["num_admitted"] == 0:
            return True
        time.sleep(0.2)
    return False
