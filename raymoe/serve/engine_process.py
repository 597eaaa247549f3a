"""The engine stepping in a child process of the replica (`serve.engine_process`), as vLLM's engine
core runs apart from its API server.

In one process the replica's HTTP work (uvicorn, FastAPI, SSE framing, Serve's bookkeeping) and the
stepping thread share one GIL. A step is hundreds of small torch ops, each releasing the GIL and
taking it back; with another thread holding it even 15 % of the time, a step takes 1.2-1.5x as
long (docs/benchmarks.md, bench/gil_contention.py). So the replica starts `python -m
raymoe.serve.engine_process`, which builds the engine and runs the same `EngineLoop` there; the two
talk over a socket pair with `multiprocessing.connection` (pickled messages):

    parent -> child   ("init", config, model_path, threads) | ("add", rid, prompt_ids, params)
                      | ("abort", rid) | ("stats", call_id) | ("stop",)
    child -> parent   ("ready", info) | ("failed", message) | ("out", [(rid, chunk)], counters)
                      | ("stats", call_id, dict, counters)

`EngineProcess` offers what `LocalEngine` uses of an `EngineLoop` (submit, abort, stats, shutdown,
engine_stats, check_alive) and the engine's `info`. Admission is counted here, so overload is an immediate 503;
a request leaves once all its samples finished, it failed, or it was aborted. The child exits when
the connection closes (the replica died); a dead child fails every open stream and the replica's
health check, and a replica ends itself then (`on_death`), so Serve replaces it at once.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from raymoe.engine.sampling_params import SamplingParams
from raymoe.errors import InvalidRequestError, OverloadedError, RaymoeError
from raymoe.serve.engine_loop import EngineLoop, LoopStats, build_engine, engine_info, hand_over

START_TIMEOUT_S = 600  # building the engine: loading a large checkpoint
CALL_TIMEOUT_S = 30


# the child's share of LoopStats, sent with every output message (the rest is counted here)
COUNTERS = ("num_running", "num_finished", "num_aborted", "num_steps", "num_generated_tokens", "num_messages",
            "step_time_s")  # fmt: skip


class EngineProcessError(RuntimeError):
    """The engine process could not start, or died."""


class EngineProcess:
    def __init__(self, config: dict, model_path: str, threads: int, max_pending: int,
                 on_death: Callable[[str], None] | None = None):  # fmt: skip
        """on_death(reason): called (on the reader thread) when the child dies unasked, after every open
        stream got the error."""
        self.max_pending, self._on_death, self._stopping = max_pending, on_death, False
        self.stats = LoopStats()
        mine, theirs = socket.socketpair()
        self._proc = subprocess.Popen([sys.executable, "-m", "raymoe.serve.engine_process", str(theirs.fileno())],
                                      pass_fds=[theirs.fileno()])  # fmt: skip
        theirs.close()
        self._conn = Connection(mine.detach())
        self._send_lock, self._lock = threading.Lock(), threading.Lock()
        self._sinks: dict[str, list] = {}  # rid -> [event loop, queue, samples still running]
        self._calls: dict[int, list] = {}  # call id -> [threading.Event, reply]
        self._ids = itertools.count()
        self._dead: str | None = None
        self._send(("init", config, model_path, threads))
        self.info = self._handshake()
        self._reader = threading.Thread(target=self._read, name="raymoe-engine-reader", daemon=True)
        self._reader.start()

    # ----- called from asyncio (as EngineLoop) ---------------------------------------------------
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._dead:
                raise EngineProcessError(self._dead)
            if self.stats.num_admitted >= self.max_pending:
                self.stats.num_rejected += 1
                raise OverloadedError(f"the server is at its limit of {self.max_pending} queued requests; retry later")
            self.stats.num_admitted += 1
            self._sinks[request_id] = [asyncio.get_running_loop(), queue, params.n]
        self._send(("add", request_id, prompt_ids, params))
        return queue

    def abort(self, request_id: str) -> None:
        if self._leave(request_id):
            self._send(("abort", request_id))

    def shutdown(self) -> None:
        self._stopping = True
        if self._proc.poll() is None:
            try:
                self._send(("stop",))
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
        self._conn.close()

    def check_alive(self) -> None:
        if self._dead or self._proc.poll() is not None:
            raise EngineProcessError(self._dead or f"the engine process exited with {self._proc.returncode}")

    def engine_stats(self) -> dict:
        """The engine's own figures (KV blocks, requests, speculation, chunk cache), asked of the child."""
        call_id, done = next(self._ids), threading.Event()
        self._calls[call_id] = [done, None]
        self._send(("stats", call_id))
        if not done.wait(CALL_TIMEOUT_S):
            self._calls.pop(call_id, None)
            raise EngineProcessError(self._dead or f"the engine process did not answer in {CALL_TIMEOUT_S}s")
        return self._calls.pop(call_id)[1]

    # ----- the connection ----------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _handshake(self) -> dict:
        if not self._conn.poll(START_TIMEOUT_S):
            self._proc.kill()
            raise EngineProcessError(f"the engine process did not start in {START_TIMEOUT_S}s")
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            raise EngineProcessError(f"the engine process exited with {self._proc.wait()} while starting") from None
        if kind == "failed":
            self._proc.wait(timeout=30)
            raise EngineProcessError(f"the engine could not start: {payload}")
        return payload

    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "out":
                    self._deliver(message[1], message[2])
                else:  # ("stats", call_id, dict, counters)
                    self._count(message[3])
                    call = self._calls.get(message[1])
                    if call is not None:
                        call[1] = message[2]
                        call[0].set()
        except (EOFError, OSError):
            self._died()

    def _count(self, counters: dict) -> None:
        for name, value in counters.items():
            setattr(self.stats, name, value)

    def _deliver(self, items: list, counters: dict) -> None:
        self._count(counters)
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, chunk in items:
            sink = self._sinks.get(request_id)
            if sink is None:  # aborted meanwhile
                continue
            if isinstance(chunk, tuple):  # ("error", kind, message)
                chunk = (InvalidRequestError if chunk[1] == "invalid" else RuntimeError)(chunk[2])
                self._leave(request_id)
            else:
                sink[2] -= sum(d.finished for d in chunk)
                if sink[2] <= 0:
                    self._leave(request_id)
            by_loop.setdefault(sink[0], []).append((request_id, sink[1], chunk))
        hand_over(by_loop, self.abort)

    def _leave(self, request_id: str) -> bool:
        with self._lock:
            if self._sinks.pop(request_id, None) is None:
                return False
            self.stats.num_admitted -= 1
            return True

    def _died(self) -> None:
        code = self._proc.poll()
        with self._lock:
            self._dead = f"the engine process exited (code {code})"
            sinks, self._sinks = self._sinks, {}
            self.stats.num_admitted -= len(sinks)
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, (loop, queue, _) in sinks.items():
            by_loop.setdefault(loop, []).append((request_id, queue, EngineProcessError(self._dead)))
        hand_over(by_loop, lambda _request_id: None)  # nothing left to abort
        for call in list(self._calls.values()):
            call[0].set()
        if self._on_death is not None and not self._stopping:
            self._on_death(self._dead)


