"""The controller: owns the topology, the expert shards, the placement and its epoch, and the load.

`Controller` is the core (it calls Ray, but is handed the expert-shard actor class rather than
importing it); `raymoe.actors.controller.ControllerActor` is the named, detached Ray actor over it
(reach it with `get_or_create_controller` there). Applying a placement is two-phase, so no step
fails or stalls:
  (a) shards load the replicas they gain (the old placement still routes meanwhile);
  (b) the placement is published with epoch + 1 to every registered worker (`set_placement`),
      which switches at its next step; their answers are the acks;
  (c) replicas no longer placed are freed (workers that acked route no rows to them; a straggler's
      stale slice is refused with ExpertNotHeldError and re-routed by the worker).
Nodes joining and leaving (`NodeSync`, node_sync.py) change the set of shards the same way.
Every placement change is recorded in `events` (kind, node, reason, epoch), shown by `status()`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, fields

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raymoe.cluster.colocation import DispatchCounts
from raymoe.cluster.membership import serving_topology
from raymoe.cluster.node_sync import NodeSync
from raymoe.cluster.placement import Placement, contiguous_placement, speed_weighted_placement
from raymoe.cluster.topology import Topology
from raymoe.engine.spec.speculator import SpecStats
from raymoe.errors import ConfigError, RaymoeError
from raymoe.model.spec import load_spec

logger = logging.getLogger(__name__)

CONTROLLER_NAME = "raymoe-controller"
HEAD_RESOURCE = "node:__internal_head__"  # Ray gives it to the head node only
CALL_TIMEOUT_S = 120.0
EVENTS_KEPT = 200  # the most recent placement changes `status()` shows
DEFAULT_NODE_WATCH_S = 2.0  # how often the controller reads Ray's node table


class Controller(NodeSync):
    """Expert shards (`shards_per_node` on every live node) and the placement they carry out."""

    def __init__(
        self,
        model_path: str,
        shard_actor,
        *,
        dtype: str = "float32",
        shards_per_node: int = 1,
        num_shards: int | None = None,
        replicas: int = 1,
        extra_replicas: int = 2,
        load_window_s: float = 60.0,
        shard_num_cpus: float = 0.0,
        policy: str | None = None,
        device: str = "cpu",
        shard_num_gpus: float = 0.0,
    ):
        if shards_per_node < 1:
            raise ConfigError(f"shards_per_node={shards_per_node}; use 1 or more")
        self.model_path, self.dtype, self.shard_num_cpus = str(model_path), dtype, shard_num_cpus
        # shards compute on the engine's device only when they reserve a GPU share; else on their CPUs
        self.shard_device = device if shard_num_gpus > 0 else "cpu"
        self.shard_num_gpus = shard_num_gpus
        self.shard_actor = shard_actor  # the Ray actor class of expert shards (`raymoe.actors.expert_shard`)
        self.spec = load_spec(model_path)
        self.extra_replicas, self.load_window_s = extra_replicas, load_window_s
        self.policy = _checked_policy(policy)
        self.rebalances: list[dict] = []  # when and why the placement changed
        self.events: deque = deque(maxlen=EVENTS_KEPT)  # node and placement changes, with reasons
        self.shards_per_node = shards_per_node
        self._drained: set[str] = set()  # nodes the operator asked to drain
        self._membership = threading.Lock()  # one node sync at a time
        self.topology = serving_topology(ray.nodes())  # the serving nodes, refreshed on every change
        self._members = self.topology  # the nodes placement last accounted for (NodeSync's baseline)
        nodes = shard_nodes(self.topology, shards_per_node, num_shards)
        self._names = itertools.count(len(nodes))  # numbers of shards started later
        self._state = threading.Lock()  # guards placement, handles, held, workers, load
        self._applying = threading.RLock()  # one placement change at a time (plan and apply under it)
        self._target: Placement | None = None  # the placement being applied, while it is
        self._placement = contiguous_placement(
            self.spec.moe_layer_ids,
            self.spec.num_experts,
            [n.node_id for n in nodes],
            replicas=min(replicas, len(nodes)),  # copies of an expert sit on distinct shards
            shard_weights=[n.speed for n in nodes],
        )
        self._held = [set(self._placement.experts_on(s)) for s in range(len(nodes))]
        self._handles = [self._spawn(n.node_id, sorted(h)) for n, h in zip(nodes, self._held)]
        ray.get([h.ping.remote() for h in self._handles], timeout=CALL_TIMEOUT_S)
        self._workers: dict[str, object] = {}
        self._reports: deque = deque()  # (time, worker id, [layers, experts] counts)
        self._requests: dict[str, RequestRouting] = {}  # request id -> its reported routing
        self._planned_at: float | None = None  # monotonic time of the last plan from the reports
        self._dispatch: dict[str, dict] = {}  # worker id -> its last dispatch counts (cumulative)

    # --- state -----------------------------------------------------------------------------------
    def placement(self) -> tuple[Placement, list]:
        with self._state:
            return self._placement, list(self._handles)

    def shard_speeds(self) -> list[float]:
        return [self._speed(n) for n in self._placement.shard_nodes]

    def _speed(self, node_id: str) -> float:
        return self.topology.speed(node_id) if self.topology.is_alive(node_id) else 1.0

    def status(self) -> dict:
        p, _ = self.placement()
        return {
            "epoch": p.epoch,
            "shards": [
                {"name": name, "node_id": node, "num_physical": p.num_physical(s), "speed": self._speed(node)}
                for s, (name, node) in enumerate(zip(p.shard_names, p.shard_nodes))
            ],
            "nodes": [{"node_id": n.node_id, "address": n.address, "speed": n.speed} for n in self.topology.nodes],
            "drained": sorted(self._drained),
            "workers": sorted(self._workers),
            "dispatch": self.dispatch_by_node(),
            "speculative": self.speculative(),
            "events": list(self.events),  # recent scaling and placement decisions, oldest first
        }

    def _event(self, kind: str, node_id: str | None, reason: str, epoch: int, **extra) -> dict:
        """Record a decision: kind is node_joined, node_left, rebalance or shard_recreated."""
        event = {"time": time.time(), "kind": kind, "node_id": node_id, "reason": reason, "epoch": epoch, **extra}
        self.events.append(event)
        return event

    def register_worker(self, worker_id: str, handle) -> Placement:
        """A worker that wants placement updates (`handle.set_placement.remote(placement, handles)`)."""
        with self._state:
            self._workers[worker_id] = handle
            return self._placement

    def unregister_worker(self, worker_id: str) -> None:
        with self._state:
            self._workers.pop(worker_id, None)

    def speculative(self) -> dict:
        """Speculative decoding's counters summed over the decode workers that reported, with the
        acceptance rate and mean accepted length of the sum."""
        with self._state:
            reports = [r["speculative"] for r in self._dispatch.values() if "speculative" in r]
        return SpecStats.total(reports).as_dict()

    def dispatch_by_node(self) -> dict[str, dict]:
        """node id -> where its workers' routed rows went, summed over the workers that reported:
        rows run in process, crossing a process, crossing a node, per token, local activation rate."""
        totals: dict[str, DispatchCounts] = {}
        with self._state:
            reports = list(self._dispatch.values())
        for r in reports:
            t = totals.setdefault(r["node_id"], DispatchCounts())
            for name in fields(DispatchCounts):
                setattr(t, name.name, getattr(t, name.name) + r[name.name])
        return {node: t.summary(len(self.spec.moe_layer_ids)) for node, t in totals.items()}

    # --- load --------------------------------------------------------------------------------------
    def report_load(self, worker_id: str, counts, dispatch: dict | None = None) -> None:
        """counts [layers, experts]: token-expert pairs the worker routed since its last report;
        dispatch: its `RemoteExperts.count_summary()` (cumulative: where its rows went)."""
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (self.spec.num_layers, self.spec.num_experts):
            raise ConfigError(f"load shape {counts.shape}; expected [layers, experts] = "
                              f"{(self.spec.num_layers, self.spec.num_experts)}")  # fmt: skip
        with self._state:
            self._reports.append((time.monotonic(), worker_id, counts))
            if dispatch is not None:
                self._dispatch[worker_id] = dispatch

    def report_requests(self, node_id: str, routing: dict) -> None:
        """routing: request id -> `[moe layers, experts]` pairs each running request routed on a
        worker of `node_id` since that worker's last report; summed per request, in all and since
        the last plan (the grouping policies' request profiles)."""
        now = time.monotonic()
        with self._state:
            for rid, counts in routing.items():
                counts = np.asarray(counts, dtype=np.float64)
                seen = self._requests.get(rid)
                if seen is None:
                    self._requests[rid] = RequestRouting(now, node_id, counts.copy(), counts.copy())
                else:
                    seen.at, seen.node_id = now, node_id
                    seen.total += counts
                    seen.recent += counts

    def request_profiles(self, recent: bool = False, restart: bool = False) -> tuple[np.ndarray, list[str]]:
        """(`[requests, moe layers, experts]` per-token expert shares, node of each) of the requests
        reported within the window: all their routing, or (recent) the routing since the last plan;
        a request's node is where its latest report came from. restart: a plan reads them now, and
        the next `recent` window starts here."""
        with self._state:
            horizon = time.monotonic() - self.load_window_s
            self._requests = {r: v for r, v in self._requests.items() if v.at >= horizon}
            entries = [((v.recent if recent else v.total).copy(), v.node_id) for v in self._requests.values()]
            if restart:
                for v in self._requests.values():
                    v.recent[:] = 0
        entries = [(c, n) for c, n in entries if c.sum() > 0]
        shape = (0, len(self.spec.moe_layer_ids), self.spec.num_experts)
        if not entries:
            return np.zeros(shape), []
        pairs_per_token = self.spec.top_k * len(self.spec.moe_layer_ids)  # as sequence_profiles: per token
        profiles = np.stack([c * pairs_per_token / c.sum() for c, _ in entries])
        return profiles, [n for _, n in entries]

    def load(self, since: float | None = None) -> np.ndarray:
        """[layers, experts] token-expert pairs reported within the sliding window (and since
        `since`, a monotonic time, when given)."""
        total = np.zeros((self.spec.num_layers, self.spec.num_experts), dtype=np.int64)
        with self._state:
            horizon = time.monotonic() - self.load_window_s
            while self._reports and self._reports[0][0] < horizon:
                self._reports.popleft()
            for at, _, counts in self._reports:
                if since is None or at >= since:
                    total += counts
        return total

    # --- placement changes -------------------------------------------------------------------------
    def rebalance(self, extra_replicas: int | None = None, policy: str | None = None, reason: str = "requested",
                  recent: bool = False) -> int:  # fmt: skip
        """A new placement from the windowed load, applied; returns its epoch.

        policy: a `raymoe.policies.registry.PolicyName` (the controller's own by default); None
        and no default: the built-in speed-weighted greedy (hot experts replicated, fast shards fuller).
        recent: plan from the reports since the last plan only (a step-aligned re-plan's window)."""
        policy = policy or self.policy
        with self._applying:  # planned over the shards it is applied to
            current, _ = self.placement()
            new = self.plan(current, extra_replicas, policy, recent)
            self.rebalances.append({"time": time.time(), "policy": policy or "speed_weighted", "reason": reason})
            epoch = self.apply(new)
        self._event("rebalance", None, f"{reason} ({policy or 'speed_weighted'})", epoch)
        return epoch

    def plan(self, current: Placement, extra_replicas: int | None = None, policy: str | None = None,
             recent: bool = False) -> Placement:  # fmt: skip
        """A placement over `current`'s shards from the windowed load (since the last plan, if
        `recent`) and the shards' node speeds."""
        extra = self.extra_replicas if extra_replicas is None else extra_replicas
        speeds = [self._speed(n) for n in current.shard_nodes]
        since, self._planned_at = (self._planned_at if recent else None), time.monotonic()
        profiles, nodes = self.request_profiles(recent, restart=True)
        if policy is not None:
            from raymoe.cluster.policy_bridge import plan_placement

            by_node = dict(zip(current.shard_nodes, speeds))
            return plan_placement(policy, self.load(since), self.spec.moe_layer_ids, current, by_node, extra,
                                  profiles, nodes)  # fmt: skip
        return speed_weighted_placement(
            self.load(since), self.spec.moe_layer_ids, current.shard_nodes, speeds,
            extra_replicas=extra, current=current, shard_names=current.shard_names,
        )  # fmt: skip

    def apply(self, new: Placement) -> int:
        """Two-phase switch to `new` (same shards); returns its epoch."""
        with self._applying:
            with self._state:
                if new.num_shards != len(self._handles):
                    raise ConfigError(
                        f"placement has {new.num_shards} shards; the controller runs {len(self._handles)}: "
                        "build it over the current placement's shard_nodes"
                    )
                new.check_covers(self.spec.moe_layer_ids, self.spec.num_experts)
                self._target, handles = new, list(self._handles)
                gain = [sorted(set(new.experts_on(s)) - self._held[s]) for s in range(len(handles))]
            started = _log_move(self._placement.epoch + 1, gain)
            self._call([h.load.remote(g) for h, g in zip(handles, gain) if g])
            _log_moved(self._placement.epoch + 1, started)
            with self._state:
                for s, g in enumerate(gain):
                    self._held[s] |= set(g)
                self._placement = new.with_epoch(self._placement.epoch + 1)
                self._target = None
            self._publish(wait=True)
            self._free_unplaced()
            return self._placement.epoch

    def reshape(self, new: Placement, keep: list[int], retire: list[int]) -> int:
        """Two-phase switch to `new`, whose shards are the current shards `keep` (in order) then new
        ones (started here on their nodes, holding their experts before anything is published);
        shards `retire` are stopped once every worker has acked. Returns the new epoch."""
        new.check_covers(self.spec.moe_layer_ids, self.spec.num_experts)
        with self._applying:
            with self._state:
                old_held = list(self._held)
            added = list(range(len(keep), new.num_shards))
            spawned = [self._spawn(new.shard_nodes[s], new.experts_on(s)) for s in added]
            gain = [sorted(set(new.experts_on(i)) - old_held[s]) for i, s in enumerate(keep)]
            started = _log_move(self._placement.epoch + 1, gain + [new.experts_on(s) for s in added])
            try:
                self._call([h.ping.remote() for h in spawned])  # their constructors loaded the weights
                self._call([self._handles[s].load.remote(g) for s, g in zip(keep, gain) if g])
            except Exception:
                for h in spawned:
                    ray.kill(h)
                raise
            _log_moved(self._placement.epoch + 1, started)
            with self._state:  # by index: a shard re-created meanwhile keeps its index
                retired = [self._handles[s] for s in retire]
                self._handles = [self._handles[s] for s in keep] + spawned
                self._held = [self._held[s] | set(g) for s, g in zip(keep, gain)] + [
                    set(new.experts_on(s)) for s in added
                ]
                self._placement = new.with_epoch(self._placement.epoch + 1)
            self._publish(wait=True)
            self._free_unplaced()
            for handle in retired:
                ray.kill(handle)
            return self._placement.epoch

    def shard_failed(self, shard: int) -> tuple[Placement, list]:
        """A worker saw `shard` die: re-create it (on its node if alive, else the fastest live node)
        with its experts reloaded from the checkpoint; publish epoch + 1. Idempotent."""
        with self._state:
            if shard >= len(self._handles):  # an index from before the shards changed: take the new ones
                return self._placement, list(self._handles)
            handle = self._handles[shard]
        if _is_alive(handle):
            return self.placement()
        with self._state:
            if self._handles[shard] is handle:
                self._recreate(shard)
                node, epoch = self._placement.shard_nodes[shard], self._placement.epoch
                self._event("shard_recreated", node, f"{self._placement.shard_names[shard]} died", epoch)
        self._publish(wait=False)
        return self.placement()

    # --- internals ---------------------------------------------------------------------------------
    def _recreate(self, shard: int) -> None:
        experts = set(self._placement.experts_on(shard))
        if self._target is not None:
            experts |= set(self._target.experts_on(shard))  # mid-apply: it must hold both epochs' set
        node, handle = self._spawn_somewhere(self._placement.shard_nodes[shard], sorted(experts))
        nodes = list(self._placement.shard_nodes)
        nodes[shard] = node
        self._handles[shard], self._held[shard] = handle, experts
        self._placement = Placement(self._placement.epoch + 1, self._placement.shard_names, tuple(nodes),
                                    self._placement.expert_to_shards)  # fmt: skip

    def _spawn_somewhere(self, preferred: str, experts: list) -> tuple[str, object]:
        """A ready shard holding `experts`: on `preferred` if it serves, else the fastest serving
        node. A node that dies under the new shard (Ray may not know yet) is skipped for the next."""
        serving = serving_topology(ray.nodes(), self._drained)
        others = [n.node_id for n in serving.fastest_first() if n.node_id != preferred]
        candidates = ([preferred] if serving.is_alive(preferred) else []) + others
        for node in candidates:
            handle = self._spawn(node, experts)
            try:
                ray.get(handle.ping.remote(), timeout=CALL_TIMEOUT_S)
                return node, handle
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                ray.kill(handle)
        raise ShardStartError(f"no serving node could start a shard (tried {len(candidates)})")

    def _spawn(self, node_id: str, experts: list):
        strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
        options = dict(num_cpus=self.shard_num_cpus, num_gpus=self.shard_num_gpus, scheduling_strategy=strategy)
        return self.shard_actor.options(**options).remote(self.model_path, experts, self.dtype, self.shard_device)

    def _publish(self, wait: bool) -> None:
        """Send the placement to every worker; with `wait`, drop workers that did not ack."""
        with self._state:
            placement, handles, workers = self._placement, list(self._handles), dict(self._workers)
        acks = {wid: w.set_placement.remote(placement, handles) for wid, w in workers.items()}
        if not wait:
            return
        for wid, ref in acks.items():
            try:
                ray.get(ref, timeout=CALL_TIMEOUT_S)
            except ray.exceptions.RayError:
                self.unregister_worker(wid)

    def _free_unplaced(self) -> None:
        with self._state:
            handles = list(self._handles)
            drop = [sorted(self._held[s] - set(self._placement.experts_on(s))) for s in range(len(handles))]
            for s, d in enumerate(drop):
                self._held[s] -= set(d)
        self._call([h.free.remote(d) for h, d in zip(handles, drop) if d])

    @staticmethod
    def _call(refs: list) -> list:
        return ray.get(refs, timeout=CALL_TIMEOUT_S)


@dataclass
class RequestRouting:
    """A running request's routing as its workers reported it: `[moe layers, experts]` pairs."""

    at: float  # monotonic time of its latest report
    node_id: str  # the node that report came from (where it runs)
    total: np.ndarray  # all reported
    recent: np.ndarray  # reported since the last plan


class ShardStartError(RaymoeError):
    """No live node could take a re-created expert shard."""


def _log_move(epoch: int, gains: list[list]) -> float | None:
    """Log the expert weights a placement change loads; its start time (None: nothing moves)."""
    moved = sum(len(g) for g in gains)
    if not moved:
        return None
    logger.info("placement epoch %d: loading %d experts onto %d shards", epoch, moved, sum(1 for g in gains if g))
    return time.perf_counter()


def _log_moved(epoch: int, started: float | None) -> None:
    if started is not None:
        logger.info("placement epoch %d: experts loaded in %.1f s", epoch, time.perf_counter() - started)


def _checked_policy(policy: str | None) -> str | None:
    if policy is None:
        return None
    from typing import get_args

    from raymoe.policies.registry import PolicyName

    if policy not in get_args(PolicyName):
        raise ConfigError(f"placement policy {policy!r} is unknown; use one of {get_args(PolicyName)}")
    return policy


def shard_nodes(topology: Topology, shards_per_node: int, num_shards: int | None) -> list:
    """The node of every shard: `shards_per_node` on each live node, or exactly `num_shards`
    dealt over the nodes fastest first."""
    if num_shards is None:
        return [n for n in topology.nodes for _ in range(shards_per_node)]
    if num_shards < 1:
        raise ConfigError(f"num_shards={num_shards}; use 1 or more")
    fastest = topology.fastest_first()
    return [fastest[i % len(fastest)] for i in range(num_shards)]


def _is_alive(handle) -> bool:
    try:
        ray.get(handle.ping.remote(), timeout=10.0)
        return True
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False
