"""Baselines: no replication with contiguous placement, and DeepSeek's EPLB.

EPLB (github.com/deepseek-ai/EPLB), reimplemented in numpy from the published algorithm:
replicate, one redundant slot at a time, the expert whose load per replica is highest; then
pack physical experts onto devices by balanced packing (heaviest first, each onto the
lightest device that still has a free slot; every device gets the same number). The
hierarchical form first packs expert groups onto hosts, then replicates and packs within each
host; the global form treats the cluster as one host. Both assume equal devices.
Names follow vLLM's EPLB: `phy2log`, `log2phy`, `logcnt`; a "gpu" here is a topology node.
"""

from __future__ import annotations

import numpy as np

from raymoe.policies.plan import Plan
from raymoe.policies.topology import Topology


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack `n` items into `num_packs` packs of `n / num_packs` items each, balancing weight.

    weight: `[rows, n]`. Returns (pack_index `[rows, n]`, rank_in_pack `[rows, n]`).
    """
    rows, n = weight.shape
    assert n % num_packs == 0
    per_pack = n // num_packs
    if per_pack == 1:
        return np.tile(np.arange(n), (rows, 1)), np.zeros((rows, n), dtype=np.int64)
    pack_index = np.full((rows, n), -1, dtype=np.int64)
    rank_in_pack = np.full((rows, n), -1, dtype=np.int64)
    for row in range(rows):
        pack_weight, pack_items = np.zeros(num_packs), np.zeros(num_packs, dtype=np.int64)
        for item in np.argsort(-weight[row], kind="stable"):
            open_packs = np.flatnonzero(pack_items < per_pack)
            pack = open_packs[np.argmin(pack_weight[open_packs])]
            pack_index[row, item], rank_in_pack[row, item] = pack, pack_items[pack]
            pack_weight[pack] += weight[row, item]
            pack_items[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_phy: int):
    """Give `num_phy - num_log` redundant slots, one at a time, to the highest load per replica.

    weight: `[rows, num_log]`. Returns (phy2log `[rows, num_phy]`, phy_rank `[rows, num_phy]`,
    logcnt `[rows, num_log]`); the first `num_log` physical experts are the logical ones.
    """
    rows, num_log = weight.shape
    assert num_phy >= num_log
    phy2log = np.tile(np.arange(num_phy), (rows, 1))
    phy_rank = np.zeros((rows, num_phy), dtype=np.int64)
    logcnt = np.ones((rows, num_log), dtype=np.int64)
    every_row = np.arange(rows)
    for phy in range(num_log, num_phy):
        hottest = np.argmax(weight / logcnt, axis=1)
        phy2log[:, phy] = hottest
        phy_rank[:, phy] = logcnt[every_row, hottest]
        logcnt[every_row, hottest] += 1
    return phy2log, phy_rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_experts_hierarchical(weight: np.ndarray, num_physical: int, num_groups: int,
                                   num_hosts: int, num_gpus: int):
    """EPLB's hierarchical form. weight: `[layers, experts]`.

    Returns (phy2log `[layers, num_physical]`, phy_rank, logcnt `[layers, experts]`);
    physical expert `p` lives on gpu `p // (num_physical // num_gpus)`.
    """
    num_layers, num_log = weight.shape
    assert num_log % num_groups == 0 and num_groups % num_hosts == 0
    assert num_gpus % num_hosts == 0 and num_physical % num_gpus == 0
    group_size, groups_per_host = num_log // num_groups, num_groups // num_hosts
    per_gpu = num_physical // num_gpus
    # Step 1: pack expert groups onto hosts; relabel experts host-major ("mlog").
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(-1)
    group_pack, group_rank = balanced_packing(group_load, num_hosts)
    log2mlog = (((group_pack * groups_per_host + group_rank) * group_size)[..., None]
                + np.arange(group_size)).reshape(num_layers, -1)
    mlog2log = _inverse(log2mlog)
    # Step 2: replicate within each host.  [layers * hosts, experts per host]
    mlog_load = np.take_along_axis(weight, mlog2log, -1).reshape(-1, num_log // num_hosts)
    phy2mlog, phy_rank, mlogcnt = replicate_experts(mlog_load, num_physical // num_hosts)
    # Step 3: pack each host's physical experts onto its gpus.
    phy_load = np.take_along_axis(mlog_load / mlogcnt, phy2mlog, -1)
    pack, rank = balanced_packing(phy_load, num_gpus // num_hosts)
    pphy2phy = _inverse(pack * per_gpu + rank)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, -1)
    host_offset = np.arange(0, num_log, num_log // num_hosts)[None, :, None]
    pphy2mlog = (pphy2mlog.reshape(num_layers, num_hosts, -1) + host_offset).reshape(num_layers, -1)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, -1)
    phy_rank = np.take_along_axis(phy_rank, pphy2phy, -1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, -1)
    return phy2log, phy_rank, logcnt


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int, num_hosts: int,
                      num_gpus: int):
    """EPLB's entry point: hierarchical when groups divide evenly over hosts, else global.

    Returns (phy2log `[layers, num_replicas]`, log2phy `[layers, experts, max replicas]`
    padded with -1, logcnt `[layers, experts]`).
    """
    weight = np.asarray(weight, dtype=np.float64)
    if num_groups % num_hosts == 0:
        phy2log, phy_rank, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, num_groups, num_hosts, num_gpus)
    else:
        phy2log, phy_rank, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, 1, 1, num_gpus)
    num_layers, num_log = weight.shape
    width = num_replicas - num_log + 1
    log2phy = np.full((num_layers, num_log * width), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * width + phy_rank,
                      np.broadcast_to(np.arange(num_replicas), phy2log.shape), axis=1)
    return phy2log, log2phy.reshape(num_layers, num_log, width), logcnt


def eplb_plan(load: np.ndarray, topology: Topology, num_groups: int = 1,
              num_hosts: int = 1) -> Plan:
    """EPLB over a topology whose nodes are EPLB's gpus. load: `[layers, experts]`.

    num_groups=num_hosts=1 is the global form; num_hosts > 1 the hierarchical one (hosts
    each own `num_nodes / num_hosts` consecutive nodes).
    """
    topology.check_fits(load.shape[1])
    phy2log, _, logcnt = rebalance_experts(
        load, topology.num_slots, num_groups, num_hosts, topology.num_nodes)
    phy2node = np.arange(topology.num_slots) // topology.slots_per_node
    return Plan(phy2log, np.tile(phy2node, (load.shape[0], 1)), logcnt)


def contiguous_plan(num_layers: int, num_experts: int, topology: Topology) -> Plan:
    """No replication: expert `e` on node `e * num_nodes // num_experts`; spare slots empty."""
    topology.check_fits(num_experts)
    phy2node = np.arange(num_experts) * topology.num_nodes // num_experts
    return Plan(
        np.tile(np.arange(num_experts), (num_layers, 1)),
        np.tile(phy2node, (num_layers, 1)),
        np.ones((num_layers, num_experts), dtype=np.int64),
    )
