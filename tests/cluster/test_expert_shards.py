"""Expert shards and expert-parallel dispatch.

Pure parts first (placement, replica choice, the shard core, RemoteExperts over an in-process
transport), then the same model on a real 3-node Ray cluster: logits equal to LocalExperts for 1, 2
and 4 shards with and without replicas, for two families, and with shards killed.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

from raymoe.actors.expert_shard import ExpertNotHeldError, ExpertShardCore
from raymoe.cluster.colocation import node_experts
from raymoe.cluster.dispatch import (
    NoLiveReplicaError,
    RemoteExperts,
    ShardFailureError,
    assign_rows,
    split_rows,
)
from raymoe.cluster.placement import (
    Placement,
    PlacementError,
    block_sizes,
    contiguous_placement,
    replica_counts,
    speed_weighted_placement,
)
from raymoe.cluster.transport import (
    INLINE_BYTES,
    Sent,
    ShardFailure,
    ShardOutput,
    Transport,
    from_wire,
    split_like,
    to_wire,
)
from raymoe.errors import ConfigError
from raymoe.model.expert_file import CACHE_ENV
from raymoe.model.model import load_model
from raymoe.model.paged import AttentionBatch, allocate_kv_cache

BLOCK = 4
TOL = 1e-5


def run_steps(model, experts, prompts: list[list[int]], fed: list[list[int]]) -> torch.Tensor:
    """One prefill step of every prompt, then one step per token of `fed` (one per sequence):
    logits of every computed position, [rows, V]."""
    cache = allocate_kv_cache(model.kv_layout(), 8 * len(prompts), BLOCK, torch.float32)
    tables = [list(range(8 * b, 8 * b + 8)) for b in range(len(prompts))]
    done, out = [0] * len(prompts), []
    for chunk in [prompts] + [[[f[i]] for f in fed] for i in range(len(fed[0]))]:
        lens = [len(c) for c in chunk]
        ctx = [d + n for d, n in zip(done, lens)]
        batch = AttentionBatch.build(lens, ctx, tables, BLOCK)
        hidden = model.forward(torch.tensor(sum(chunk, [])), batch, cache, experts=experts)
        out.append(model.compute_logits(hidden))
        done = ctx
    return torch.cat(out)


def random_tokens(seed: int, *lengths: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in lengths]


def expected_load(model, prompts, fed) -> np.ndarray:
    """[layers, experts] token-expert pairs LocalExperts routes for the same steps."""
    spec, counts = model.spec, np.zeros((model.spec.num_layers, model.spec.num_experts), dtype=np.int64)
    local = model.experts

    class Counting:
        def run(self, layer, x, ids, weights):
            counts[layer] += np.bincount(ids.reshape(-1).numpy(), minlength=spec.num_experts)
            return local.run(layer, x, ids, weights)

    run_steps(model, Counting(), prompts, fed)
    return counts


# ---------------------------------------------------------------------------------- placement
def test_block_sizes_follow_weights():
    assert block_sizes(8, [1, 1, 1, 1]) == [2, 2, 2, 2]
    assert block_sizes(8, [1, 2, 1]) == [2, 4, 2]
    assert block_sizes(3, [1, 1]) == [2, 1]
    with pytest.raises(PlacementError):
        block_sizes(8, [1, 0])


def test_contiguous_placement_blocks_and_replicas():
    p = contiguous_placement([0, 2], 8, ["a", "b", "c", "d"], replicas=2)
    assert p.shards_for(0, 0) == (0, 1) and p.shards_for(2, 7) == (3, 0)
    assert p.experts_on(1) == [(0, 0), (0, 1), (0, 2), (0, 3), (2, 0), (2, 1), (2, 2), (2, 3)]
    p.check_covers([0, 2], 8)
    with pytest.raises(PlacementError, match="no shard"):
        p.check_covers([0, 1], 8)
    with pytest.raises(PlacementError, match="not placed"):
        p.shards_for(1, 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param(dict(expert_to_shards={(0, 0): (1, 1)}), "two replicas", id="same-shard-twice"),
        pytest.param(dict(expert_to_shards={(0, 0): (2,)}), "valid are", id="shard-out-of-range"),
        pytest.param(dict(expert_to_shards={(0, 0): ()}), "no replica", id="no-replica"),
        pytest.param(dict(shard_nodes=("a",)), "shard nodes", id="names-nodes-mismatch"),
    ],
)
def test_placement_rejects_inconsistent(kwargs, match):
    args = dict(epoch=0, shard_names=("s0", "s1"), shard_nodes=("a", "b"), expert_to_shards={})
    with pytest.raises(PlacementError, match=match):
        Placement(**{**args, **kwargs})


def test_too_many_replicas():
    with pytest.raises(PlacementError, match="replicas=3"):
        contiguous_placement([0], 4, ["a", "b"], replicas=3)


def test_speed_weighted_placement_replicates_hot_and_favours_fast():
    load = np.zeros((2, 8))
    load[1] = [400, 10, 10, 10, 10, 10, 10, 10]
    p = speed_weighted_placement(load, [1], ["a", "b", "c"], [1.0, 2.0, 1.0], extra_replicas=2)
    assert replica_counts(load[1], 2, 3).tolist() == [3, 1, 1, 1, 1, 1, 1, 1]
    assert p.shards_for(1, 0) == (0, 1, 2)
    assert p.num_physical(1) > max(p.num_physical(0), p.num_physical(2))
    p.check_covers([1], 8)


# ---------------------------------------------------------------------------------- replica choice
@pytest.mark.parametrize(
    "loads, amount, shares",
    [([0, 0], 5, [3, 2]), ([5, 0], 3, [0, 3]), ([2, 0], 4, [1, 3]), ([0, 0, 0], 0, [0, 0, 0]), ([1, 1], 1, [1, 0])],
)
def test_split_rows_water_fills(loads, amount, shares):
    assert split_rows(loads, amount) == shares


def test_assign_rows_prefers_local_then_balances():
    p = contiguous_placement([0], 4, ["a", "b"], replicas=2)
    counts = {0: 4, 1: 3, 3: 1}
    assert assign_rows(p, 0, counts, "b", set()) == {1: [(0, 0, 4), (1, 0, 3), (3, 0, 1)]}
    assert assign_rows(p, 0, counts, None, set()) == {0: [(0, 0, 2), (1, 0, 2)], 1: [(0, 2, 2), (1, 2, 1), (3, 0, 1)]}
    assert assign_rows(p, 0, counts, "b", {1}) == {0: [(0, 0, 4), (1, 0, 3), (3, 0, 1)]}


def test_assign_rows_without_live_replica():
    p = contiguous_placement([0], 4, ["a", "b"])
    with pytest.raises(NoLiveReplicaError) as err:
        assign_rows(p, 0, {0: 2, 3: 1}, "a", {0})
    assert (err.value.expert, err.value.shards) == (0, (0,))


# ---------------------------------------------------------------------------------- shard core
@pytest.fixture(scope="module")
def mixtral_path(checkpoint_dir):
    return str(checkpoint_dir("mixtral"))


def test_core_matches_local_experts(mixtral_path):
    store = load_model(mixtral_path).experts.store
    core = ExpertShardCore(mixtral_path, [(1, e) for e in range(8)])
    gen = torch.Generator().manual_seed(0)
    for n in (1, 6, 40):
        x = torch.randn(n, 64, generator=gen)
        spread = [n // 8 + (i < n % 8) for i in range(8)]  # every expert has rows once n >= 8: batched path
        for experts, counts in (([2, 5], [n // 2, n - n // 2]), ([5, 2], [n - n // 2, n // 2]), (range(8), spread)):
            expected = torch.cat([store.run_group(1, e, xs) for e, xs in zip(experts, x.split(counts))])
            assert (core.run(1, x, list(experts), counts) - expected).abs().max() <= TOL
    assert core.last_compute_s > 0


def test_core_load_free_held(mixtral_path):
    core = ExpertShardCore(mixtral_path, [(0, 1), (2, 3)])
    assert core.held() == [(0, 1), (2, 3)]
    core.load([(0, 1), (0, 0)])
    assert core.held() == [(0, 0), (0, 1), (2, 3)] and core.store.layers[0].expert_ids == [0, 1]
    core.free([(0, 1), (1, 1)])
    assert core.held() == [(0, 0), (2, 3)]
    with pytest.raises(ExpertNotHeldError):
        core.run(0, torch.zeros(1, 64), [1], [1])
    with pytest.raises(ConfigError, match="does not exist"):
        core.load([(0, 8)])


def test_holders_on_a_node_share_one_mapping(mixtral_path, tmp_path, monkeypatch):
    """Two holders of overlapping experts (a worker and a shard on one node) map one file: a
    change through one shows through the other, so the weights exist once."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    a = ExpertShardCore(mixtral_path, [(0, e) for e in range(4)])
    b = ExpertShardCore(mixtral_path, [(0, e) for e in range(2, 8)])
    assert len(list(tmp_path.iterdir())) == 1  # one file for layer 0
    expert2_in_b = b.store.layers[0].gate_up_t[0]  # b's stack starts at expert 2
    before = expert2_in_b.clone()
    a.store.layers[0].gate_up_t[2].add_(1.0)
    assert torch.equal(expert2_in_b, before + 1.0)


