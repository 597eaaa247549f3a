"""The prefill and decode Serve deployments of `backend: cluster`, each scaled on its own signal.

Each replica owns one worker actor (`raymoe.actors.PrefillWorker` / `DecodeWorker`, see
cluster_setup.py) and is a thin asynchronous shell over it:

- `PrefillServer.prefill(request) -> Handoff`: concurrent calls are batched (`serve.batch`) into one
  prefill on the worker; the prompt's KV goes to the node's KV pool. Reports queued prompt tokens.
- `DecodeServer.decode(request)`: a stream of `TokenDelta`s until the sequence ends; the sequence
  joins the worker's running batch with its prompt KV from the pool. One long-poll loop per
  replica fetches every stream's tokens. Reports running sequences and the share of KV blocks used.

A replica whose worker died fails its streams with `WorkerLostError` (the front resumes them on
another replica) and reports itself unhealthy, so Serve replaces it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

import ray
from ray import serve

from raymoe.actors.decode import DecodeWorker
from raymoe.cluster.handoff import Handoff, TokenDelta, WorkRequest
from raymoe.actors.prefill import PrefillWorker
from raymoe.config import parse_config
from raymoe.errors import RaymoeError
from raymoe.serve.cluster_setup import ensure_controller, start_worker

logger = logging.getLogger(__name__)
POLL_S = 0.5
HEALTH_TIMEOUT_S = 10


class WorkerLostError(RaymoeError):
    """The replica's worker actor died; the request must resume elsewhere."""


class _Replica:
    """What both deployments share: the config, the controller, the owned worker (restarted when
    it dies: the requests it held fail over through the front, new ones wait for the new worker)."""

    worker_cls: type
    role: str

    def _start(self, config: dict, model_path: str) -> None:
        self.config = parse_config(config)
        self.model_path = model_path
        ensure_controller(self.config, model_path)
        self.worker = self._new_worker()
        self.node_id = ray.get(self.worker.node_id.remote())
        self.worker_dead, self.worker_restarts = False, 0
        self._restarting = asyncio.Lock()

    def _new_worker(self):
        return start_worker(self.worker_cls, self.config, self.model_path, getattr(self.config, self.role))

    async def live_worker(self):
        """The worker actor, a new one if the last died."""
        async with self._restarting:
            if self.worker_dead:
                logger.warning("the %s worker died; starting a new one", self.role)
                self.worker = await asyncio.to_thread(self._new_worker)
                self.node_id = await self.worker.node_id.remote()
                self.worker_dead = False
                self.worker_restarts += 1
        return self.worker

    async def _call(self, ref):
        try:
            return await ref
        except ray.exceptions.RayActorError:
            self.worker_dead = True
            raise WorkerLostError(f"the {self.role} worker actor died") from None

    async def check_health(self) -> None:
        """Serve calls this: healthy while the worker answers or can be replaced."""
        worker = await self.live_worker()
        await asyncio.wait_for(self._call(worker.ready.remote()), HEALTH_TIMEOUT_S)

    async def worker_stats(self) -> dict:
        worker = await self.live_worker()
        stats, pid = await asyncio.gather(self._call(worker.stats.remote()), self._call(worker.pid.remote()))
        return {"kind": self.role, "node_id": self.node_id, "replica": _replica_id(), "pid": pid,
                "worker_restarts": self.worker_restarts, **stats}  # fmt: skip

    def __del__(self):
        worker = getattr(self, "worker", None)
        if worker is not None:
            ray.kill(worker)


@serve.deployment(name="prefill", health_check_period_s=5)
class PrefillServer(_Replica):
    worker_cls, role = PrefillWorker, "prefill"

    def __init__(self, config: dict, model_path: str):
        self._start(config, model_path)
        self.queued_prompt_tokens = 0

    async def prefill(self, request: WorkRequest) -> Handoff:
        """Run one prompt to its first token (batched with concurrent calls)."""
        size = len(request.prompt_token_ids) + len(request.output_token_ids)
        self.queued_prompt_tokens += size
        try:
            return await self._prefill_batch(request)
        finally:
            self.queued_prompt_tokens -= size

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _prefill_batch(self, requests: list[WorkRequest]) -> list[Handoff]:
        worker = await self.live_worker()
        for r in requests:
            r.kv_node_id = self.node_id
        handoffs = await self._call(worker.prefill.remote(requests))
        for h in handoffs:
            h.kv_node_id = self.node_id
        return handoffs

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"queued_prompt_tokens": float(self.queued_prompt_tokens)}


@serve.deployment(name="decode", health_check_period_s=5)
class DecodeServer(_Replica):
    worker_cls, role = DecodeWorker, "decode"

    def __init__(self, config: dict, model_path: str):
        self._start(config, model_path)
        self.streams: dict[str, asyncio.Queue] = {}
        self.poller: asyncio.Task | None = None
        self.kv_block_fraction = 0.0

    async def decode(self, request: WorkRequest):
        """Yield TokenDelta lists' worth of tokens for `request` until it finishes."""
        rid = request.request_id
        queue = self.streams[rid] = asyncio.Queue()
        finished = False
        try:
            await self._call((await self.live_worker()).submit.remote([request]))
            self._ensure_poller()
            while not finished:
                delta: TokenDelta | Exception = await queue.get()
                if isinstance(delta, Exception):
                    raise delta
                finished = delta.finished
                yield delta
        finally:
            self.streams.pop(rid, None)
            if not finished and not self.worker_dead:  # cancelled (stop string, client gone, drain)
                self.worker.abort.remote([rid])

    def _ensure_poller(self) -> None:
        """One poll loop per replica, outside any request's context (Serve cancels a request's
        child calls when the request ends; the loop serves every request)."""
        if self.poller is None or self.poller.done():
            loop = asyncio.get_running_loop()
            self.poller = loop.create_task(self._poll(), context=contextvars.Context())

    async def _poll(self) -> None:
        """Fetch every stream's new tokens from the worker while any stream is open."""
        while self.streams:
            try:
                deltas = await self._call(self.worker.poll.remote(None, POLL_S))
            except WorkerLostError as e:
                for queue in self.streams.values():
                    queue.put_nowait(e)
                return
            except ray.exceptions.TaskCancelledError:
                continue
            for rid, delta in deltas.items():
                queue = self.streams.get(rid)
                if queue is not None:
                    queue.put_nowait(delta)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        try:
            stats = await asyncio.wait_for(self.worker.stats.remote(), HEALTH_TIMEOUT_S)
            self.kv_block_fraction = stats["kv_blocks_used"] / max(stats["kv_blocks"], 1)
        except Exception:  # keep the last value; health checks deal with a dead worker
            pass
        return {"running_sequences": float(len(self.streams)), "kv_block_fraction": self.kv_block_fraction}


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return ""
