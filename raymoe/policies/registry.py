"""Policy names, and what each builds. Names are a `Literal`, checked against the registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, get_args

from raymoe.policies.dispatch import DispatchMode
from raymoe.policies.eplb import contiguous_plan, eplb_plan
from raymoe.policies.grouping import grouping_plan
from raymoe.policies.plan import Plan
from raymoe.policies.replication import replication_plan
from raymoe.policies.stats import Calibration
from raymoe.policies.topology import Topology

PolicyName = Literal[
    "contiguous", "eplb_global", "eplb_hierarchical", "replication", "placement", "grouping",
    "regrouping",
]

# EPLB's hierarchical form packs onto hosts of this many devices, as DeepSeek's deployment.
DEVICES_PER_HOST = 8


@dataclass(frozen=True)
class PolicySpec:
    build: Callable[..., Plan]  # (Calibration, Topology, **options) -> Plan
    dispatch: DispatchMode  # how a batch picks among replicas
    is_token_placement: bool  # requests run where their predicted experts are
    summary: str
    # "full": re-plan from scratch on recent load; "incremental": move only redundant slots
    # (and a few swaps); "regroup": re-cluster on recent requests and re-seat running ones
    replan: Literal["full", "incremental", "regroup"] = "full"


def _contiguous(calib: Calibration, topology: Topology, **_) -> Plan:
    num_layers, num_experts = calib.load.shape
    return contiguous_plan(num_layers, num_experts, topology)


def _eplb_global(calib: Calibration, topology: Topology, **_) -> Plan:
    return eplb_plan(calib.load, topology)


def _eplb_hierarchical(calib: Calibration, topology: Topology,
                       devices_per_host: int = DEVICES_PER_HOST, **_) -> Plan:
    is_split = topology.num_nodes % devices_per_host == 0
    num_hosts = topology.num_nodes // devices_per_host if is_split else 1
    num_groups = num_hosts if calib.load.shape[1] % num_hosts == 0 else 1
    return eplb_plan(calib.load, topology, num_groups=num_groups, num_hosts=num_hosts)


def _replication(calib: Calibration, topology: Topology, smoothing: float = 0.05, **_) -> Plan:
    return replication_plan(calib.load, topology, smoothing=smoothing)


def _grouping(calib: Calibration, topology: Topology, balance_slack: float = 0.1,
              seed: int = 0, **_) -> Plan:
    return grouping_plan(calib.profiles, calib.load, topology, balance_slack, seed,
                         init=calib.request_node)


def _regrouping(calib: Calibration, topology: Topology, **options) -> Plan:
    # A clustered plan bets on the calibration's request mix. Until live requests have
    # been seen (no request_node yet), the load-balanced plan is the safer bet.
    if calib.request_node is None:
        return _replication(calib, topology, **options)
    return _grouping(calib, topology, **options)


REGISTRY: dict[PolicyName, PolicySpec] = {
    "contiguous": PolicySpec(_contiguous, "round_robin", False,
                             "no replication; expert e on node e * nodes // experts"),
    "eplb_global": PolicySpec(_eplb_global, "round_robin", False,
                              "DeepSeek EPLB, global form (equal devices)"),
    "eplb_hierarchical": PolicySpec(_eplb_hierarchical, "round_robin", False,
                                    "DeepSeek EPLB, hierarchical form (equal devices)"),
    "replication": PolicySpec(_replication, "balanced", False,
                              "speed-aware replication and packing; per-batch balanced dispatch"),
    "placement": PolicySpec(_replication, "local_first", True,
                            "replication plan plus speculative token placement", "incremental"),
    "grouping": PolicySpec(_grouping, "local_first", True,
                           "co-activation grouping, replicas by node demand, token placement",
                           "incremental"),
    "regrouping": PolicySpec(_regrouping, "local_first", True,
                             "grouping, re-clustered on recent requests; running ones re-seated",
                             "regroup"),
}

if set(REGISTRY) != set(get_args(PolicyName)):  # a name in one and not the other is a bug
    raise ImportError(f"policy registry {sorted(REGISTRY)} != PolicyName {get_args(PolicyName)}")


def get_policy(name: str) -> PolicySpec:
    """The spec of a policy, or a ValueError that lists the valid names."""
    from raymoe.errors import ConfigError

    if name not in REGISTRY:
        raise ConfigError(f"unknown policy {name!r}: choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]
