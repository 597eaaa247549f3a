"""`raymoe status`: a running server's cluster, as text (or JSON), from `GET /admin/cluster`."""

from __future__ import annotations

import time

RECENT = 5


def format_status(status: dict, now: float | None = None) -> str:
    """The admin cluster document -> lines a person reads: nodes, deployments, workers, shards,
    placement epoch, and the latest scaling decisions and controller events with their reasons."""
    now = time.time() if now is None else now
    lines = [f"backend: {status.get('backend')}   model: {status.get('model')}   "
             f"placement epoch: {status.get('placement_epoch')}"]  # fmt: skip
    lines.append(f"nodes ({len(status.get('nodes', []))}):")
    lines += [f"  {n['node_id'][:12]}  {n.get('address', '')}  speed {n.get('speed', 1.0):g}" for n in status.get("nodes", [])]
    deployments = status.get("deployments") or {}
    if deployments:
        lines.append("deployments:")
        lines += [f"  {name:<8} {d.get('status', '')}  running {d.get('running', 0)}" for name, d in deployments.items()]
    lines.append(f"workers ({len(status.get('workers', []))}):")
    for w in status.get("workers", []):
        busy = f"running {w['running']}" if "running" in w else f"prompts {w.get('prompts', 0)}"
        lines.append(f"  {w.get('kind', '?'):<8} node {str(w.get('node_id', ''))[:12]}  {busy}")
    shards = (status.get("controller") or {}).get("shards", [])
    if shards:
        lines.append(f"expert shards ({len(shards)}):")
        lines += [f"  {s['name']:<10} node {s['node_id'][:12]}  experts {s['num_physical']}  speed {s['speed']:g}"
                  for s in shards]  # fmt: skip
    decisions = [d for entries in (status.get("scaling") or {}).values() for d in entries]
    if decisions:
        lines.append("recent scaling decisions:")
        for d in sorted(decisions, key=lambda d: d["time"])[-RECENT:]:
            lines.append(f"  {_ago(now, d['time'])}  {d['deployment']}: {d['from']} -> {d['to']}  ({d['reason']})")
    events = (status.get("controller") or {}).get("events", [])
    if events:
        lines.append("recent controller events:")
        for e in events[-RECENT:]:
            what = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("time", "kind"))
            lines.append(f"  {_ago(now, e.get('time', now))}  {e.get('kind')}  {what}")
    return "\n".join(lines)


def _ago(now: float, then: float) -> str:
    return f"{max(0.0, now - then):6.0f}s ago"