# ---------------------------------------------------------------------------------- dispatch, no Ray
class FakeShard:
    def __init__(self, core):
        self.core, self.alive = core, True


class InProcessTransport(Transport):
    """Runs slices synchronously on in-process shard cores; a shard with alive=False 'died'."""

    def __init__(self):
        self.handles, self.sent_to = [], []

    def set_handles(self, handles):
        self.handles = handles

    def send(self, shard_index, layer, rows, expert_ids, counts):
        shard = self.handles[shard_index]
        self.sent_to.append(shard_index)
        if not shard.alive:
            return Sent(shard_index, ShardFailure(shard_index, RuntimeError("died"), True))
        return Sent(shard_index, ShardOutput(shard.core.run(layer, rows, expert_ids, counts), 0.001))

    def wait(self, sent, timeout_s=1.0):
        return [s.ref for s in sent]


def fake_shards(path, placement):
    return [FakeShard(ExpertShardCore(path, placement.experts_on(s))) for s in range(placement.num_shards)]


def test_remote_experts_in_process_equal_and_reroute(mixtral_path):
    model = load_model(mixtral_path)
    spec = model.spec
    placement = contiguous_placement(spec.moe_layer_ids, 8, ["a", "b", "c"], replicas=2)
    shards, transport = fake_shards(mixtral_path, placement), InProcessTransport()
    remote = RemoteExperts(placement, shards, spec.num_layers, 8, transport=transport, node_id="a")
    prompts, fed = random_tokens(1, 7, 5), random_tokens(2, 3, 3)
    expected = run_steps(model, None, prompts, fed)
    assert (run_steps(model, remote, prompts, fed) - expected).abs().max() <= TOL
    assert (remote.take_load() == expected_load(model, prompts, fed)).all()
    shards[0].alive = False  # the local shard dies: its slices go to the replicas on b and c
    assert (run_steps(model, remote, prompts, fed) - expected).abs().max() <= TOL
    assert len(remote.dead) == 1
    times = remote.take_timings()
    assert times["calls"] == 2 * 4 * len(spec.moe_layer_ids) and times["expert_s"] > 0


