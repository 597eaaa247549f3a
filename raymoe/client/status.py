"""`raymoe status`: a running server's cluster, as text (or JSON), from `GET /admin/cluster`."""

from __future__ import annotations

import time

RECENT = 5


def format_status(status: dict, now: float | None = None) -> str:
    """The admin cluster document -> lines a person reads: nodes, deployments, workers, shards,
    placement epoch, where expert rows went per node, and the latest scaling decisions and
    controller events with their reasons."""
    now = time.time() if now is None else now
    epoch = status.get("placement_epoch")
    placement = f"placement epoch: {epoch}" if epoch is not None else "placement: none (one engine holds every expert)"
    lines = [f"backend: {status.get('backend')}   model: {status.get('model')}   {placement}"]
    if status.get("model_path") and status["model_path"] != status.get("model"):
        lines.append(f"model path: {status['model_path']}")
    lines.append(f"nodes ({len(status.get('nodes', []))}):")
    lines += [f"  {n['node_id'][:12]}  {n.get('address', '')}  speed {n.get('speed', 1.0):g}" for n in status.get("nodes", [])]
    deployments = status.get("deployments") or {}
    if deployments:
        lines.append("deployments:")
        lines += [f"  {name:<8} {d.get('status', '')}  running {d.get('running', 0)}" for name, d in deployments.items()]
    lines.append(f"workers ({len(status.get('workers', []))}):")
    for w in status.get("workers", []):
        lines.append(f"  {w.get('kind', '?'):<8} node {str(w.get('node_id', ''))[:12]}  {_busy(w)}")
    shards = (status.get("controller") or {}).get("shards", [])
    if shards:
        lines.append(f"expert shards ({len(shards)}):")
        lines += [f"  {s['name']:<10} node {s['node_id'][:12]}  experts {s['num_physical']}  speed {s['speed']:g}"
                  for s in shards]  # fmt: skip
    dispatch = (status.get("controller") or {}).get("dispatch", {})
    if dispatch:
        lines.append("expert rows per node (decode workers; per token):")
        for node, d in dispatch.items():
            lines.append(f"  {node[:12]}  local activation {_num(d.get('local_activation_rate'))}  "
                         f"crossing process {_num(d.get('rows_crossing_process_per_token'))}  "
                         f"crossing node {_num(d.get('rows_crossing_node_per_token'))}")  # fmt: skip
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


def _busy(worker: dict) -> str:
    """What a worker is doing: an engine's running and finished requests, a decode worker's running
    sequences, a prefill worker's prompts."""
    if worker.get("kind") == "engine":
        return (f"running {worker.get('num_running', 0)}  finished {worker.get('num_finished', 0)}  "
                f"rejected {worker.get('num_rejected', 0)}  generated tokens {worker.get('num_generated_tokens', 0)}"
                f"{_drafts(worker)}")
    if "running" in worker:
        return f"running {worker['running']}{_drafts(worker)}"
    return f"prompts {worker.get('prompts', 0)}"


def _drafts(worker: dict) -> str:
    """Speculative decoding's acceptance on a worker that verified drafts."""
    spec = worker.get("speculative") or {}
    if not spec.get("num_verify_steps"):
        return ""
    return (f"  {spec.get('method', 'drafts')}: acceptance {spec['acceptance_rate']:.2f}, "
            f"{spec['mean_accepted_tokens']:.2f} tokens/step")


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ago(now: float, then: float) -> str:
    return f"{max(0.0, now - then):6.0f}s ago"
