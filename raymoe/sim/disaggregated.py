"""The simulator's step model applied to raymoe's own layout: one decode worker, experts on shards.

`step_breakdown` prices a `Replay` in which tokens run on the nodes that hold experts. raymoe's
cluster is disaggregated instead: every token runs on a decode worker that holds no expert, so
every token-expert pair crosses the wire. `disaggregated_replay` builds that one-step `Replay` from
per-expert routing counts (e.g. what a real run reported to the controller) and the shards'
expert sets; the worker is node `num_shards` (the last), holding nothing.

`measured_components` and `modelled_components` put a measured breakdown (`bench/cluster.py`:
`attention_and_local`, `dispatch`, `expert`, `combine` ms per step) and a modelled one on the same
footing. The two disagree on names: the measured `dispatch` is the whole exposed round trip less
the shards' compute (both directions of the wire), which the model splits into `dispatch_s` and
`combine_s`; the measured `combine` is the worker's local weighted sum, which the model counts
with the rest of the worker's local work. So the compared components are `local_s` (attention,
router, LM head, combine: all on the worker), `network_s` (both directions), `expert_s`, `step_s`.
"""

from __future__ import annotations

import numpy as np

from raymoe.policies.evaluate import Replay
from raymoe.policies.plan import Plan
from raymoe.policies.topology import Topology


def per_step_pairs(load: np.ndarray, batch_size: int, top_k: int) -> np.ndarray:
    """load `[layers, experts]` pairs over a whole run -> the mean step's `[layers, experts]`
    pairs for a batch of `batch_size` decode tokens (each layer's row sums to batch * top_k)."""
    load = np.asarray(load, dtype=np.float64)
    totals = load.sum(1, keepdims=True)
    if (totals <= 0).any():
        raise ValueError("every layer needs some routed pairs to take its distribution from")
    return load / totals * (batch_size * top_k)


def disaggregated_replay(pairs: np.ndarray, shard_experts: list[list[set[int]]],
                         batch_size: int) -> tuple[Replay, Topology]:  # fmt: skip
    """One decode step. pairs `[layers, experts]` (a replica-less placement: each expert on one
    shard); shard_experts[layer][shard] = the experts that shard holds at that layer."""
    num_layers, num_experts = pairs.shape
    num_shards = len(shard_experts[0])
    worker = num_shards
    phy2log = np.stack([np.concatenate([sorted(s) for s in layer]) for layer in shard_experts])
    phy2node = np.stack([np.repeat(np.arange(num_shards), [len(s) for s in layer]) for layer in shard_experts])
    if sorted(phy2log[0].tolist()) != list(range(num_experts)):
        raise ValueError("every expert must sit on exactly one shard (no replicas) in this model")
    plan = Plan(phy2log, phy2node, np.ones((num_layers, num_experts), dtype=np.int64))
    node_load = np.zeros((1, num_layers, num_shards + 1))
    for layer in range(num_layers):
        for shard, experts in enumerate(shard_experts[layer]):
            node_load[0, layer, shard] = pairs[layer, sorted(experts)].sum()
    token_pairs = np.zeros_like(node_load)
    token_pairs[0, :, worker] = pairs.sum(1)
    replay = Replay(
        node_load=node_load, local=np.zeros_like(node_load), token_pairs=token_pairs,
        token_node=np.full((1, batch_size), worker), plans=[plan], plan_of_step=np.zeros(1, dtype=np.int64),
        expert_pairs=pairs[None],
    )  # fmt: skip
    return replay, Topology(num_shards + 1, max(len(s) for s in shard_experts[0]))


def modelled_components(breakdown: dict) -> dict:
    """`step_breakdown()` output -> seconds per step by compared component."""
    return {
        "step_s": breakdown["step_s"],
        "local_s": breakdown["attention_s"] + breakdown["dense_and_head_s"],
        "network_s": breakdown["dispatch_s"] + breakdown["combine_s"],
        "expert_s": breakdown["expert_s"],
    }


def measured_components(ms_per_step: float, breakdown_ms: dict) -> dict:
    """`bench/cluster.py`'s decode figures (ms per step) -> seconds per step by compared component."""
    return {
        "step_s": ms_per_step / 1e3,
        "local_s": (breakdown_ms["attention_and_local"] + breakdown_ms["combine"]) / 1e3,
        "network_s": breakdown_ms["dispatch"] / 1e3,
        "expert_s": breakdown_ms["expert"] / 1e3,
    }