def test_remote_experts_in_process_recreates_without_replica(mixtral_path):
    model = load_model(mixtral_path)
    spec = model.spec
    placement = contiguous_placement(spec.moe_layer_ids, 8, ["a", "b"])
    shards = fake_shards(mixtral_path, placement)
    calls = []

    def on_shard_failure(shard):
        calls.append(shard)
        shards[shard] = FakeShard(ExpertShardCore(mixtral_path, placement.experts_on(shard)))
        return placement.with_epoch(placement.epoch + 1), list(shards)

    remote = RemoteExperts(placement, list(shards), spec.num_layers, 8, transport=InProcessTransport(),
                           node_id="a", on_shard_failure=on_shard_failure)  # fmt: skip
    prompts, fed = random_tokens(3, 6), random_tokens(4, 2)
    shards[1].alive = False
    got = run_steps(model, remote, prompts, fed)
    assert (got - run_steps(model, None, prompts, fed)).abs().max() <= TOL
    assert calls == [1] and remote.epoch == 1

    remote.on_shard_failure = None
    shards[0].alive = False
    with pytest.raises(ShardFailureError, match="on_shard_failure"):
        run_steps(model, remote, prompts, fed)


class CountingTransport(InProcessTransport):
    """Also counts the rows that reached the transport, per shard."""

    def __init__(self):
        super().__init__()
        self.rows: dict[int, int] = {}

    def send(self, shard_index, layer, rows, expert_ids, counts):
        self.rows[shard_index] = self.rows.get(shard_index, 0) + rows.shape[0]
        return super().send(shard_index, layer, rows, expert_ids, counts)


