"""What `raymoe replay` measures in the live cluster, and what the plan evaluator predicts for the
same requests: where the decode workers' routed rows went (`DispatchCounts`, per run and per
re-plan window), rows per node, the step breakdown, and `raymoe.policies.evaluate` on the same
requests, plan, topology and re-plan steps."""

from __future__ import annotations

import numpy as np

PROMPT_TOKENS = 16  # recorded tokens each prompt replays (its routing predicts the request's experts)


COUNTS = ("pairs", "token_layers", "rows_local", "rows_process", "rows_node")


def dispatch_counts(cluster) -> list[dict]:
    """Each decode worker's cumulative dispatch counts (`raymoe.cluster.dispatch.DispatchCounts`)."""
    import ray

    stats = [s.get("dispatch", {}) for s in ray.get([w.stats.remote() for w in cluster.decode])]
    return [{"node_id": s.get("node_id", ""), **{k: s.get(k, 0) for k in COUNTS}} for s in stats]


def minus(after: dict, before: dict) -> dict:
    return {"node_id": after["node_id"], **{k: after[k] - before[k] for k in COUNTS}}


def node_rows(cluster) -> dict[str, int]:
    """node id -> expert rows run on it so far: its shards' rows plus its decode worker's in-process ones."""
    import ray

    _, shards = ray.get(cluster.controller.placement.remote())
    rows: dict[str, int] = {}
    for s in ray.get([h.stats.remote() for h in shards]):
        rows[s["node_id"]] = rows.get(s["node_id"], 0) + s["rows_served"]
    for c in dispatch_counts(cluster):
        rows[c["node_id"]] = rows.get(c["node_id"], 0) + c["rows_local"]
    return rows


def minus_rows(after: dict, before: dict) -> dict:
    return {n: r - before.get(n, 0) for n, r in after.items()}


def measure(cluster, timings: list[dict], wall_s: float, counts: list[dict], node_load: dict) -> dict:
    """The live figures: decode workers' dispatch counts over the run (where every routed row went),
    decode throughput, and max_over_mean: the busiest node's expert rows over the mean, over the
    decode phase (shards' rows and workers' in-process rows; per node, not per step)."""
    tokens = sum(t["decode_tokens"] for t in timings)
    total = {k: sum(c[k] for c in counts) for k in COUNTS}
    per_token = total["token_layers"] / max(1, len(cluster.spec.moe_layer_ids))
    load = np.array(list(node_load.values()), dtype=np.float64)
    return {
        "local_activation_rate": round(1.0 - total["rows_node"] / total["pairs"], 4) if total["pairs"] else None,
        "rows_crossing_process_per_token": round(total["rows_process"] / max(per_token, 1), 3),
        "rows_crossing_node_per_token": round(total["rows_node"] / max(per_token, 1), 3),
        "rows_in_process_per_token": round(total["rows_local"] / max(per_token, 1), 3),
        "max_over_mean": round(float(load.max() / load.mean()), 4) if load.size and load.mean() > 0 else None,
        "decode_tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
        "decode_tokens": tokens,
        "wall_s": round(wall_s, 2),
        "reseated_sequences": cluster.router.num_reseated,
        "step_breakdown_ms": step_breakdown_ms(timings),
        "per_node": [{"node_id": c["node_id"][:12],
                      "local_activation_rate": round(1.0 - c["rows_node"] / c["pairs"], 4) if c["pairs"] else None}
                     for c in counts],  # fmt: skip
    }


def step_breakdown_ms(timings: list[dict]) -> dict:
    """Mean decode step of the decode workers, ms by component (what `raymoe.sim` models)."""
    steps = sum(t["decode_steps"] for t in timings)
    keys = {"step_ms": "decode_step_s", "dispatch_ms": "dispatch_s", "expert_ms": "expert_s",
            "local_expert_ms": "local_expert_s", "combine_ms": "combine_s"}  # fmt: skip
    return {name: round(1e3 * sum(t.get(k, 0.0) for t in timings) / max(steps, 1), 2) for name, k in keys.items()}


def predicted_figures(trace, args, topology, plan, spec, sequences: np.ndarray, replan_at: list[int]) -> dict:
    """What `raymoe.policies.evaluate` predicts for the same requests (all admitted at once,
    seated from their prompt's routing), the same plan and topology, and the re-plans the live run
    had: before the same decode steps, each from the steps since the last, running requests
    re-seated as the live front does (a move must gain `RESEAT_GAIN`). Per re-plan window too."""
    from raymoe.cluster.seating import RESEAT_GAIN
    from raymoe.policies.evaluate import replay, summarize
    from raymoe.policies.traces import request_batches

    batches = request_batches(trace, sequences, PROMPT_TOKENS, args.max_tokens - 1)
    regroup = spec.replan == "regroup"
    result = replay(trace, args.policy, topology, batches=batches, plan=plan, warmup_tokens=PROMPT_TOKENS,
                    replan_at=replan_at if regroup else None, reseat_gain=RESEAT_GAIN)  # fmt: skip
    s = summarize(result, topology)
    local, pairs = result.local.sum((1, 2)), result.token_pairs.sum((1, 2))  # [steps]
    edges = [0, *replan_at, batches.num_steps] if regroup else [0, batches.num_steps]
    windows = [round(float(local[a:b].sum() / pairs[a:b].sum()), 4) for a, b in zip(edges, edges[1:]) if b > a]
    return {"plan_local_activation_rate": s["local_activation_rate"], "plan_max_over_mean": s["max_over_mean"],
            "plan_requests_migrated": s["requests_migrated"], "plan_window_local_activation_rate": windows}  # fmt: skip


def window_rates(snapshots: list[list[dict]]) -> list[float | None]:
    """Local activation rate of the decode workers between consecutive dispatch-count snapshots."""
    rates = []
    for a, b in zip(snapshots, snapshots[1:]):
        pairs = sum(y["pairs"] - x["pairs"] for x, y in zip(a, b))
        remote = sum(y["rows_node"] - x["rows_node"] for x, y in zip(a, b))
        rates.append(round(1.0 - remote / pairs, 4) if pairs else None)
    return rates
