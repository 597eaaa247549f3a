"""Trace-driven step-time model: replay routing under a policy, then price each decode step.

Per MoE layer and node (a roofline: the larger of compute time and memory time):
  attention: the node's own requests; projection weights read once, KV read per token;
      a shared expert, where the model has one, runs here too (it needs no dispatch).
  dispatch / combine: each token-expert pair served off its token's node sends the hidden
      state there and back; a node's time is its larger direction over its link, plus
      latency (pairs, not deduplicated per node: an upper bound).
  experts: the pairs the node serves; every physical expert with work reads its weights.
A layer takes the slowest node's attention, then dispatch, the slowest node's experts and
combine; with microbatches the two halves overlap (`policies.microbatch`). Dense layers and
the LM head add node-local time. Everything is per decode step of `batch_size` tokens.
"""

from __future__ import annotations

import numpy as np

from raymoe.errors import RaymoeError
from raymoe.policies.evaluate import Replay, replay, summarize
from raymoe.policies.microbatch import choose_microbatches, pipelined_time
from raymoe.policies.topology import Topology
from raymoe.policies.traces import Trace
from raymoe.sim.cluster import NodeSpec
from raymoe.sim.models import ModelSpec


class SimulationError(RaymoeError, ValueError):
    """A trace and model that do not fit together; the message says what to change."""


def _roofline(flops, bytes_, node: NodeSpec, speeds):
    return np.maximum(flops / (node.flops * speeds), bytes_ / (node.memory_bandwidth * speeds))


