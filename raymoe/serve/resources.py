"""What each deployment reserves, sized to the Ray cluster, and a check that it fits.

`num_cpus: null` (the default of `prefill` and `decode`) is sized when the app is built: the CPUs
the cluster has, less the ingress's, shared by every worker the deployments may scale to, at most 1
and at least MIN_AUTO_CPUS each. So `backend: cluster` with nothing else starts on a 2-CPU laptop
(ingress 0.5, prefill and decode workers 0.75 each), and a big node keeps 1 CPU per worker.
With `serve.ingress_in_engine` there is no ingress deployment: the engine's replicas take it all.

`check_fits` compares what the deployments ask for at start (min replicas) with the nodes of a
fixed cluster (the local one `raymoe serve` starts) and says what cannot be had, before Serve
would retry it for minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

from raymoe.config import DeploymentSettings, RaymoeConfig
from raymoe.errors import ConfigError

MIN_AUTO_CPUS = 0.1  # a worker sized on a cluster whose nodes have not joined yet still schedules
INGRESS_CPUS = 0.5  # the ingress's num_cpus when the config leaves it null
SIZED = ("prefill", "decode")


class ResourcesUnavailableError(ConfigError):
    """A deployment asks for resources the Ray cluster does not have; the message names both."""


@dataclass(frozen=True)
class Ask:
    """What one deployment reserves: `replicas` at start, each `per_replica` ({resource: amount})."""

    deployment: str
    replicas: int
    per_replica: dict[str, float]


def sized_config(config: RaymoeConfig, cluster_cpus: float | None) -> RaymoeConfig:
    """`config` with each `num_cpus: null` of prefill/decode replaced by its share of `cluster_cpus`
    (None: unknown, 1 CPU each), and the ingress's by INGRESS_CPUS."""
    if config.ingress.num_cpus is None:
        config = config.model_copy(update={"ingress": config.ingress.model_copy(update={"num_cpus": INGRESS_CPUS})})
    ingress = config.ingress.num_cpus * config.ingress.autoscaling.max_replicas
    ingress *= not config.ingress_in_engine  # then the engine's replicas are the ingress
    workers = [name for name in SIZED if _uses(config, name)]
    slots = sum(getattr(config, name).autoscaling.max_replicas for name in workers)
    share = 1.0 if cluster_cpus is None else (cluster_cpus - ingress) / max(slots, 1)
    share = round(min(1.0, max(MIN_AUTO_CPUS, share)), 3)
    update = {name: getattr(config, name).model_copy(update={"num_cpus": share})
              for name in SIZED if getattr(config, name).num_cpus is None}  # fmt: skip
    return config.model_copy(update=update)


def _uses(config: RaymoeConfig, name: str) -> bool:
    """The engine backend runs the `decode` settings only; the cluster backend both."""
    return config.backend == "cluster" or name == "decode"


def asks(config: RaymoeConfig) -> list[Ask]:
    """What a sized config reserves at start, per deployment (the cluster backend's worker replicas
    reserve nothing themselves: their worker actors hold the deployment's resources; with
    serve.ingress_in_engine the ingress is the decode deployment, not one of its own)."""
    out = [] if config.ingress_in_engine else [_ask("ingress", config.ingress)]
    out += [_ask(name, getattr(config, name)) for name in SIZED if _uses(config, name)]
    return out


def _ask(name: str, settings: DeploymentSettings) -> Ask:
    per = {"CPU": settings.num_cpus or 0.0, "GPU": settings.num_gpus, **settings.resources}
    return Ask(name, max(settings.autoscaling.min_replicas, 1), {k: v for k, v in per.items() if v})


def check_fits(wanted: list[Ask], nodes: list[dict[str, float]]) -> None:
    """Raise ResourcesUnavailableError naming the deployment, its ask and what the cluster has when
    a replica fits on no node, or all of them together exceed the cluster. nodes: each live node's
    total resources, as `ray.nodes()[i]["Resources"]`."""
    total: dict[str, float] = {}
    for node in nodes:
        for key, amount in node.items():
            total[key] = total.get(key, 0.0) + amount
    has = _describe(total, [k for a in wanted for k in a.per_replica])
    for a in wanted:
        if not any(all(node.get(k, 0.0) >= v for k, v in a.per_replica.items()) for node in nodes):
            short = [k for k, v in a.per_replica.items() if max((n.get(k, 0.0) for n in nodes), default=0.0) < v]
            raise ResourcesUnavailableError(
                f"deployment {a.deployment!r} asks for {_describe(a.per_replica)} per replica, but no node has "
                f"enough {' and '.join(short)} (the cluster has {has}); lower {a.deployment}.num_cpus / num_gpus / "
                f"resources in the config, or add a node that has them")  # fmt: skip
    need: dict[str, float] = {}
    for a in wanted:
        for key, amount in a.per_replica.items():
            need[key] = need.get(key, 0.0) + a.replicas * amount
    over = [k for k, v in need.items() if v > total.get(k, 0.0) + 1e-9]
    if over:
        parts = "; ".join(f"{a.deployment} {a.replicas} x {_describe(a.per_replica)}" for a in wanted)
        raise ResourcesUnavailableError(
            f"the deployments need {_describe(need)} together ({parts}), but the cluster has {has}; "
            "lower num_cpus or min_replicas in the config, or leave prefill/decode num_cpus unset to size "
            "them from the cluster")  # fmt: skip


def _describe(resources: dict[str, float], keys: list[str] | None = None) -> str:
    keys = list(dict.fromkeys(keys)) if keys is not None else list(resources)
    return ", ".join(f"{k} {resources.get(k, 0.0):g}" for k in keys) or "nothing"