def test_colocated_rows_never_reach_the_transport(mixtral_path):
    """Shards 0, 1 on node a (the worker's), shard 2 on b: the worker runs a's experts itself."""
    model = load_model(mixtral_path)
    spec = model.spec
    placement = contiguous_placement(spec.moe_layer_ids, 8, ["a", "a", "b"])
    shards, transport = fake_shards(mixtral_path, placement), CountingTransport()
    local = ExpertShardCore(mixtral_path, [])
    remote = RemoteExperts(placement, shards, spec.num_layers, 8, transport=transport, node_id="a", local=local,
                           num_moe_layers=len(spec.moe_layer_ids))  # fmt: skip
    assert set(local.held()) == node_experts(placement, "a") == set(placement.experts_on(0) + placement.experts_on(1))
    prompts, fed = random_tokens(5, 9, 4), random_tokens(6, 3, 3)
    expected = run_steps(model, None, prompts, fed)
    assert (run_steps(model, remote, prompts, fed) - expected).abs().max() <= TOL
    load = expected_load(model, prompts, fed)
    on_b = sum(int(load[lay, e]) for lay, e in placement.experts_on(2))
    assert set(transport.rows) == {2} and transport.rows[2] == on_b  # nothing for a's experts was sent
    c = remote.count_summary()
    assert (c["rows_local"], c["rows_process"], c["rows_node"], c["pairs"]) == (load.sum() - on_b, on_b, on_b, load.sum())
    tokens = sum(map(len, prompts)) + sum(map(len, fed))
    assert c["tokens"] == tokens and c["rows_crossing_node_per_token"] == on_b / tokens
    assert c["local_activation_rate"] == 1 - on_b / load.sum()

    moved = contiguous_placement(spec.moe_layer_ids, 8, ["b", "a", "b"], epoch=1)  # a keeps only shard 1's
    remote.set_placement(moved, fake_shards(mixtral_path, moved))
    assert (run_steps(model, remote, prompts, fed) - expected).abs().max() <= TOL
    assert set(local.held()) == node_experts(moved, "a") == set(moved.experts_on(1))

    everything = contiguous_placement(spec.moe_layer_ids, 8, ["a", "a", "b"], replicas=3, epoch=2)  # all on a
    remote.set_placement(everything, fake_shards(mixtral_path, everything))
    sent = dict(transport.rows)
    assert (run_steps(model, remote, prompts, fed) - expected).abs().max() <= TOL
    assert transport.rows == sent and remote.take_timings()["local_expert_s"] > 0  # no row reached a shard


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 7, 300])
def test_wire_round_trip(dtype, num_rows):
    rows = torch.randn(num_rows, 256).to(dtype)
    name, chunks = to_wire(rows)
    per_chunk = INLINE_BYTES // (256 * rows.element_size())
    assert len(chunks) == -(-num_rows // per_chunk)
    assert all(c.nbytes < 100 * 1024 for c in chunks)
    assert torch.equal(from_wire(name, chunks), rows)
    back = split_like(rows * 2, [len(c) for c in chunks])
    assert torch.equal(from_wire(name, back), rows * 2)


def test_dispatch_import_needs_no_cupy():
    code = "import sys, raymoe.cluster.dispatch, raymoe.cluster.transport_nccl; " \
           "assert 'cupy' not in sys.modules and 'ray.util.collective' not in sys.modules"  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------- on Ray
FAMILIES = ["mixtral", "qwen2_moe"]


class GlooCaller:
    """The worker side of `CollectiveTransport`, which must run inside an actor."""

    def __init__(self, handles):
        from raymoe.cluster.transport_nccl import CollectiveTransport

        torch.set_num_threads(1)
        self.transport = CollectiveTransport(handles, backend="gloo", timeout_s=60)

    def run(self, layer, slices):
        sent = [self.transport.send(i, layer, rows, ids, counts) for i, (rows, ids, counts) in enumerate(slices)]
        return [(r.rows, r.compute_s) for r in self.transport.wait(sent, 60)]

    def close(self):
        self.transport.close()


def test_collective_transport_over_gloo(ray_cluster, mixtral_path):
    """The GPU transport's code path, run with the gloo backend on CPU (own shards: a gloo group
    binds its processes for good)."""
    import ray
    from ray import cloudpickle

    from raymoe.actors.expert_shard import ExpertShard

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    held = [[(0, e) for e in range(4)], [(0, e) for e in range(4, 8)]]
    shards = [ExpertShard.options(num_cpus=0).remote(mixtral_path, h) for h in held]
    caller = ray.remote(GlooCaller).options(num_cpus=0).remote(shards)
    gen = torch.Generator().manual_seed(4)
    slices = [(torch.randn(9, 64, generator=gen), [0, 3], [4, 5]), (torch.randn(3, 64, generator=gen), [6], [3])]
    try:
        replies = ray.get(caller.run.remote(0, slices), timeout=120)
        core = ExpertShardCore(mixtral_path, held[0] + held[1])
        for (rows, ids, counts), (out, compute_s) in zip(slices, replies):
            assert (out - core.run(0, rows, ids, counts)).abs().max() <= TOL and compute_s > 0
        ray.get(caller.close.remote(), timeout=60)
    finally:
        for actor in shards + [caller]:
            ray.kill(actor)


class RayShards:
    """Four shard actors (nodes head, b, c, b) of one model, re-synced to each test's placement."""

    def __init__(self, path: str):
        import ray

        self.path, self.model = path, load_model(path)
        by_res = {r: n["NodeID"] for n in ray.nodes() if n["Alive"] for r in n["Resources"] if r.startswith("node_")}
        self.nodes = [by_res["node_head"], by_res["node_b"], by_res["node_c"], by_res["node_b"]]
        self.handles = [self.spawn(s, []) for s in range(4)]
        ray.get([h.ping.remote() for h in self.handles], timeout=120)

    def spawn(self, shard: int, experts):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from raymoe.actors.expert_shard import ExpertShard

        strategy = NodeAffinitySchedulingStrategy(self.nodes[shard], soft=False)
        return ExpertShard.options(num_cpus=0, scheduling_strategy=strategy).remote(self.path, experts)

    def placement(self, num_shards: int, replicas: int) -> Placement:
        spec = self.model.spec
        p = contiguous_placement(spec.moe_layer_ids, spec.num_experts, self.nodes[:num_shards], replicas=replicas)
        self.sync(p)
        return p

    def sync(self, p: Placement) -> None:
        """Make shard s hold exactly p.experts_on(s)."""
        import ray

        held = ray.get([h.held.remote() for h in self.handles[: p.num_shards]], timeout=60)
        calls = []
        for s, h in enumerate(self.handles[: p.num_shards]):
            want, have = set(p.experts_on(s)), {tuple(k) for k in held[s]}
            calls += [h.load.remote(sorted(want - have)), h.free.remote(sorted(have - want))]
        ray.get(calls, timeout=60)

    def remote(self, p: Placement, **kwargs) -> RemoteExperts:
        spec = self.model.spec
        return RemoteExperts(p, self.handles[: p.num_shards], spec.num_layers, spec.num_experts, **kwargs)


@pytest.fixture(scope="module", params=FAMILIES)
def shards(request, ray_cluster, checkpoint_dir):
    import ray

    s = RayShards(str(checkpoint_dir(request.param)))
    yield s
    for h in s.handles:
        ray.kill(h)


@pytest.mark.parametrize("num_shards, replicas", [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2)])
def test_remote_logits_equal_local(shards, num_shards, replicas):
    model = shards.model
    prompts, fed = random_tokens(5, 9, 4, 6), random_tokens(6, 3, 3, 3)
    remote = shards.remote(shards.placement(num_shards, replicas))
    got = run_steps(model, remote, prompts, fed)
    diff = (got - run_steps(model, None, prompts, fed)).abs().max().item()
    assert diff <= TOL, f"{model.spec.family} {num_shards} shards x{replicas}: max abs diff {diff}"
    assert (remote.take_load() == expected_load(model, prompts, fed)).all()
    assert remote.take_timings()["calls"] == 4 * len(model.spec.moe_layer_ids)


