"""raymoe's Serve autoscaling policy for the prefill and decode deployments, and its records.

Serve calls `WorkerScaling(deployment, targets)(ctx)` in its controller every control period with
the replicas' own load reports (`record_autoscaling_stats`: prefill replicas report queued prompt
tokens, decode replicas running sequences and the share of KV blocks in use). The decision itself
is the pure `raymoe.policies.scaling.desired_replicas`; Serve's wrapper then applies the configured
min/max bounds and up/down-scale delays.

Operators pin a count with `/admin/scale` (an override kept in Ray's internal KV store, which the
policy reads); every change of the wanted count is appended, with its reason, to a short log in
the same store that `/admin/cluster` and `raymoe status` show.
"""

from __future__ import annotations

import json
import logging
import time

from raymoe.policies.scaling import desired_replicas

logger = logging.getLogger(__name__)
KV_NAMESPACE = "raymoe"
MAX_DECISIONS = 50
PREFILL_SIGNALS = ("queued_prompt_tokens",)
DECODE_SIGNALS = ("running_sequences", "kv_block_fraction")


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def set_override(deployment: str, num_replicas: int | None) -> None:
    """Pin `deployment` to `num_replicas` (None: back to the autoscaler)."""
    key = f"scale_override/{deployment}"
    if num_replicas is None:
        _kv()._internal_kv_del(key, namespace=KV_NAMESPACE)
    else:
        _kv()._internal_kv_put(key, str(int(num_replicas)), namespace=KV_NAMESPACE)


def get_override(deployment: str) -> int | None:
    value = _kv()._internal_kv_get(f"scale_override/{deployment}", namespace=KV_NAMESPACE)
    return None if value is None else int(value)


def record_decision(deployment: str, entry: dict) -> None:
    key = f"scale_decisions/{deployment}"
    log = recent_decisions(deployment) + [entry]
    _kv()._internal_kv_put(key, json.dumps(log[-MAX_DECISIONS:]), namespace=KV_NAMESPACE)


def recent_decisions(deployment: str) -> list[dict]:
    value = _kv()._internal_kv_get(f"scale_decisions/{deployment}", namespace=KV_NAMESPACE)
    return [] if value is None else json.loads(value)


def load_signals(aggregated: dict | None) -> dict[str, float]:
    """Serve's {metric: {replica: value}} -> {metric: sum} ({metric: mean} for `*_fraction`)."""
    signals = {}
    for name, per_replica in (aggregated or {}).items():
        values = [float(v) for v in per_replica.values()]
        if values:
            signals[name] = sum(values) / len(values) if name.endswith("_fraction") else sum(values)
    return signals


class WorkerScaling:
    """A class-callable Serve autoscaling policy (Serve builds it once with `policy_kwargs`)."""

    def __init__(self, deployment: str, targets: dict[str, float]):
        self.deployment, self.targets = deployment, dict(targets)

    def __call__(self, ctx) -> tuple[int, dict]:
        try:
            override = get_override(self.deployment)
        except Exception:  # the KV store is briefly unreachable: decide from load alone
            override = None
        signals = load_signals(ctx.aggregated_metrics)
        decision = desired_replicas(signals, self.targets, ctx.current_num_replicas, override)
        low, high = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        wanted = min(max(decision.num_replicas, low), high)
        state = dict(ctx.policy_state)
        if wanted != state.get("raymoe_wanted", ctx.target_num_replicas):  # log changes only
            entry = {"time": time.time(), "deployment": self.deployment, "from": ctx.target_num_replicas,
                     "to": wanted, "reason": decision.reason, "signals": signals}  # fmt: skip
            try:
                record_decision(self.deployment, entry)
            except Exception as e:
                logger.warning("could not record a scaling decision: %s", e)
        state["raymoe_wanted"] = wanted
        return wanted, state


def autoscaling_config(settings, deployment: str) -> dict:
    """raymoe.config.AutoscalingSettings -> Serve autoscaling_config with raymoe's policy."""
    signals = PREFILL_SIGNALS if deployment == "prefill" else DECODE_SIGNALS
    targets = {name: float(getattr(settings, f"target_{name}")) for name in signals}
    return {
        "min_replicas": settings.min_replicas,
        "initial_replicas": max(settings.min_replicas, 1),
        "max_replicas": settings.max_replicas,
        "upscale_delay_s": settings.upscale_delay_s,
        "downscale_delay_s": settings.downscale_delay_s,
        "metrics_interval_s": settings.metrics_interval_s,
        "look_back_period_s": settings.look_back_period_s,
        "policy": {
            "policy_function": "raymoe.serve.autoscale:WorkerScaling",
            "policy_kwargs": {"deployment": deployment, "targets": targets},
        },
    }
