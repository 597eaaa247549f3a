"""DecodeWorker: continuous batching over sequences handed over by prefill workers.

A handed-over sequence fetches its prompt's KV blocks from the KV pool (the tail of a partly
filled block is recomputed with the first token, at most block_size tokens), then decodes with the
rest of the running batch. A background thread steps the engine; the front long-polls for tokens.
With a direct KV transport the blocks come with the submit instead (`raymoe.cluster.kv_direct`),
and the pool serves only what they lack.
"""

from __future__ import annotations

import threading
import time

from raymoe.cluster.handoff import TokenDelta, WorkRequest
from raymoe.actors.worker_model import WorkerShell, die
from raymoe.cluster.kv_direct import DirectBlocks, blocks_by_key
from raymoe.engine.kv_tail import tail_key
from raymoe.engine.llm_engine import LLMEngine

LOAD_REPORT_S = 1.0  # how often a decode worker sends its expert load to the controller
TIMINGS = {"decode_steps": 0, "decode_step_s": 0.0, "decode_tokens": 0}


class DecodeCore:
    def __init__(self, engine: LLMEngine, pool):
        self.engine, self.pool = engine, pool
        self.stats = {"sequences": 0, "tokens": 0, "steps": 0, "prefix_hit_blocks": 0, "tail_blocks": 0,
                      "kv_direct_blocks": 0, "kv_pool_blocks": 0}  # fmt: skip
        self.timings = dict(TIMINGS)
        self.reported: dict = {}  # request id -> its tally counts at the last report
        # Output tokens at which every sequence waits (None: no hold): step-aligned re-plans,
        # where the controller re-plans and the front re-seats before decoding goes on.
        self.hold_at: int | None = None

    def submit(self, r: WorkRequest, direct: dict | None = None) -> None:
        """Admit a sequence that already has output tokens (at least the prefill's first).
        direct: pool key -> block sent straight from the prefill worker (`kv_direct.blocks_by_key`);
        the pool has the rest."""
        tokens = r.prompt_token_ids + r.output_token_ids
        fetch = DirectBlocks(direct or {}, lambda keys: self.pool.get_blocks(keys, r.kv_node_id), self.stats)
        self.stats["prefix_hit_blocks"] += self.engine.import_prefix(tokens, fetch)
        self.engine.add_request(r.prompt_token_ids, r.params, r.request_id, r.output_token_ids)
        key = tail_key(tokens, self.engine.config.block_size) if r.kv_tail else None
        block = fetch([key])[0] if key else None
        if block is not None:  # a re-seated sequence: its partial block came too (no recompute)
            self.engine.set_kv_tail(r.request_id, block)
            self.stats["tail_blocks"] += 1
        self.stats["sequences"] += 1

    def step(self) -> dict[str, TokenDelta]:
        start = time.perf_counter()
        sched = self.engine.scheduler
        is_decode = not sched.waiting and all(s.num_uncomputed_tokens == 1 for s in sched.running)
        deltas: dict[str, TokenDelta] = {}
        for out in self.engine.step():
            deltas[out.request_id] = TokenDelta(list(out.token_ids), out.finished, out.finish_reason, out.logprobs)
            self.stats["tokens"] += len(out.token_ids)
        if self.tally is not None:
            self.tally.keep_only(self.engine.requests)
        self.stats["steps"] += 1
        if is_decode:  # a pure decode step: the one the breakdown is about
            t = self.timings
            t["decode_steps"] += 1
            t["decode_step_s"] += time.perf_counter() - start
            t["decode_tokens"] += sum(len(d.token_ids) for d in deltas.values())
        return deltas

    def take_timings(self) -> dict:
        timings, self.timings = self.timings, dict(TIMINGS)
        return timings

    def spec_stats(self) -> dict:
        """Speculative decoding's counters here (raymoe.engine.spec.speculator.SpecStats)."""
        return {"method": self.engine.config.speculative, **self.engine.spec_stats()}

    @property
    def tally(self):
        return getattr(self.engine.model, "tally", None)

    def routing(self, request_ids: list[str]) -> dict:
        """request id -> `[moe layers, experts]` pairs it routed here so far (running ones)."""
        counts = self.tally.counts if self.tally is not None else {}
        return {r: counts[r].copy() for r in request_ids if r in counts}

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def release(self, request_id: str) -> bool:
        """Put a running sequence's computed KV blocks into this node's pool and drop it (it moves
        to another worker, which imports them). False when it is not running here."""
        if request_id not in self.engine.requests:
            return False
        seq, _ = self.engine.requests[request_id]
        keys, blocks = self.engine.export_prefix(seq.token_ids)
        tail = self.engine.export_tail(request_id)
        if tail is not None:  # adopted by the next worker only if all the full blocks reach it too
            keys, blocks = keys + [tail[0]], blocks + [tail[1]]
        if keys:
            self.pool.put_blocks(keys, blocks)
        self.engine.abort(request_id)
        return True

    def routing_since_report(self) -> dict:
        """request id -> `[moe layers, experts]` pairs routed here since the last call (running
        requests with any): what the worker reports, so the controller can sum any window."""
        counts = self.tally.counts if self.tally is not None else {}
        out = {r: c - self.reported[r] if r in self.reported else c.copy() for r, c in counts.items()}
        self.reported = {r: c.copy() for r, c in counts.items()}
        return {r: d for r, d in out.items() if d.any()}

    def has_work(self) -> bool:
        """Sequences to step: some unfinished, and not all of them at the hold (`hold_at`)."""
        if not self.engine.has_unfinished():
            return False
        return self.hold_at is None or any(
            seq.num_output_tokens < self.hold_at for seq, _ in self.engine.requests.values()
        )

    def is_held(self) -> bool:
        """Every unfinished sequence has reached the hold: the worker waits there (step boundary)."""
        return self.hold_at is not None and not self.has_work()


