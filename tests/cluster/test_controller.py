"""The controller on a real 3-node Ray cluster (speeds 1, 2, 1): speed-weighted placement, load
statistics, rebalancing while a worker decodes, and a killed shard re-created; greedy tokens and
logits always equal to the one-process model."""

import sys
import threading
import time
import uuid

import numpy as np
import pytest
import torch

from raymoe.actors.controller import get_or_create_controller, shutdown_controller
from raymoe.cluster.controller import CONTROLLER_NAME
from raymoe.cluster.dispatch import RemoteExperts
from raymoe.cluster.placement import contiguous_placement
from raymoe.cluster.topology import Topology
from raymoe.model.model import load_model
from raymoe.model.paged import AttentionBatch, allocate_kv_cache

BLOCK = 4
TOL = 1e-5


def greedy(model, experts, prompts: list[list[int]], num_tokens: int, on_step=None) -> list[list[int]]:
    """Batched greedy decoding of `prompts` (one prefill step, then one token per step)."""
    cache = allocate_kv_cache(model.kv_layout(), 8 * len(prompts), BLOCK, torch.float32)
    tables = [list(range(8 * b, 8 * b + 8)) for b in range(len(prompts))]
    chunk, done, out = prompts, [0] * len(prompts), [[] for _ in prompts]
    for step in range(num_tokens):
        lens = [len(c) for c in chunk]
        ctx = [d + n for d, n in zip(done, lens)]
        hidden = model.forward(torch.tensor([t for c in chunk for t in c]), AttentionBatch.build(lens, ctx, tables, BLOCK), cache,
                               experts=experts)  # fmt: skip
        ends = torch.tensor(lens).cumsum(0) - 1
        next_ids = model.compute_logits(hidden[ends]).argmax(-1).tolist()
        for b, token in enumerate(next_ids):
            out[b].append(token)
        chunk, done = [[t] for t in next_ids], ctx
        if on_step:
            on_step(step)
    return out


def forward_logits(model, experts, ids: list[int]) -> torch.Tensor:
    cache = allocate_kv_cache(model.kv_layout(), 8, BLOCK, torch.float32)
    batch = AttentionBatch.build([len(ids)], [len(ids)], [list(range(8))], BLOCK)
    return model.compute_logits(model.forward(torch.tensor(ids), batch, cache, experts=experts))


def prompts_for(seed: int, *lengths: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in lengths]


class StepWorker:
    """A decode-like worker: the model's attention here, experts on the controller's shards."""

    def __init__(self, path: str, controller):
        import ray

        torch.set_num_threads(1)
        self.model = load_model(path, load_experts=False)
        placement, handles = ray.get(controller.placement.remote(), timeout=60)
        spec = self.model.spec

        def on_shard_failure(shard):
            return ray.get(controller.shard_failed.remote(shard), timeout=120)

        self.experts = RemoteExperts(placement, handles, spec.num_layers, spec.num_experts,
                                     on_shard_failure=on_shard_failure)  # fmt: skip
        self.steps_done = 0
        self.step_reached = threading.Condition()
        self.placement_came = threading.Event()

    def set_placement(self, placement, handles) -> int:
        self.experts.set_placement(placement, handles)
        self.placement_came.set()
        return placement.epoch

    def wait_step(self, step: int) -> None:
        with self.step_reached:
            self.step_reached.wait_for(lambda: self.steps_done > step, timeout=60)

    def decode(self, prompts, num_tokens: int, hold_after: int):
        """Greedy tokens and the epoch each step ran with; after step `hold_after` it waits (bounded)
        for a placement to be published, so the switch lands mid-sequence."""
        epochs = []

        def on_step(step):
            epochs.append(self.experts.epoch)
            with self.step_reached:
                self.steps_done = step + 1
                self.step_reached.notify_all()
            if step == hold_after:
                self.placement_came.wait(timeout=60)

        return greedy(self.model, self.experts, prompts, num_tokens, on_step), epochs


@pytest.fixture(scope="module")
def path(checkpoint_dir):
    return str(checkpoint_dir("mixtral"))


@pytest.fixture(scope="module")
def controller(ray_cluster, path):

    namespace = f"raymoe-test-{uuid.uuid4().hex[:8]}"
    handle = get_or_create_controller(path, namespace=namespace, extra_replicas=2)
    handle.namespace = namespace
    yield handle
    shutdown_controller(namespace)  # idempotent: the last test shuts it down already


@pytest.fixture(scope="module")
def model(path):
    return load_model(path)


def remote_from(controller, model) -> RemoteExperts:
    import ray

    placement, handles = ray.get(controller.placement.remote(), timeout=60)

    def on_shard_failure(shard):
        return ray.get(controller.shard_failed.remote(shard), timeout=120)

    spec = model.spec
    return RemoteExperts(placement, handles, spec.num_layers, spec.num_experts, on_shard_failure=on_shard_failure)


def test_topology_reads_speeds(ray_cluster):
    topology = Topology.from_ray()
    assert sorted(n.speed for n in topology.nodes) == [1.0, 1.0, 2.0]
    assert sorted(n.num_cpus for n in topology.nodes) == [2.0, 3.0, 4.0]
    assert topology.fastest_first()[0].num_cpus == 3.0 and all(n.memory_bytes > 0 for n in topology.nodes)


def test_controller_is_named_and_detached(controller, path):
    import ray

    same = get_or_create_controller(path, namespace=controller.namespace)
    assert same._actor_id == controller._actor_id
    assert ray.get_actor(CONTROLLER_NAME, namespace=controller.namespace)._actor_id == controller._actor_id


