"""`raymoe plan`'s default output: the trace, topology, plan and metrics as lines a person reads."""

from __future__ import annotations


from raymoe.policies.plan import Plan
from raymoe.policies.registry import get_policy
from raymoe.policies.topology import Topology
from raymoe.policies.traces import Trace


def format_summary(trace: Trace, topology: Topology, metrics: dict, plan: Plan) -> str:
    """Lines: what was planned, where the experts went (per node), and how it served the trace."""
    tokens = sum(s.num_tokens for s in trace.sequences)
    speeds = ",".join(f"{s:g}" for s in topology.speeds)
    lines = [
        f"trace:    {trace.name}: {len(trace.sequences)} sequences, {tokens} decode tokens, "
        f"{trace.num_layers} MoE layers, {trace.num_experts} experts, top-{trace.top_k}",
        f"topology: {topology.num_nodes} nodes x {topology.slots_per_node} expert slots per layer, speeds {speeds}",
        f"policy:   {metrics['policy']} ({get_policy(metrics['policy']).summary})",
        "",
        *_plan_lines(plan, topology),
        "",
        f"served {metrics['num_steps']} decode steps of {metrics['batch_size']} sequences "
        f"(calibrated on {metrics['calibration']}):",
        f"  local activations         {100 * metrics['local_activation_rate']:5.1f}%  "
        "token-expert pairs served on the token's own node",
        f"  slowest node / ideal      {metrics['max_over_mean']:6.3f}  p95 {metrics['max_over_mean_p95']:.3f}; "
        "1.000 = load spread exactly by speed",
        f"  makespan                  {metrics['makespan']:6.1f}  pairs per unit speed on the slowest node, "
        "per step and layer",
        f"  requests slowest / ideal  {metrics['requests_max_over_mean']:6.3f}",
        f"  plans {metrics['num_plans']}, experts moved {metrics['experts_moved']}, "
        f"requests migrated {metrics['requests_migrated']}",
        "",
        "(--json prints the plan's arrays and these metrics as one JSON object)",
    ]
    return "\n".join(lines)


def _plan_lines(plan: Plan, topology: Topology) -> list[str]:
    on_node = plan.replicas_on_node(topology.num_nodes)  # [layers, experts, nodes]
    held = (on_node > 0).sum(1).mean(0)  # [nodes] distinct experts per layer
    copies = on_node.sum(1).mean(0)  # [nodes] physical experts per layer
    replicated = float((plan.logcnt > 1).sum(1).mean())
    lines = [f"plan: {plan.num_physical} physical experts per layer for {plan.num_experts} experts; "
             f"{replicated:.1f} experts per layer have more than one copy",
             "  node  speed  experts per layer (mean)"]  # fmt: skip
    for node in range(topology.num_nodes):
        extra = copies[node] - held[node]
        note = f"  (+{extra:.1f} second copies)" if extra > 0.05 else ""
        lines.append(f"  {node:<4}  {topology.speeds[node]:<5g}  {copies[node]:5.1f}{note}")
    return lines


__all__ = ["format_summary"]
