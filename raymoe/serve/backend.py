"""The generation backend the ingress talks to: a Serve deployment around the one-process engine.

`EngineBackend` prefills and decodes in one replica (the colocated arrangement): the engine steps in
a child process of the replica (`raymoe.serve.engine_process`, `serve.engine_process`) or, with that
off, an `EngineLoop` steps it in a background thread; admission is bounded either way. Serve's
autoscaler adds replicas as their ongoing requests grow (the `decode` deployment settings). It is a thin
deployment over the plain class `LocalEngine`, which the ingress also holds in its own process
when `serve.ingress_in_engine` is set (`raymoe.serve.local_backend`).

The disaggregated arrangement is `raymoe.serve.cluster_backend.ClusterBackend` (`backend: cluster`).
The ingress only needs `generate`, `info`, `stats`, `cluster_status`, `rebalance` and `scale` from a
backend.

`generate` is a streaming method. Its first item says whether the request was admitted
(`{"accepted": True}` or `{"error": {"kind", "message"}}`) so the ingress can answer 4xx/503 before
any byte of the response is sent; the rest are lists of deltas. Cancelling the stream (the client
went away) aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import os

from ray import serve

from raymoe.config import parse_config
from raymoe.engine.chunks import locate_chunks
from raymoe.engine.llm_engine import RequestOutput
from raymoe.engine.sampling_params import SamplingParams
from raymoe.errors import InvalidRequestError, OverloadedError, RaymoeError, UnsupportedOperationError
from raymoe.serve import ray_state
from raymoe.serve.engine_loop import EngineLoop, build_engine, engine_info
from raymoe.serve.engine_process import EngineProcess

logger = logging.getLogger(__name__)


def engine_threads(config) -> int:
    """engine.threads, or the CPUs Ray gave this replica (decode.num_cpus), at least 1."""
    if config.engine.threads is not None:
        return config.engine.threads
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def delta_dict(delta: RequestOutput) -> dict:
    return {"token_ids": list(delta.token_ids), "text": delta.text, "finished": delta.finished,
            "finish_reason": delta.finish_reason, "index": delta.index, "logprobs": delta.logprobs,
            "prompt_logprobs": delta.prompt_logprobs}  # fmt: skip


def error_item(kind: str, message: str) -> dict:
    """kind: "overloaded" (503) | "invalid" (400) | "unsupported" (501)."""
    return {"error": {"kind": kind, "message": message}}


def _end_replica_if_actor():
    """In a Serve replica: a callback that ends the replica's process, so Serve replaces it at once
    rather than after failed health checks; elsewhere (tests, no Ray) None."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None

    def end(reason: str) -> None:
        logger.error("%s: ending this replica so Serve starts another", reason)
        os._exit(1)

    return end


class LocalEngine:
    """The engine and its stepping loop in this process; `EngineBackend` is its Serve deployment."""

    def __init__(self, config: dict, model_path: str):
        self.config = parse_config(config)
        self.model_path = model_path
        threads, max_pending = engine_threads(self.config), self.config.serve.max_queue_len
        if self.config.serve.engine_process:  # stepping in a child process (raymoe.serve.engine_process)
            self.loop = EngineProcess(config, model_path, threads, max_pending, on_death=_end_replica_if_actor())
            self._info = self.loop.info
        else:
            engine = build_engine(config, model_path, threads)
            self.loop, self._info = EngineLoop(engine, max_pending), engine_info(engine, model_path)

    def info(self) -> dict:
        return dict(self._info)

    def check_health(self) -> None:
        """Serve calls this; a dead stepping thread or engine process marks the replica unhealthy and
        replaces it."""
        self.loop.check_alive()

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        try:
            if params.chunk_reuse is not None:  # before accepting: a bad span is the client's 400
                locate_chunks(prompt_ids, params.chunk_reuse.chunks)
            queue = self.loop.submit(request_id, prompt_ids, params)
        except OverloadedError as e:
            yield error_item("overloaded", str(e))
            return
        except InvalidRequestError as e:
            yield error_item("invalid", str(e))
            return
        yield {"accepted": True}
        finished, num_finished = False, 0
        try:
            while not finished:
                items = [await queue.get()]
                while not queue.empty():  # send what piled up in one message
                    items.append(queue.get_nowait())
                deltas = []
                for item in items:
                    if isinstance(item, Exception):
                        finished = True
                        kind = "invalid" if isinstance(item, (RaymoeError, ValueError)) else "internal"
                        yield error_item(kind, str(item))
                        return
                    deltas += item
                num_finished += sum(d.finished for d in deltas)
                finished = num_finished == params.n  # each sample finishes once
                yield [delta_dict(d) for d in deltas]
        finally:
            if not finished:  # cancelled: the client disconnected or the ingress gave up
                self.loop.abort(request_id)

    def stats(self) -> dict:
        s = self.loop.stats
        own = self.loop.engine_stats()
        return {
            "num_admitted": s.num_admitted, "num_running": s.num_running, "num_rejected": s.num_rejected,
            "num_finished": s.num_finished, "num_aborted": s.num_aborted, "num_steps": s.num_steps,
            "num_generated_tokens": s.num_generated_tokens, "step_time_s": s.step_time_s,
            "num_messages": s.num_messages, "max_queue_len": self.loop.max_pending, **own,
            "backend": "engine", "nodes": len(ray_state.live_nodes()),
            "replicas": {name: d["running"] for name, d in ray_state.deployments().items()},
        }  # fmt: skip

    def cluster_status(self) -> dict:
        """The nodes, the app's deployments, and this replica (an engine holds every expert: no placement)."""
        import ray

        ctx = ray.get_runtime_context()
        return {
            "backend": "engine", "model": self.model_path, "placement_epoch": None, "expert_load": None,
            "nodes": ray_state.live_nodes(), "deployments": ray_state.deployments(),
            "workers": [{"kind": "engine", "node_id": ctx.get_node_id(), "actor_id": ctx.get_actor_id(),
                         **self.stats()}],
        }  # fmt: skip

    def rebalance(self) -> dict:
        raise UnsupportedOperationError(
            "rebalance needs the cluster backend (backend: cluster in the config); "
            "the engine backend keeps every expert in one process"
        )

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.loop.shutdown)

    def __del__(self):
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.shutdown()


EngineBackend = serve.deployment(name="engine")(LocalEngine)