def test_faster_node_holds_more_experts(controller):
    import ray

    shards = ray.get(controller.status.remote(), timeout=60)["shards"]
    fast = [s["num_physical"] for s in shards if s["speed"] == 2]
    slow = [s["num_physical"] for s in shards if s["speed"] == 1]
    assert len(fast) == 1 and len(slow) == 2 and fast[0] > max(slow)


def test_load_counts_match_routed_tokens(controller, model):
    import ray

    remote = remote_from(controller, model)
    ids = prompts_for(1, 24)[0]
    before = np.array(ray.get(controller.load.remote(), timeout=60))
    got = forward_logits(model, remote, ids)
    assert (got - forward_logits(model, None, ids)).abs().max() <= TOL
    routed = remote.take_load()
    ray.get(controller.report_load.remote("driver", routed.tolist()), timeout=60)
    after = np.array(ray.get(controller.load.remote(), timeout=60))
    assert (after - before == routed).all() and routed.sum() == 24 * 2 * len(model.spec.moe_layer_ids)


def test_rebalance_replicates_hot_experts_on_fast_node(controller, model):
    import ray

    hot = np.zeros((model.spec.num_layers, model.spec.num_experts), dtype=np.int64)
    hot[:, 5] = 10_000
    ray.get(controller.report_load.remote("driver", hot.tolist()), timeout=60)
    epoch = ray.get(controller.rebalance.remote(), timeout=120)
    placement, _ = ray.get(controller.placement.remote(), timeout=60)
    assert placement.epoch == epoch and all(len(placement.shards_for(l, 5)) == 3 for l in model.spec.moe_layer_ids)
    status = ray.get(controller.status.remote(), timeout=60)
    assert status["events"][-1] | {"time": 0} == {"time": 0, "kind": "rebalance", "node_id": None,
                                                  "reason": "requested (speed_weighted)", "epoch": epoch}  # fmt: skip
    speeds = {s["name"]: s["speed"] for s in status["shards"]}
    fast = next(i for i, n in enumerate(placement.shard_names) if speeds[n] == 2)
    assert placement.num_physical(fast) == max(placement.num_physical(s) for s in range(placement.num_shards))
    remote = remote_from(controller, model)
    ids = prompts_for(2, 20)[0]
    assert (forward_logits(model, remote, ids) - forward_logits(model, None, ids)).abs().max() <= TOL


def test_apply_while_decoding_keeps_tokens(controller, model, path):
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker class lives in this test module
    worker = ray.remote(StepWorker).options(num_cpus=0, max_concurrency=3).remote(path, controller)
    ray.get(controller.register_worker.remote("w0", worker), timeout=60)
    prompts = prompts_for(3, 5, 9, 3, 7)
    expected = greedy(model, None, prompts, 8)
    running = worker.decode.remote(prompts, 8, 2)
    ray.get(worker.wait_step.remote(2), timeout=120)
    current, _ = ray.get(controller.placement.remote(), timeout=60)
    spec = model.spec
    moved = contiguous_placement(spec.moe_layer_ids, spec.num_experts, current.shard_nodes, replicas=2,
                                 shard_names=current.shard_names)  # fmt: skip
    epoch = ray.get(controller.apply.remote(moved), timeout=120)
    tokens, epochs = ray.get(running, timeout=120)
    assert tokens == expected
    assert epochs[:3] == [current.epoch] * 3 and epochs[-1] == epoch == current.epoch + 1
    ray.get(controller.unregister_worker.remote("w0"), timeout=60)
    ray.kill(worker)


def test_killed_shard_is_recreated_by_controller(controller, model):
    import ray

    current, handles = ray.get(controller.placement.remote(), timeout=60)
    single = contiguous_placement(model.spec.moe_layer_ids, model.spec.num_experts, current.shard_nodes,
                                  shard_names=current.shard_names)  # fmt: skip
    epoch = ray.get(controller.apply.remote(single), timeout=120)
    remote = remote_from(controller, model)
    prompts = prompts_for(4, 6, 4)
    expected = greedy(model, None, prompts, 4)
    ray.kill(handles[2], no_restart=True)
    assert greedy(model, remote, prompts, 4) == expected
    placement, new_handles = ray.get(controller.placement.remote(), timeout=60)
    assert placement.epoch == epoch + 1 == remote.epoch
    assert new_handles[2]._actor_id != handles[2]._actor_id
    assert placement.shard_nodes == current.shard_nodes  # the node is alive: re-created there
    assert sorted(map(tuple, ray.get(new_handles[2].held.remote(), timeout=60))) == placement.experts_on(2)
    event = ray.get(controller.status.remote(), timeout=60)["events"][-1]
    assert (event["kind"], event["node_id"], event["epoch"]) == ("shard_recreated", current.shard_nodes[2], epoch + 1)


def _dies(handle, within_s: float = 30.0) -> bool:
    """ray.kill is asynchronous: a call right after it may still be answered."""
    import ray

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.ping.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.2)
    return False


def test_shutdown_controller_stops_shards(controller):
    import ray

    _, handles = ray.get(controller.placement.remote(), timeout=60)
    assert shutdown_controller(controller.namespace)
    assert _dies(handles[0]), "a shard still answers 30 s after shutdown"
    deadline = time.monotonic() + 30  # ray.kill is asynchronous: the name frees a moment later
    while shutdown_controller(controller.namespace) and time.monotonic() < deadline:
        time.sleep(0.2)
    with pytest.raises(ValueError):
        ray.get_actor(CONTROLLER_NAME, namespace=controller.namespace)
