"""Prompt KV straight from a prefill worker to a decode worker, by Ray Direct Transport (RDT).

With `ClusterConfig.kv_transport` "gloo" or "nccl", every prefill and decode worker of a cluster is
in one collective group (`kv_group_name`, one per cluster namespace). A prefill worker keeps the
exported blocks of each request it handed off (`KeptKV`); the front asks it for them with
`take_kv(request_ids)` under `.options(tensor_transport=...)`, and passes the returned ObjectRef as
a top-level argument of the decode worker's `submit`, so Ray moves the one tensor
`[n_blocks, block_numel]` over the group (NCCL between GPUs, gloo on CPU) instead of the object
store. The decode worker imports the blocks from it (`DirectBlocks`) and asks the pool only for
what it lacks. The prefill worker still publishes to its node's pool, which serves what the direct
path cannot: resumes after a decode worker dies, moves between decode workers, prefix hits; it does
so on a background thread (`Publisher`), off the hand-off's path. A reader that comes before a
publish lands misses and recomputes those blocks: slower, never wrong (KV is content-keyed).

Import-guarded: nothing here imports `ray.util.collective` or cupy at import time.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict

import torch

from raymoe.errors import RaymoeError

logger = logging.getLogger(__name__)

KEPT_MAX_REQUESTS = 256  # handed-off requests whose blocks a prefill worker keeps for take_kv at most
BACKENDS = {"gloo": "torch_gloo", "nccl": "nccl"}  # kv_transport -> Ray collective backend


class KVGroupError(RaymoeError, RuntimeError):
    """The workers could not form the KV collective group (NCCL needs cupy: pip install 'raymoe[gpu]')."""


def kv_group_name(namespace: str) -> str:
    return f"raymoe-kv-{namespace}"


def form_kv_group(workers: list, kv_transport: str, namespace: str) -> None:
    """One collective group over every prefill and decode worker (actors created with
    `enable_tensor_transport=True`). Call it in the process that runs the front: RDT finds the
    group through the process that passes the refs on."""
    from ray.experimental.collective import create_collective_group

    try:
        create_collective_group(workers, backend=BACKENDS[kv_transport], name=kv_group_name(namespace))
    except Exception as e:  # noqa: BLE001 (a missing backend fails inside the actors, in any type)
        hint = "; NCCL needs cupy: pip install 'raymoe[gpu]'" if kv_transport == "nccl" else ""
        raise KVGroupError(f"could not form the KV group over {kv_transport} ({e!r}){hint}") from e


def forget_kv_group(namespace: str) -> None:
    """Drop this process's record of the namespace's KV group, whose workers are being killed
    (no call to them: `destroy_collective_group` would wait on each, and a wedged one forever)."""
    from ray.experimental.collective.collective import RemoteCommunicatorManager

    RemoteCommunicatorManager.get().remove_remote_communicator(kv_group_name(namespace))


class KeptKV:
    """Exported blocks of handed-off requests until the front takes them (oldest dropped past
    `max_requests`: the decode worker then reads the pool). Thread-safe: a take never waits for a
    prefill in progress."""

    def __init__(self, max_requests: int = KEPT_MAX_REQUESTS):
        self.max_requests = max_requests
        self.kept: OrderedDict[str, tuple[list[str], list[torch.Tensor]]] = OrderedDict()
        self.lock = threading.Lock()

    def keep(self, request_id: str, keys: list[str], blocks: list[torch.Tensor]) -> None:
        """keys: pool keys; blocks: exported blocks, [block_numel] each (`kv_transfer.export_blocks`)."""
        with self.lock:
            self.kept[request_id] = (list(keys), list(blocks))
            while len(self.kept) > self.max_requests:
                self.kept.popitem(last=False)

    def take(self, request_ids: list[str], block_numel: int, dtype: torch.dtype, device: str) -> dict:
        """{"keys": [n] pool keys, "blocks": [n, block_numel] on `device`} of these requests (each
        key once), dropped here; requests not kept contribute nothing."""
        with self.lock:
            taken = [self.kept.pop(rid, ([], [])) for rid in request_ids]
        keys, blocks, seen = [], [], set()
        for request_keys, request_blocks in taken:
            for key, block in zip(request_keys, request_blocks):
                if key not in seen:
                    seen.add(key)
                    keys.append(key)
                    blocks.append(block)
        stacked = torch.stack(blocks) if blocks else torch.empty(0, block_numel, dtype=dtype)
        return {"keys": keys, "blocks": stacked.to(device).contiguous()}


def blocks_by_key(taken: dict | None) -> dict[str, torch.Tensor]:
    """What `KeptKV.take` returned (or None) as pool key -> exported block [block_numel]."""
    if not taken:
        return {}
    return dict(zip(taken["keys"], taken["blocks"].unbind(0)))


class DirectBlocks:
    """A decode worker's fetch over blocks that came directly, the pool behind it for the rest.

    by_key: `blocks_by_key` of what came; pool_fetch(keys) -> [Tensor | None]. Counts the blocks
    served from each in `stats` ("kv_direct_blocks", "kv_pool_blocks")."""

    def __init__(self, by_key: dict[str, torch.Tensor], pool_fetch, stats: dict):
        self.by_key, self.pool_fetch, self.stats = by_key, pool_fetch, stats

    def __call__(self, keys: list[str]) -> list[torch.Tensor | None]:
        missing = [k for k in keys if k not in self.by_key]
        pooled = dict(zip(missing, self.pool_fetch(missing))) if missing else {}
        self.stats["kv_direct_blocks"] += len(keys) - len(missing)
        self.stats["kv_pool_blocks"] += sum(v is not None for v in pooled.values())
        return [self.by_key[k] if k in self.by_key else pooled[k] for k in keys]


class Publisher:
    """Runs `publish(keys, blocks)` calls in order on one daemon thread, so a prefill hands off
    before its blocks reach the pool. A failed publish is logged: its blocks are recomputed where
    a pool read misses them."""

    def __init__(self, publish):
        self.publish, self.jobs = publish, queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="kv-publish").start()

    def submit(self, keys: list[str], blocks: list[torch.Tensor]) -> None:
        self.jobs.put((keys, blocks))

    def drain(self) -> None:
        """Wait until every submitted publish has run."""
        self.jobs.join()

    def _run(self) -> None:
        while True:
            keys, blocks = self.jobs.get()
            try:
                self.publish(keys, blocks)
            except Exception as e:  # noqa: BLE001 (the pool is a cache: a lost publish costs recompute)
                logger.warning("KV publish of %d blocks failed: %r", len(keys), e)
            finally:
                self.jobs.task_done()