def test_killed_shard_routes_via_replica(shards):
    import ray

    model, placement = shards.model, shards.placement(4, 2)
    prompts, fed = random_tokens(7, 8, 5), random_tokens(8, 2, 2)
    expected = run_steps(model, None, prompts, fed)
    remote = shards.remote(placement)
    assert (run_steps(model, remote, prompts, fed) - expected).abs().max() <= TOL
    ray.kill(shards.handles[1], no_restart=True)
    assert (run_steps(model, remote, prompts, fed) - expected).abs().max() <= TOL
    assert remote.dead == {shards.handles[1]._actor_id}

    # during a call: the round trip is in flight when its shard dies
    layer = model.spec.moe_layer_ids[-1]
    x = torch.randn(16, model.spec.hidden_size, generator=torch.Generator().manual_seed(9))
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(16)])
    weights = torch.rand(16, 2)
    remote.dead.clear()  # forget shard 1 died, and kill shard 3 as well: each expert keeps a replica
    pending = remote.run_async(layer, x, ids, weights)
    ray.kill(shards.handles[3], no_restart=True)
    got = pending.result()
    assert (got - model.experts.run(layer, x, ids, weights)).abs().max() <= TOL
    assert shards.handles[1]._actor_id in remote.dead
    shards.handles[1], shards.handles[3] = shards.spawn(1, []), shards.spawn(3, [])


