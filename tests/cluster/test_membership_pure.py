"""Membership and resharding as pure functions (no Ray): which nodes joined and left, and where
the experts of a removed shard go."""

from raymoe.cluster.membership import DRAIN_RESOURCE, diff_nodes, serving_topology
from raymoe.cluster.placement import Placement, contiguous_placement, reshard, speed_weighted_placement
from raymoe.cluster.topology import Topology


def entry(node_id: str, alive: bool = True, **resources) -> dict:
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": "127.0.0.1",
            "Resources": {"CPU": 2.0, "memory": 1e9, **resources}}  # fmt: skip


def test_diff_finds_joined_dead_and_drained_nodes():
    before = Topology.from_ray_nodes([entry("a"), entry("b"), entry("c"), entry("d")])
    now = [
        entry("a"),
        entry("b", alive=False),  # died
        entry("c", **{DRAIN_RESOURCE: 1}),  # drains by resource
        entry("d"),  # drains on request
        entry("e", raymoe_speed=2),  # joined
    ]  # fmt: skip
    change, serving = diff_nodes(before, now, drained={"d"})
    assert [n.node_id for n in change.joined] == ["e"] and change.joined[0].speed == 2
    assert dict(change.left) == {"b": "dead", "c": "drained", "d": "drained"}
    assert serving.node_ids == ["a", "e"]
    vanished, _ = diff_nodes(before, [entry("a"), entry("b"), entry("c")])
    assert dict(vanished.left) == {"d": "dead"}  # no longer listed at all


def test_no_change_is_falsy():
    nodes = [entry("a"), entry("b")]
    change, _ = diff_nodes(serving_topology(nodes), nodes)
    assert not change and change.joined == () and change.left == ()


def test_reshard_keeps_replicas_and_reloads_orphans_by_speed():
    layers = [0, 1]
    current = contiguous_placement(layers, 6, ["n0", "n1", "n2"], replicas=1)  # 2 experts per shard
    with_replica = dict(current.expert_to_shards)
    with_replica[(0, 4)] = (2, 0)  # expert 4 of layer 0 also on shard 0
    current = Placement(3, current.shard_names, current.shard_nodes, with_replica)
    out = reshard(current, keep=[0, 1], new_nodes=[], new_names=[], shard_speeds=[1.0, 3.0])
    assert out.epoch == 3 and out.shard_nodes == ("n0", "n1") and out.shard_names == ("shard-0", "shard-1")
    assert out.shards_for(0, 4) == (0,)  # its replica survives: served from there, nothing loaded
    assert out.shards_for(0, 5) == (1,)  # orphan: to the faster shard (fewest experts per speed)
    assert out.shards_for(1, 4) == (1,) and out.shards_for(1, 5) == (1,)  # 3x speed takes both
    assert out.shards_for(0, 0) == (0,) and out.shards_for(0, 2) == (1,)  # kept ones stay
    out.check_covers(layers, 6)


def test_reshard_then_plan_gives_a_new_fast_node_the_most_experts():
    layers = [0, 1]
    current = contiguous_placement(layers, 8, ["n0", "n1"])
    skeleton = reshard(current, [0, 1], ["n2"], ["shard-2"], [1.0, 1.0, 2.0])
    assert skeleton.experts_on(2) == [] and skeleton.shard_names[-1] == "shard-2"
    load = [[5, 1, 1, 1, 9, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 7]]
    import numpy as np

    new = speed_weighted_placement(np.array(load), layers, skeleton.shard_nodes, [1.0, 1.0, 2.0],
                                   extra_replicas=1, current=skeleton, shard_names=skeleton.shard_names)  # fmt: skip
    counts = [new.num_physical(s) for s in range(3)]
    assert counts[2] > max(counts[:2]) and new.shard_names == skeleton.shard_names
    new.check_covers(layers, 8)
