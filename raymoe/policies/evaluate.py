"""Judge a policy on a trace: replay decode batches over a topology and measure.

Metrics, each over every (decode step, MoE layer), since each layer's dispatch is a
synchronisation point of its own:
  local_activation_rate: share of token-expert pairs served on the token's own node.
  cross_node_share: share of pairs dispatched to another node (1 - local rate).
  max_over_mean: speed-weighted node load max / mean, i.e. the slowest node's finish time
      over the finish time of a perfect spread; mean over steps and layers, and p95.
  makespan: the slowest node's finish time, in pairs per unit of speed (comparable
      between policies on one topology and batch size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raymoe.policies.dispatch import layer_loads
from raymoe.policies.plan import Plan
from raymoe.policies.registry import get_policy
from raymoe.policies.replan import align, incremental_plan
from raymoe.policies.stats import Calibration
from raymoe.policies.token_placement import (
    RequestPlacer,
    RequestProfile,
    node_affinity,
    request_profiles,
)
from raymoe.policies.topology import Topology
from raymoe.policies.traces import DecodeBatches, Trace, decode_batches


@dataclass
class Replay:
    """What happened at each step. Shapes: `[steps, layers, nodes]` unless noted."""

    node_load: np.ndarray  # pairs each node served
    local: np.ndarray  # pairs each node served for its own tokens
    token_pairs: np.ndarray  # pairs whose token runs on each node
    token_node: np.ndarray  # [steps, batch]
    plans: list[Plan]
    plan_of_step: np.ndarray  # [steps] index into plans
    num_migrations: int = 0  # running requests moved to another node by re-plans
    expert_pairs: np.ndarray | None = None  # [steps, layers, experts] pairs per expert


def replay(trace: Trace, policy: str, topology: Topology, *, calibration: Trace | None = None,
           batch_size: int = 128, num_steps: int | None = None, seed: int = 0,
           replan_every: int | None = None, warmup_tokens: int = 8, cap_slack: float = 0.1,
           request_profile: RequestProfile = "history", options: dict | None = None,
           batches: DecodeBatches | None = None, plan: Plan | None = None,
           replan_at: list[int] | None = None, reseat_gain: float = 0.0) -> Replay:
    """Serve `trace` under `policy`, planned from `calibration` (default: the trace itself).

    replan_every: re-plan every that many steps from the steps just served (what a
    controller sees), as the policy's spec says (full or incremental); replan_at: re-plan
    before exactly these steps instead (e.g. the schedule a live run had), each from the
    steps since the previous re-plan.
    reseat_gain: a running request re-seated after a re-plan keeps its seat unless the new
    one raises its predicted local share by more than this (`reseat_requests`, as live).
    request_profile: what token placement predicts a request's experts from, its routing
    so far ("history") or its first `warmup_tokens` tokens only ("warmup").
    batches: the decode steps to serve (default: `decode_batches` of the trace, steady state);
    plan: the plan to start from (default: the policy's, from the calibration).
    """
    spec, options = get_policy(policy), options or {}
    calib = Calibration.from_trace(calibration if calibration is not None else trace)
    if batches is None:
        batches = decode_batches(trace, batch_size, num_steps, seed)
    plans = [plan if plan is not None else spec.build(calib, topology, **options)]
    plan_of_step = np.zeros(batches.num_steps, dtype=np.int64)
    replicas = plans[-1].replicas_on_node(topology.num_nodes)  # [L, E, N]
    profiles = (request_profiles(trace, batches, request_profile, warmup_tokens)
                if spec.is_token_placement else None)
    placer = RequestPlacer(batches, topology.speed_array, warmup_tokens, cap_slack)
    token_node, records = np.empty_like(batches.request), []
    num_migrations, demand = 0, 0.0  # demand: [L, E, N] pairs by token node, this window
    schedule = set(replan_at) if replan_at is not None else set(
        range(replan_every, batches.num_steps, replan_every) if replan_every else ())
    last = 0
    for t in range(batches.num_steps):
        if t in schedule and t > last:
            plans.append(_replan(spec, plans[-1], batches, slice(last, t), demand, topology,
                                 options, placer))
            replicas, demand, last = plans[-1].replicas_on_node(topology.num_nodes), 0.0, t
            if spec.replan == "regroup":
                num_migrations += placer.reseat(t - 1, _affinity_fn(profiles, replicas),
                                                reseat_gain)
        plan_of_step[t] = len(plans) - 1
        affinity = _affinity_fn(profiles, replicas) if profiles is not None else None
        token_node[t] = placer.step(t, affinity)
        *record, pairs = _step_loads(batches.experts[t], token_node[t], replicas, topology,
                                     spec.dispatch)
        records.append(record + [pairs.sum(-1)])
        demand = demand + pairs
    node_load, local, token_pairs, expert_pairs = (
        np.stack([r[i] for r in records]) for i in range(4))
    return Replay(node_load, local, token_pairs, token_node, plans, plan_of_step, num_migrations,
                  expert_pairs)


def _affinity_fn(profiles, replicas):
    return lambda requests, step: node_affinity(profiles(requests, step), replicas)


def _replan(spec, current, batches, window, demand, topology, options, placer):
    if spec.replan == "incremental":
        return incremental_plan(current, demand, topology)
    recent = Calibration.from_window(batches.experts[window], batches.request[window],
                                     current.num_experts)
    if spec.replan == "regroup":
        recent.request_node = placer.state.node[recent.request_ids]
        return spec.build(recent, topology, **options)  # nodes keep identity through init
    return align(current, spec.build(recent, topology, **options), topology)


def _step_loads(experts, token_node, replicas, topology, mode):
    """One step's loads. experts: `[batch, layers, k]`; token_node: `[batch]`;
    replicas: `[layers, experts, nodes]`."""
    num_layers, num_experts, num_nodes = replicas.shape
    layer = np.arange(num_layers)[None, :, None]
    cell = (layer * num_experts + experts) * num_nodes + token_node[:, None, None]
    pairs = np.bincount(cell.ravel(), minlength=num_layers * num_experts * num_nodes)
    pairs = pairs.reshape(num_layers, num_experts, num_nodes).astype(np.float64)
    out = [layer_loads(pairs[i], replicas[i], topology.speed_array, mode)
           for i in range(num_layers)]
    loads, local = (np.stack(x) for x in zip(*out))
    return loads, local, pairs.sum(1), pairs


def summarize(result: Replay, topology: Topology) -> dict:
    """Metrics of a replay, as plain floats."""
    speeds = topology.speed_array
    finish = result.node_load / speeds  # [steps, layers, nodes]
    ideal = result.node_load.sum(-1) / speeds.sum()  # [steps, layers]
    ratio = finish.max(-1) / np.maximum(ideal, 1e-12)
    local = float(result.local.sum() / result.token_pairs.sum())
    requests = np.stack([np.bincount(r, minlength=topology.num_nodes) for r in result.token_node])
    request_ratio = (requests / speeds).max(1) / (requests.sum(1) / speeds.sum())
    return {
        "local_activation_rate": round(local, 4),
        "cross_node_share": round(1.0 - local, 4),
        "max_over_mean": round(float(ratio.mean()), 4),
        "max_over_mean_p95": round(float(np.percentile(ratio, 95)), 4),
        "makespan": round(float(finish.max(-1).mean()), 3),
        "requests_max_over_mean": round(float(request_ratio.mean()), 4),
        "num_plans": len(result.plans),
        "experts_moved": experts_moved(result.plans, topology.num_nodes),
        "requests_migrated": result.num_migrations,
    }


def experts_moved(plans: list[Plan], num_nodes: int) -> int:
    """Expert copies loaded onto a node over all re-plans (weights that had to travel)."""
    moved = 0
    for before, after in zip(plans, plans[1:]):
        gained = after.replicas_on_node(num_nodes) - before.replicas_on_node(num_nodes)
        moved += int(np.maximum(gained, 0).sum())
    return moved


def evaluate(trace: Trace, policy: str, topology: Topology, **kwargs) -> dict:
    """Metrics of `policy` serving `trace` on `topology`; keyword arguments as `replay`."""
    result = replay(trace, policy, topology, **kwargs)
    calibration = kwargs.get("calibration")
    return {
        "policy": policy,
        "trace": trace.name,
        "calibration": calibration.name if calibration is not None else trace.name,
        "batch_size": kwargs.get("batch_size", 128),
        "num_steps": int(result.token_node.shape[0]),
        **summarize(result, topology),
    }
