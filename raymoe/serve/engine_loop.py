"""EngineLoop: the one-process engine stepping in a background thread, fed from asyncio.

The engine is not thread-safe, so every engine call (add, abort, step) runs on the stepping thread;
asyncio callers hand it commands and get their deltas back on an `asyncio.Queue` each, in chunks:
a request's first token and its last go out at once, the others once `stream_interval(running)`
of them piled up, so a step sends about `MESSAGES_PER_STEP` messages however many sequences run
(each message is a hop through Serve, the ingress and the HTTP proxy: per token at 32 streams those
cost more CPU than the model). A step's chunks reach each event loop in one hand-off. Admission is
bounded: at most `max_pending` requests are admitted (waiting or running) at once; beyond that
`submit` raises `OverloadedError` at once, so overload is a fast 503 instead of a growing queue.
A plain class (no Ray), so tests can drive it directly.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from raymoe.engine.llm_engine import LLMEngine, RequestOutput
from raymoe.engine.sampling_params import SamplingParams
from raymoe.errors import OverloadedError

MESSAGES_PER_STEP = 8  # chunks sent per engine step, about: bounds the per-message cost at any batch
CHUNK_CACHE_BYTES = 64 << 20  # chunk KV of requests with raymoe_chunks (docs/chunks.md)


def stream_interval(num_sampled: int) -> int:
    """Tokens per chunk when `num_sampled` sequences got a token this step (1 up to MESSAGES_PER_STEP)."""
    return max(1, -(-num_sampled // MESSAGES_PER_STEP))


@dataclass
class LoopStats:
    num_admitted: int = 0  # requests accepted and not finished (waiting + running)
    num_running: int = 0  # of those, in the engine's batch or its waiting queue
    num_rejected: int = 0  # turned away because the loop was full
    num_finished: int = 0
    num_aborted: int = 0
    num_steps: int = 0
    num_generated_tokens: int = 0
    num_messages: int = 0  # chunks handed to callers (each one or more deltas)
    step_time_s: float = 0.0  # total time inside engine.step()
    extra: dict = field(default_factory=dict)


class EngineLoop:
    def __init__(self, engine: LLMEngine, max_pending: int):
        self.engine, self.max_pending = engine, max_pending
        self.stats = LoopStats()
        self._commands: deque = deque()  # ("add", rid, prompt_ids, params, sink) | ("abort", rid)
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending: dict[str, list[RequestOutput]] = {}  # deltas not sent yet, per request
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="raymoe-engine-loop", daemon=True)
        self._thread.start()

    # ----- called from asyncio -----------------------------------------------------------------
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> asyncio.Queue:
        """Admit a request; its deltas arrive on the returned queue as lists (chunks, in order, the
        last one finished), or one exception instead."""
        with self._wake:
            if self.stats.num_admitted >= self.max_pending:
                self.stats.num_rejected += 1
                raise OverloadedError(f"the server is at its limit of {self.max_pending} queued requests; retry later")
            self.stats.num_admitted += 1
            queue: asyncio.Queue = asyncio.Queue()
            self._commands.append(("add", request_id, prompt_ids, params, (asyncio.get_running_loop(), queue)))
            self._wake.notify()
        return queue

    def abort(self, request_id: str) -> None:
        self._push(("abort", request_id))

    def _push(self, command: tuple) -> None:
        """Queue a command for the stepping thread and wake it."""
        with self._wake:
            self._commands.append(command)
            self._wake.notify()

    def engine_stats(self) -> dict:
        return engine_stats(self.engine)

    def check_alive(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the engine loop thread died")

    def shutdown(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # ----- the stepping thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._commands and not self.engine.has_unfinished():
                    self._wake.wait()
                if self._stopped:
                    return
                commands, self._commands = self._commands, deque()
            for command in commands:
                self._apply(command)
            if self.engine.has_unfinished():
                self._step()
            self.stats.num_running = len(self.engine.requests)  # also after aborts with no step to follow

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            if command[1] in self._sinks:
                self.engine.abort(command[1])
                self._finish(command[1], aborted=True)
            return
        _, request_id, prompt_ids, params, sink = command
        self._sinks[request_id] = sink
        try:
            self.engine.add_request(prompt_ids, params, request_id)
        except Exception as e:  # bad input the ingress could not see: goes back to that request only
            self._send(request_id, e)
            self._finish(request_id)

    def _step(self) -> None:
        start = time.perf_counter()
        deltas = self.engine.step()
        self.stats.step_time_s += time.perf_counter() - start
        self.stats.num_steps += 1
        interval = stream_interval(len(deltas))
        ready: list[tuple[str, list[RequestOutput]]] = []
        for delta in deltas:
            self.stats.num_generated_tokens += len(delta.token_ids)
            if delta.request_id not in self._sinks:
                continue
            first = delta.request_id not in self._pending
            pending = self._pending.setdefault(delta.request_id, [])
            pending.append(delta)
            if first or delta.finished or len(pending) >= interval:
                ready.append((delta.request_id, pending))
                self._pending[delta.request_id] = []
        self._send_many(ready)
        for delta in deltas:
            if delta.finished and not self.engine.has_request(delta.request_id):  # all its samples done
                self._finish(delta.request_id)

    def _send(self, request_id: str, item: Exception) -> None:
        self._send_many([(request_id, item)])

    def _send_many(self, items: list[tuple[str, list[RequestOutput] | Exception]]) -> None:
        """Hand each (request, chunk or exception) to its queue: one call per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            sink = self._sinks.get(request_id)
            if sink is not None:
                by_loop.setdefault(sink[0], []).append((request_id, sink[1], item))
        self.stats.num_messages += len(items)
        hand_over(by_loop, self.abort)

    def _finish(self, request_id: str, aborted: bool = False) -> None:
        self._pending.pop(request_id, None)
        if self._sinks.pop(request_id, None) is not None:
            with self._wake:
                self.stats.num_admitted -= 1
            self.stats.num_aborted += aborted
            self.stats.num_finished += not aborted


def hand_over(by_loop: dict, abort) -> None:
    """Each event loop's batch of (request, queue, item) in one call; where the caller's event loop is
    gone nobody is listening, so its requests are aborted."""
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(deliver, batch)
        except RuntimeError:
            for request_id, _, _ in batch:
                abort(request_id)


def deliver(batch: list[tuple[str, asyncio.Queue, object]]) -> None:
    for _, queue, item in batch:
        queue.put_nowait(item)


def build_engine(config: dict, model_path: str, threads: int) -> LLMEngine:
    """The engine a serve replica steps (in its thread or its engine process), from the config dict."""
    from dataclasses import replace

    from raymoe.config import parse_config
    from raymoe.engine.chunk_cache import LocalChunkStore

    engine_config = replace(parse_config(config).engine.to_engine_config(), threads=threads)
    return LLMEngine.from_path(model_path, engine_config, LocalChunkStore(CHUNK_CACHE_BYTES))


def engine_info(engine: LLMEngine, model_path: str) -> dict:
    return {"max_model_len": engine.max_model_len, "vocab_size": engine.model.spec.vocab_size,
            "model_path": model_path, "backend": "engine"}  # fmt: skip


def engine_stats(engine: LLMEngine) -> dict:
    """The engine's own figures: KV blocks, requests, speculation, chunk cache."""
    bm = engine.block_manager
    return {"num_kv_blocks": bm.num_blocks, "num_free_kv_blocks": bm.num_free_blocks,
            "num_engine_requests": len(engine.requests),
            "speculative": {"method": engine.config.speculative, **engine.spec_stats()},
            "chunks": engine.chunk_stats()}  # fmt: skip
