"""EngineLoop: the one-process engine stepping in a background thread, fed from asyncio.

The engine is not thread-safe, so every engine call (add, abort, step) runs on the stepping thread;
asyncio callers hand it commands and get their deltas back on an `asyncio.Queue` each. Admission is
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


@dataclass
class LoopStats:
    num_admitted: int = 0  # requests accepted and not finished (waiting + running)
    num_running: int = 0  # of those, in the engine's batch or its waiting queue
    num_rejected: int = 0  # turned away because the loop was full
    num_finished: int = 0
    num_aborted: int = 0
    num_steps: int = 0
    num_generated_tokens: int = 0
    step_time_s: float = 0.0  # total time inside engine.step()
    extra: dict = field(default_factory=dict)


class EngineLoop:
    def __init__(self, engine: LLMEngine, max_pending: int):
        self.engine, self.max_pending = engine, max_pending
        self.stats = LoopStats()
        self._commands: deque = deque()  # ("add", rid, prompt_ids, params, sink) | ("abort", rid)
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="raymoe-engine-loop", daemon=True)
        self._thread.start()

    # ----- called from asyncio -----------------------------------------------------------------
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> asyncio.Queue:
        """Admit a request; its deltas (or one exception) arrive on the returned queue."""
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
        with self._wake:
            self._commands.append(("abort", request_id))
            self._wake.notify()

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
        for delta in deltas:
            self.stats.num_generated_tokens += len(delta.token_ids)
            self._send(delta.request_id, delta)
            if delta.finished:
                self._finish(delta.request_id)

    def _send(self, request_id: str, item: RequestOutput | Exception) -> None:
        sink = self._sinks.get(request_id)
        if sink is not None:
            loop, queue = sink
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's event loop is gone: nobody is listening
                self.abort(request_id)

    def _finish(self, request_id: str, aborted: bool = False) -> None:
        if self._sinks.pop(request_id, None) is not None:
            with self._wake:
                self.stats.num_admitted -= 1
            self.stats.num_aborted += aborted
            self.stats.num_finished += not aborted