def attention_times(
    tokens: np.ndarray, model: ModelSpec, node: NodeSpec, speeds: np.ndarray, context_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """(total, weight-read part) seconds per node `[steps, nodes]`; tokens: `[steps, nodes]`."""
    shared = model.num_shared_experts * model.expert_params
    weights = (model.attention_params + shared) * model.weight_bytes
    flops = tokens * (2.0 * (model.attention_params + shared) + 4.0 * model.hidden_size * context_tokens)
    bytes_ = np.where(tokens > 0, weights, 0) + tokens * context_tokens * model.kv_bytes_per_token
    total = _roofline(flops, bytes_, node, speeds)
    weight_time = np.where(tokens > 0, weights, 0) / (node.memory_bandwidth * speeds)
    return total, np.minimum(total, weight_time)


def expert_times(
    result: Replay, model: ModelSpec, node: NodeSpec, speeds: np.ndarray, num_nodes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(total, weight-read part) seconds per node `[steps, layers, nodes]`."""
    held = np.stack([p.replicas_on_node(num_nodes) for p in result.plans])  # [P, L, E, N]
    is_busy = result.expert_pairs > 0  # [T, L, E]
    active = np.einsum("tle,tlen->tln", is_busy.astype(np.float64), held[result.plan_of_step].astype(np.float64))
    weights = active * model.expert_bytes
    total = _roofline(result.node_load * 2.0 * model.expert_params, weights, node, speeds)
    return total, np.minimum(total, weights / (node.memory_bandwidth * speeds))


def network_times(result: Replay, model: ModelSpec, node: NodeSpec) -> tuple[np.ndarray, np.ndarray]:
    """(seconds per dispatch `[steps, layers]`, bytes each way `[steps, layers]`)."""
    sent = result.token_pairs - result.local  # [T, L, N] pairs leaving each node
    received = result.node_load - result.local
    busiest = np.maximum(sent, received).max(-1) * model.token_bytes
    has_traffic = sent.sum(-1) > 0
    seconds = np.where(has_traffic, node.network_latency_s, 0.0) + busiest / node.network_bandwidth
    return seconds, sent.sum(-1) * model.token_bytes


def dense_and_head_time(
    tokens: np.ndarray, model: ModelSpec, node: NodeSpec, speeds: np.ndarray, context_tokens: int
) -> np.ndarray:
    """Seconds per step `[steps]` of the dense layers and the LM head (slowest node)."""
    num_dense = model.num_layers - model.num_moe_layers
    ffn = 3 * model.hidden_size * model.dense_intermediate
    head = model.hidden_size * model.vocab_size
    attention, _ = attention_times(tokens, model, node, speeds, context_tokens)
    dense = _roofline(tokens * 2.0 * ffn, np.where(tokens > 0, ffn * model.weight_bytes, 0), node, speeds)
    lm_head = _roofline(tokens * 2.0 * head, np.where(tokens > 0, head * model.weight_bytes, 0), node, speeds)
    return (num_dense * (attention + dense) + lm_head).max(-1)


def step_breakdown(
    result: Replay,
    model: ModelSpec,
    node: NodeSpec,
    topology: Topology,
    context_tokens: int = 1024,
    microbatches: int | str = 1,
) -> dict:
    """Modelled seconds per decode step, by stage, for a replay."""
    speeds = topology.speed_array
    tokens = np.stack([np.bincount(r, minlength=topology.num_nodes) for r in result.token_node])
    attn, attn_fixed = attention_times(tokens, model, node, speeds, context_tokens)  # [T, N]
    expert, expert_fixed = expert_times(result, model, node, speeds, topology.num_nodes)
    network, wire_bytes = network_times(result, model, node)  # [T, L]
    a = np.broadcast_to(attn.max(-1)[:, None], network.shape)  # [T, L]
    a_fixed = np.broadcast_to(attn_fixed.max(-1)[:, None], network.shape)
    e, e_fixed = (
        2 * network + expert.max(-1),
        expert_fixed.max(-1) + 2 * np.where(network > 0, node.network_latency_s, 0.0),
    )
    if microbatches == "auto":
        microbatches = choose_microbatches(
            float((a - a_fixed).mean()),
            float((e - e_fixed).mean()),
            tokens.sum(1).min(),
            attention_fixed_s=float(a_fixed.mean()),
            expert_fixed_s=float(e_fixed.mean()),
        )
    layer = np.vectorize(pipelined_time)(a - a_fixed, e - e_fixed, microbatches, a_fixed, e_fixed)
    other = dense_and_head_time(tokens, model, node, speeds, context_tokens)
    step = layer.sum(1) + other
    return {
        "step_s": float(step.mean()),
        "tokens_per_second": float(tokens.sum(1).mean() / step.mean()),
        "attention_s": float(a.sum(1).mean()),
        "dispatch_s": float(network.sum(1).mean()),
        "expert_s": float(expert.max(-1).sum(1).mean()),
        "combine_s": float(network.sum(1).mean()),
        "dense_and_head_s": float(other.mean()),
        "cross_node_bytes": float(2 * wire_bytes.sum(1).mean()),  # dispatch + combine
        "microbatches": int(microbatches),
    }


def simulate(
    trace: Trace,
    policy: str,
    topology: Topology,
    model: ModelSpec,
    node: NodeSpec,
    *,
    context_tokens: int = 1024,
    microbatches: int | str = 1,
    **replay_kwargs,
) -> dict:
    """Replay `trace` under `policy` and model each decode step's time on the cluster."""
    if trace.num_layers != model.num_moe_layers or trace.num_experts != model.num_experts:
        raise SimulationError(
            f"trace has {trace.num_layers} layers x {trace.num_experts} experts but "
            f"{model.name} has {model.num_moe_layers} x {model.num_experts}: use a trace of "
            "that model, or raymoe.sim.lift.lift_trace to map one onto it"
        )
    result = replay(trace, policy, topology, **replay_kwargs)
    out = {
        "policy": policy,
        "model": model.name,
        "num_nodes": topology.num_nodes,
        "batch_size": replay_kwargs.get("batch_size", 128),
    }
    out.update(step_breakdown(result, model, node, topology, context_tokens, microbatches))
    out.update(
        {
            k: v
            for k, v in summarize(result, topology).items()
            if k in ("local_activation_rate", "max_over_mean", "experts_moved")
        }
    )
    return out


def step_time_error(modelled: dict, measured: dict) -> dict:
    """Relative error of a modelled step breakdown against one measured on a real cluster.

    Both map stage names (`step_s`, `attention_s`, `dispatch_s`, `expert_s`, `combine_s`,
    ...) to seconds; stages in both are compared. Returns `{stage: (modelled - measured) /
    measured}` and `max_abs`, the largest magnitude among them.
    """
    shared = [k for k in measured if k in modelled and isinstance(measured[k], (int, float))]
    if not shared:
        raise SimulationError(
            "no stage appears in both breakdowns: use the keys of step_breakdown(), e.g. step_s, attention_s, expert_s"
        )
    errors = {}
    for key in shared:
        if measured[key] <= 0:
            raise SimulationError(f"measured {key}={measured[key]!r}: give a time > 0")
        errors[key] = (modelled[key] - measured[key]) / measured[key]
    errors["max_abs"] = max(abs(v) for v in errors.values())
    return errors