# ----- the child ---------------------------------------------------------------------------------
class _ChildLoop(EngineLoop):
    """EngineLoop whose chunks go over the connection instead of to event loops."""

    def __init__(self, engine, conn: Connection, send_lock: threading.Lock):
        self.conn, self.send_lock = conn, send_lock
        super().__init__(engine, max_pending=sys.maxsize)  # admission is the parent's

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        with self._wake:
            self.stats.num_admitted += 1
        self._push(("add", request_id, prompt_ids, params, True))  # the sink: the connection

    def ask_stats(self, call_id: int) -> None:
        """Answered on the stepping thread, after the commands before it (an abort included)."""
        self._push(("stats", call_id))

    def _apply(self, command: tuple) -> None:
        if command[0] != "stats":
            return super()._apply(command)
        self._reply(("stats", command[1], self.engine_stats(), self._counters()))

    def _send_many(self, items: list) -> None:
        self.stats.num_messages += len(items)
        out = [(rid, _error_tuple(item) if isinstance(item, Exception) else item) for rid, item in items]
        self._reply(("out", out, self._counters()))

    def _counters(self) -> dict:
        self.stats.num_running = len(self.engine.requests)
        return {name: getattr(self.stats, name) for name in COUNTERS}

    def _reply(self, message: tuple) -> None:
        with self.send_lock:
            self.conn.send(message)


def _error_tuple(error: Exception) -> tuple[str, str, str]:
    return ("error", "invalid" if isinstance(error, (RaymoeError, ValueError)) else "internal", str(error))


def child_main(fd: int) -> int:
    conn = Connection(fd)
    _, config, model_path, threads = conn.recv()
    try:
        engine = build_engine(config, model_path, threads)
    except Exception as e:  # a bad checkpoint: the replica reports it
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return 1
    loop = _ChildLoop(engine, conn, threading.Lock())
    conn.send(("ready", engine_info(engine, model_path)))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the replica is gone
            os._exit(0)
        if message[0] == "add":
            loop.add(*message[1:])
        elif message[0] == "abort":
            loop.abort(message[1])
        elif message[0] == "stats":
            loop.ask_stats(message[1])
        else:  # stop
            loop.shutdown()
            return 0


if __name__ == "__main__":
    sys.exit(child_main(int(sys.argv[1])))