class Outbox:
    """Per-request token buffers between the stepping thread and pollers."""

    def __init__(self):
        self.buffers: dict[str, TokenDelta] = {}
        self.cond = threading.Condition()

    def add(self, deltas: dict[str, TokenDelta]) -> None:
        """Buffer a step's tokens; wake pollers only when a buffer was empty or a request finished
        (a lingering poller sleeps through the steps between)."""
        with self.cond:
            is_news = False
            for rid, d in deltas.items():
                buf = self.buffers.setdefault(rid, TokenDelta([]))
                is_news = is_news or not buf.token_ids or d.finished
                buf.token_ids.extend(d.token_ids)
                if d.logprobs is not None:
                    buf.logprobs = (buf.logprobs or []) + d.logprobs
                buf.finished, buf.finish_reason = d.finished, d.finish_reason
            if is_news:
                self.cond.notify_all()

    def take(self, request_ids: list[str] | None, timeout_s: float, linger_s: float = 0.0) -> dict[str, TokenDelta]:
        """New tokens of any of `request_ids` (None: of every request), waiting up to timeout_s.
        linger_s: once some are ready, gather more for up to that long (fewer, larger answers)
        unless one of them finishes."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            if not self._wait(lambda: any(self._ready(r) for r in self._wanted(request_ids)), deadline):
                return {}
            if linger_s > 0:
                self._wait(lambda: any(self._finished(r) for r in self._wanted(request_ids)),
                           min(deadline, time.monotonic() + linger_s))  # fmt: skip
            return {r: self.buffers.pop(r) for r in list(self._wanted(request_ids)) if r in self.buffers}

    def _wait(self, condition, deadline: float) -> bool:
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.cond.wait(left)
        return True

    def _wanted(self, request_ids: list[str] | None):
        return self.buffers if request_ids is None else request_ids

    def _finished(self, request_id: str) -> bool:
        buf = self.buffers.get(request_id)
        return buf is not None and buf.finished

    def _ready(self, request_id: str) -> bool:
        buf = self.buffers.get(request_id)
        return buf is not None and bool(buf.token_ids or buf.finished)


class DecodeWorker(WorkerShell):
    """Ray actor shell (threaded: polls, submits and placement updates run beside the step loop)."""

    def __init__(self, model_path: str, config, namespace: str):
        from raymoe.actors.remote_backend import connect_experts, pool_set
        from raymoe.actors.worker_model import build_engine

        self.namespace, self._controller = namespace, None
        self.experts = connect_experts(namespace, model_path, config, config.transport)
        engine = build_engine(model_path, config.engine, self.experts, config.num_microbatches)
        self.core = DecodeCore(engine, pool_set(namespace, config))
        self.outbox = Outbox()
        self.lock = threading.Lock()  # one step, submit or abort at a time
        self.wake = threading.Event()
        self._reporting = threading.Lock()  # one report at a time, in order
        self._in_flight: list = []  # the refs of the last report sent
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        import torch

        torch.set_num_threads(torch.get_num_threads())  # OpenMP keeps a thread count per thread: set it here too
        last_report, unreported = time.monotonic(), False
        while True:
            self.wake.wait(0.05)
            with self.lock:
                idle = not self.core.has_work()
                if idle:
                    self.wake.clear()
                else:
                    deltas = self._step()
            if not idle:
                self.outbox.add(deltas)
                unreported = True
            if unreported and (idle or time.monotonic() - last_report > LOAD_REPORT_S):
                last_report, unreported = time.monotonic(), False
                self._report_load()

    def _step(self) -> dict[str, TokenDelta]:
        try:
            return self.core.step()
        except Exception as e:  # noqa: BLE001 (crash-only: see worker_model.die)
            die(f"decode step failed: {e!r}")

    def _report_load(self, wait: bool = False) -> None:
        """Per-expert token counts (its replication policy's input), where rows went
        (`RemoteExperts.count_summary`) and each running request's routing since the last report
        (the grouping policies' request profiles) to the controller. wait: return once the
        controller holds these and every earlier report."""
        import ray

        from raymoe.cluster.controller import CONTROLLER_NAME

        with self._reporting:  # reports land in order: a re-plan's window ends with the last one
            if self._controller is None:
                self._controller = ray.get_actor(CONTROLLER_NAME, namespace=self.namespace)
            context = ray.get_runtime_context()
            dispatch = {**self.experts.count_summary(), "speculative": self.core.spec_stats()}  # cumulative, like rows
            refs = [self._controller.report_load.remote(context.get_actor_id(), self.experts.take_load().tolist(),
                                                        dispatch)]  # fmt: skip
            with self.lock:
                routing = self.core.routing_since_report()
            if routing:
                refs.append(self._controller.report_requests.remote(context.get_node_id(), routing))
            if wait:
                ray.get(self._in_flight + refs)
            self._in_flight = refs

    def hold(self, tokens: int | None) -> None:
        """Stop stepping once every sequence has `tokens` output tokens (None: go on): the
        step-aligned re-plan's barrier. Sequences submitted meanwhile wait there too."""
        with self.lock:
            self.core.hold_at = tokens
        self.wake.set()

    def flush_reports(self) -> bool:
        """Report now and return once the controller holds every report so far; True when the
        worker is held (no step runs until `hold` moves on)."""
        self._report_load(wait=True)
        with self.lock:
            return self.core.is_held()

    def submit(self, requests: list[WorkRequest], kv: dict | None = None) -> None:
        """kv: the requests' prompt blocks straight from their prefill worker (a direct KV
        transport: the front passes `take_kv`'s ref here, and Ray moves the tensor over the group)."""
        direct = blocks_by_key(kv)
        with self.lock:
            for r in requests:
                self.core.submit(r, direct)
        self.wake.set()

    def poll(self, request_ids: list[str] | None, timeout_s: float = 1.0, linger_s: float = 0.0) -> dict[str, TokenDelta]:
        """New tokens of `request_ids` (None: of every request), waiting up to timeout_s for some,
        then up to linger_s for more (`Outbox.take`)."""
        return self.outbox.take(request_ids, timeout_s, linger_s)

    def abort(self, request_ids: list[str]) -> None:
        with self.lock:
            for rid in request_ids:
                self.core.abort(rid)

    def release(self, request_ids: list[str]) -> dict[str, str]:
        """Hand running sequences over to another worker: their KV goes to this node's pool.
        Returns request id -> this node's id for those released (finished ones are not)."""
        with self.lock:
            released = [r for r in request_ids if self.core.release(r)]
        with self.outbox.cond:
            for rid in released:
                self.outbox.buffers.pop(rid, None)  # undelivered tokens: the new worker recomputes them
        return {rid: self.core.pool.node_id for rid in released}

    def set_placement(self, placement, handles) -> int:
        """Takes effect at the next step boundary: the lock waits out a running step."""
        with self.lock:
            self.experts.set_placement(placement, handles)
        return placement.epoch

    def progress(self) -> int | None:
        """The fewest output tokens any unfinished sequence here has (None: none runs)."""
        with self.lock:
            return min((seq.num_output_tokens for seq, _ in self.core.engine.requests.values()), default=None)

    def stats(self) -> dict:
        bm = self.core.engine.block_manager
        return {**self.core.stats, "running": len(self.core.engine.requests),
                "kv_blocks_used": bm.num_blocks - bm.num_free_blocks, "kv_blocks": bm.num_blocks,
                "dispatch": self.experts.count_summary(), "speculative": self.core.spec_stats()}  # fmt: skip

    def routing(self, request_ids: list[str]) -> dict:
        """Each running request's routing on this worker so far (for re-seating on drift)."""
        with self.lock:
            return self.core.routing(request_ids)

    def take_timings(self) -> dict:
        """Step and expert round-trip seconds since the last take (for the step breakdown)."""
        with self.lock:
            return {**self.core.take_timings(), **self.experts.take_timings()}