def test_stale_placement_is_refused_and_rerouted(shards):
    """A slice sent under an old placement to a shard that freed the expert comes back refused
    (ExpertNotHeldError) and is re-routed with the newest placement."""
    model = shards.model
    good = shards.placement(2, 1)
    stale = Placement(0, good.shard_names, good.shard_nodes, {k: (1 - v[0],) for k, v in good.expert_to_shards.items()})
    remote = shards.remote(stale)
    layer = model.spec.moe_layer_ids[0]
    x = torch.randn(12, model.spec.hidden_size, generator=torch.Generator().manual_seed(3))
    ids = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(i))[:2] for i in range(12)])
    weights = torch.rand(12, 2)
    pending = remote.run_async(layer, x, ids, weights)
    remote.set_placement(good.with_epoch(1), shards.handles[:2])
    assert (pending.result() - model.experts.run(layer, x, ids, weights)).abs().max() <= TOL
    assert remote.epoch == 1 and not remote.dead


def test_killed_shard_without_replica_is_recreated(shards):
    import ray

    model, placement = shards.model, shards.placement(4, 1)
    recreated = []

    def on_shard_failure(shard):  # what the controller does: a new shard, its experts reloaded
        recreated.append(shard)
        shards.handles[shard] = shards.spawn(shard, placement.experts_on(shard))
        return placement.with_epoch(placement.epoch + len(recreated)), shards.handles[:4]

    remote = shards.remote(placement, on_shard_failure=on_shard_failure)
    prompts, fed = random_tokens(10, 7, 7), random_tokens(11, 2, 2)
    ray.kill(shards.handles[3], no_restart=True)
    got = run_steps(model, remote, prompts, fed)
    assert (got - run_steps(model, None, prompts, fed)).abs().max() <= TOL
    assert recreated == [3] and remote.epoch == 1
