"""How many worker replicas the load calls for: a pure function (no Ray), used by the Serve policy.

Each signal has a per-replica target. Counted signals (queued prompt tokens, running sequences)
are summed over replicas and divided by their target; fraction signals (`*_fraction`, e.g. the
share of KV blocks in use) are averaged over replicas and scale the current count. The most
demanding signal decides, and the reason names it. Scaling down goes only as far as leaves the
remaining replicas at most 80% of their target, so a load that sits near a boundary does not make
the count flap:

    desired_replicas({"queued_prompt_tokens": 5000.0}, {"queued_prompt_tokens": 2048.0}, current=1)
    -> ScalingDecision(num_replicas=3, reason="queued_prompt_tokens 5000 over 1 replica(s) ...")
"""

from __future__ import annotations

import math
from dataclasses import dataclass


DOWNSCALE_FILL = 0.8  # scale down only to a count that the load fills at most this much (of target)


@dataclass(frozen=True)
class ScalingDecision:
    num_replicas: int
    reason: str


def signal_demand(name: str, value: float, target: float, current: int) -> float:
    """Replicas one signal asks for. value: summed over replicas, or their mean for a `*_fraction`."""
    if target <= 0:
        raise ValueError(f"target for {name} must be > 0, got {target}")
    if name.endswith("_fraction"):
        return max(current, 1) * value / target if value > 0 else 0.0
    return value / target


def desired_replicas(
    signals: dict[str, float], targets: dict[str, float], current: int, override: int | None = None
) -> ScalingDecision:
    """signals: name -> value (sum over replicas, or mean for fractions); targets: name -> per-replica
    aim; override: a count set by an operator (wins while set)."""
    if override is not None:
        return ScalingDecision(override, f"set to {override} by an operator (/admin/scale)")
    measured = {n: v for n, v in signals.items() if n in targets}
    if not measured:
        return ScalingDecision(current, "no load reported yet: keep the current count")
    demands = {n: signal_demand(n, v, targets[n], current) for n, v in measured.items()}
    name = max(demands, key=lambda n: demands[n])
    wanted = math.ceil(demands[name] - 1e-9)
    shown = f"{measured[name]:.2f}" if name.endswith("_fraction") else f"{measured[name]:.0f}"
    reason = f"{name} {shown} over {current} replica(s), target {targets[name]:g} per replica -> {wanted}"
    if wanted < current:  # hysteresis: the smaller count must leave headroom, or the count flaps
        kept = min(current, math.ceil(demands[name] / DOWNSCALE_FILL - 1e-9))
        if kept > wanted:
            return ScalingDecision(kept, f"{reason}, kept at {kept}: fewer would run over {DOWNSCALE_FILL:.0%} of target")
    return ScalingDecision(wanted, reason)
