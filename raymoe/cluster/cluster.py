"""`ClusterConfig`: the shape of a disaggregated cluster (shards, workers, microbatches, pools);
`raymoe.actors.cluster.MoECluster` starts one from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from raymoe.engine.llm_engine import EngineConfig
from raymoe.errors import ConfigError
from raymoe.policies.registry import PolicyName

# how a decode worker's expert rows reach shards on other processes: Ray actor calls (CPU default), or
# collective send/recv (`transport_nccl`): "nccl" on GPUs, "gloo" its CPU twin (one group per process)
TransportName = Literal["actor_call", "nccl", "gloo"]
# how a prompt's KV blocks reach the decode worker: through the prefill node's KV pool (host staging),
# or straight from the prefill worker by Ray Direct Transport: "nccl" between GPUs, "gloo" on CPU
KVTransportName = Literal["pool", "gloo", "nccl"]


@dataclass(frozen=True)
class ClusterConfig:
    shards_per_node: int = 1  # expert shards on every node (the controller spreads experts by speed)
    num_shards: int | None = None  # or exactly this many shards, dealt over nodes fastest first
    replicas: int = 1  # copies of every expert (>1: a dead shard is routed around at once)
    num_prefill_workers: int = 1
    num_decode_workers: int = 1
    num_microbatches: int = 1  # decode step split for expert round trip / attention overlap
    colocate_experts: bool = True  # workers run the experts placed on their own node in process
    engine: EngineConfig = field(default_factory=EngineConfig)
    kv_pool_bytes: int = 256 << 20  # per node
    # Ray resources pinning workers (e.g. {"node_b": 0.01}); None: anywhere
    prefill_resources: dict | None = None
    decode_resources: dict | None = None
    worker_num_cpus: float = 0.5
    worker_num_gpus: float = 0.0  # per prefill/decode worker (fractional: several share a GPU)
    shard_num_gpus: float = 0.0  # per expert shard; > 0: shards compute on engine.device too (else on CPU)
    namespace: str = "raymoe"
    placement_policy: PolicyName | None = None  # None: the controller's built-in speed-weighted greedy
    rebalance_interval_s: float | None = None  # re-plan from the reported load this often (None: on demand)
    node_watch_s: float | None = 2.0  # follow nodes joining and leaving (None: only on sync_nodes calls)
    # seat requests by their predicted experts (None: when the placement policy is a token-placement one)
    token_placement: bool | None = None
    reseat_every_s: float | None = None  # move running requests whose routing drifted, this often
    decode_nodes: tuple[str, ...] | None = None  # one decode worker pinned on each of these node ids
    transport: TransportName = "actor_call"  # decode workers' rows to shards (prefill: actor calls)
    kv_transport: KVTransportName = "pool"  # prompt KV from prefill to decode workers (resumes: the pool)

    def __post_init__(self):
        for name in ("shards_per_node", "replicas", "num_prefill_workers", "num_decode_workers", "num_microbatches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.transport not in get_args(TransportName):
            raise ConfigError(f"transport must be one of {get_args(TransportName)}, got {self.transport!r}")
        if self.transport == "nccl" and not self.shard_num_gpus > 0:
            raise ConfigError("transport 'nccl' moves rows between GPUs: give the shards a GPU share "
                              "(shard_num_gpus > 0) or use 'actor_call'")  # fmt: skip
        if self.transport == "gloo" and self.num_decode_workers != 1:
            raise ConfigError("transport 'gloo' allows one group per shard process: use num_decode_workers 1")
        self._check_kv_transport()

    def _check_kv_transport(self) -> None:
        if self.kv_transport not in get_args(KVTransportName):
            raise ConfigError(f"kv_transport must be one of {get_args(KVTransportName)}, got {self.kv_transport!r}")
        if self.kv_transport == "nccl" and not self.worker_num_gpus > 0:
            raise ConfigError("kv_transport 'nccl' moves KV blocks between the workers' GPUs: give the workers a "
                              "GPU share (worker_num_gpus > 0), or use 'pool' ('gloo' on CPU)")  # fmt: skip
        if self.kv_transport == "gloo" and self.transport == "gloo":
            raise ConfigError("kv_transport 'gloo' and transport 'gloo' would both need the decode worker's one "
                              "gloo group (torch.distributed holds one world per process): use transport "
                              "'actor_call' (or 'nccl' on GPUs), or kv_transport 'pool'")  # fmt: skip
