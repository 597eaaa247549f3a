"""Speculative token placement live, on the 3-node local cluster with a routing-replay model:
requests seated by their prompt's routing, and moved mid-decode (KV through the pool), return the
one-process engine's tokens; so does every placement policy's plan."""

import itertools

import pytest
import ray

from checkpoints import engine_greedy
from raymoe.actors.cluster import MoECluster
from raymoe.cluster.cluster import ClusterConfig
from raymoe.cluster.policy_bridge import placement_from_plan
from raymoe.engine.llm_engine import EngineConfig
from raymoe.engine.sampling_params import SamplingParams
from raymoe.model.replay import replay_prompt, write_replay_checkpoint
from raymoe.policies.registry import get_policy
from raymoe.policies.stats import Calibration
from raymoe.policies.topology import Topology
from raymoe.replay_measure import dispatch_counts
from tests.policies.tiny import write_tiny_trace

NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
ENGINE = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, kv_cache_bytes=8 << 20)
SHAPE = dict(num_sequences=6, num_tokens=30, num_layers=3, num_experts=8, top_k=2)


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    root = tmp_path_factory.mktemp("seating")
    trace = write_tiny_trace(root / "trace", **SHAPE)
    path = write_replay_checkpoint(root / "model", root / "trace", hidden_size=32)
    prompts = [replay_prompt(trace, s, 6 + s, 512) for s in range(6)]
    return trace, path, prompts, engine_greedy(path, prompts, GREEDY, ENGINE)


@pytest.fixture(scope="module")
def cluster(ray_cluster, replay):
    _, path, _, _ = replay
    nodes = tuple(n["NodeID"] for n in ray.nodes() if n["Alive"])
    config = ClusterConfig(engine=ENGINE, namespace="seating", token_placement=True, decode_nodes=nodes,
                           worker_num_cpus=0.1)  # fmt: skip
    cluster = MoECluster(path, config)
    yield cluster
    cluster.shutdown()


def test_seated_requests_return_one_process_tokens(cluster, replay):
    _, _, prompts, expected = replay
    before = cluster.router.seating.num_seated
    assert [o.token_ids for o in cluster.generate(prompts, GREEDY)] == expected
    assert cluster.router.seating.num_seated - before == len(prompts)
    assert not cluster.router.seat_of  # every seat freed when its request finished


def test_reseated_requests_return_one_process_tokens(cluster, replay):
    """Every running request moves to the next worker after its first decoded tokens (the workers
    hold there until all have moved, so none finishes first)."""
    _, _, prompts, expected = replay
    router = cluster.router
    requests = cluster._requests(prompts, GREEDY)
    got = {r.request_id: [] for r in requests}
    moved, tracked, before = set(), None, router.num_reseated
    counts, tails = dispatch_counts(cluster), _tail_blocks(cluster)
    ray.get([w.hold.remote(3) for w in cluster.decode])
    stream = router.run(requests)
    for delta in stream:
        got[delta.request_id].extend(delta.token_ids)
        if len(got[delta.request_id]) >= 3 and delta.request_id not in moved and not delta.finished:
            moved.add(delta.request_id)
            tracked = tracked or stream.gi_frame.f_locals["tracked"]
            t = tracked[delta.request_id]
            router._move(t, router.decode[(router.decode.index(t.worker) + 1) % len(router.decode)])
            if len(moved) == len(prompts):
                ray.get([w.hold.remote(None) for w in cluster.decode])
    assert [got[r.request_id] for r in requests] == expected
    assert router.num_reseated - before == len(prompts)
    # a moved sequence's partial KV block went with it (2 of 3 outputs computed), so no token ran twice
    assert _tail_blocks(cluster) - tails == sum((len(p) + 2) % ENGINE.block_size > 0 for p in prompts)
    assert _forwards(counts, dispatch_counts(cluster)) == sum(len(p) % ENGINE.block_size + NEW_TOKENS - 1
                                                              for p in prompts)  # fmt: skip


def _tail_blocks(cluster) -> int:
    return sum(s["tail_blocks"] for s in ray.get([w.stats.remote() for w in cluster.decode]))


def _forwards(before: list[dict], after: list[dict]) -> float:
    """Tokens the decode workers ran through the model between two `dispatch_counts`."""
    return sum(b["token_layers"] - a["token_layers"] for a, b in zip(before, after)) / SHAPE["num_layers"]


@pytest.mark.parametrize("policy", ["contiguous", "eplb_global", "grouping"])
def test_every_policy_replays_the_same_outputs(cluster, replay, policy):
    trace, _, prompts, expected = replay
    placement, _ = ray.get(cluster.controller.placement.remote())
    nodes = list(dict.fromkeys(placement.shard_nodes))
    plan = get_policy(policy).build(Calibration.from_trace(trace), Topology(len(nodes), 4))
    new = placement_from_plan(plan, cluster.spec.moe_layer_ids, placement, nodes)
    epoch = ray.get(cluster.controller.apply.remote(new))
    assert epoch == placement.epoch + 1
    assert [o.token_ids for o in cluster.generate(prompts, GREEDY)] == expected


def test_step_aligned_replans_hold_reseat_and_recompute_nothing(cluster, replay):
    """`raymoe replay`'s re-plans: the decode workers hold before decode steps 4 and 8 while the
    controller re-plans (regrouping, from the routing since the last re-plan) and the front
    re-seats; moved sequences take their partial KV block along, so no token runs twice."""
    from raymoe.replay_run import generate

    _, _, prompts, expected = replay
    before = dispatch_counts(cluster)
    outputs, replans, _, windows = generate(cluster, prompts, GREEDY, 4, "regrouping", 4, step_aligned=True)
    assert outputs == expected
    assert replans == [4, 8] and len(windows) == 2
    # each request: its prompt's partial block at the handoff, then 11 decode tokens, once
    assert _forwards(before, dispatch_counts(cluster)) == sum(len(p) % ENGINE.block_size + NEW_TOKENS - 1
                                                              for p in prompts)  # fmt: skip
    assert not any(ray.get([w.flush_reports.remote() for w in cluster.decode]))  # the holds were lifted
