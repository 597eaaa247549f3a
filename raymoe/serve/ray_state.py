"""What Ray and Serve say is running: live nodes and the application's deployments (both backends'
status and metrics read them)."""

from __future__ import annotations

import ray
from ray import serve

APP_NAME = "raymoe"


def live_nodes() -> list[dict]:
    """[{node_id, address, speed}] of every live Ray node (speed: its `raymoe_speed` resource, 1 if none)."""
    return [{"node_id": n["NodeID"], "address": n["NodeManagerAddress"], "speed": n["Resources"].get("raymoe_speed", 1.0)}
            for n in ray.nodes() if n["Alive"]]  # fmt: skip


def deployments() -> dict:
    """Deployment name -> {status, running, replica_states} from Serve's own status."""
    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:
        return {}
    if app is None:
        return {}
    out = {}
    for name, d in app.deployments.items():
        counts = d.replica_states or {}
        out[name] = {"status": str(d.status.value if hasattr(d.status, "value") else d.status),
                     "running": int(counts.get("RUNNING", 0)), "replica_states": dict(counts)}  # fmt: skip
    return out
