"""The request path across workers: prefill, hand over, decode, stream; text made here.

`RequestRouter` drives a set of requests through the cluster: it sends prompts to a prefill
worker, hands each first token to a decode worker, long-polls the decode workers for tokens, turns
them into text with stop strings applied (aborting the remote sequence on a stop string), and
resumes the sequences of a decode worker that died on another one, from the tokens already
delivered: the caller never sees a token twice or misses one. A batch whose prefill worker died
is prefilled again on another.

With a `Seating` (speculative token placement), a new request goes to the decode worker whose node
holds most of its prompt's experts, under a per-worker cap; every `reseat_every_s` the running
requests whose routing drifted are moved when the gain beats the move (`Seating.reseat`): the old
worker puts the sequence's KV blocks into its node's pool and drops it, the new one resumes it
from the tokens delivered, importing that KV (exact: the same tokens, the same KV).

With a direct KV transport (`kv_transport` "gloo" or "nccl"), a request's first submit passes its
prefill worker's `take_kv` ref to the decode worker, so the prompt's blocks move over the KV group
(`raymoe.cluster.kv_direct`); resumes and moves read the pool as before.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator

import ray

from raymoe.cluster.handoff import Handoff, TokenDelta, WorkRequest
from raymoe.engine.llm_engine import RequestOutput, make_detokenizer
from raymoe.engine.sequence import Sequence
from raymoe.engine.stop import StopChecker
from raymoe.errors import RaymoeError

ACTOR_DEAD = (ray.exceptions.RayActorError,)


class NoWorkerError(RaymoeError):
    """Every decode (or prefill) worker is dead."""


class Tracked:
    """The front's view of one request: tokens delivered so far and its stop checks."""

    def __init__(self, request: WorkRequest, tokenizer, eos_token_ids, max_model_len: int):
        self.request = request
        self.seq = Sequence.resumed(request.prompt_token_ids, [], request.params, request.request_id)
        detok = make_detokenizer(tokenizer, request.prompt_token_ids) if tokenizer is not None else None
        self.stop = StopChecker(request.params, eos_token_ids, max_model_len, detok)
        self.finished = False
        self.worker = None
        self.routing = None  # numpy [moe layers, experts]: the prompt's routing, from the prefill

    def accept(self, token_ids: list[int], logprobs: list | None = None) -> RequestOutput:
        """Take tokens (and their logprobs entries, when asked) from a worker; returns the delta for
        the caller (stops applied here too)."""
        taken, text, reason = [], "", None
        for token_id in token_ids:
            if self.finished:
                break
            self.seq.append_token(token_id)
            taken.append(token_id)
            delta, reason = self.stop.check(self.seq)
            text += delta
            self.finished = reason is not None
        r = self.request
        out = RequestOutput(r.request_id, r.prompt_token_ids, taken, text, self.finished, reason)
        if r.params.logprobs is not None:
            out.logprobs = list(logprobs or [])[: len(taken)]
        return out

    def resume_request(self) -> WorkRequest:
        """Where the request stands, for a decode worker (the prompt's logprobs came with the prefill)."""
        r = self.request
        params = r.params if r.params.prompt_logprobs is None else dataclasses.replace(r.params, prompt_logprobs=None)
        return WorkRequest(r.request_id, r.prompt_token_ids, params, self.seq.output_token_ids, r.kv_node_id,
                           self.routing, r.kv_tail)  # fmt: skip


class RequestRouter:
    def __init__(self, prefill_workers: list, decode_workers: list, tokenizer, eos_token_ids, max_model_len: int,
                 poll_timeout_s: float = 0.5, seating=None, decode_nodes: list[str] | None = None,
                 reseat_every_s: float | None = None, kv_transport: str = "pool"):  # fmt: skip
        self.prefill = list(prefill_workers)  # (handle, node_id)
        self.kv_transport = kv_transport  # "pool", or the RDT transport of take_kv ("gloo", "nccl")
        self.kv_source: dict[str, object] = {}  # request id -> the prefill worker keeping its blocks
        self.num_kv_fallbacks = 0  # direct submits that failed and went again through the pool
        self.decode = list(decode_workers)  # handles
        self.decode_nodes = list(decode_nodes) if decode_nodes is not None else [None] * len(self.decode)
        self.seating, self.reseat_every_s = seating, reseat_every_s  # a raymoe.cluster.seating.Seating
        self.seat_of: dict[str, object] = {}  # request id -> the decode worker running it
        self.tokenizer, self.eos_token_ids, self.max_model_len = tokenizer, eos_token_ids, max_model_len
        self.poll_timeout_s = poll_timeout_s
        self._rr = itertools.count()
        self.num_resumed, self.num_reseated = 0, 0
        self._reseat_requested = False
        self._after_reseat: list[Callable[[], object]] = []
        self.num_prefill_retries = 0
        self.cancelled: set[str] = set()  # request ids whose caller went away

    def request_reseat(self, then: Callable[[], object] | None = None) -> None:
        """Re-seat the running requests at the next poll round (e.g. after a new placement), then
        call `then` (a step-aligned re-plan lets the held workers go on there)."""
        self._reseat_requested = True
        if then is not None:
            self._after_reseat.append(then)

    def cancel(self, request_id: str) -> None:
        """Stop a request (its caller is gone); `run` aborts it on its worker and ends it."""
        self.cancelled.add(request_id)

    def run(self, requests: list[WorkRequest], linger_s: float = 0.0) -> Iterator[RequestOutput]:
        """Yield deltas of every request until all finish. linger_s: each poll of a decode worker
        gathers tokens for up to that long once some are ready (a caller that wants whole outputs
        only, not a stream, saves per-step round trips; a finishing request answers at once)."""
        tracked = {r.request_id: Tracked(r, self.tokenizer, self.eos_token_ids, self.max_model_len) for r in requests}
        for handoff in self._prefill(requests):
            t = tracked[handoff.request_id]
            t.routing = handoff.routing
            out = t.accept([handoff.first_token])
            out.finished = out.finished or handoff.finish_reason is not None
            out.finish_reason = out.finish_reason or handoff.finish_reason
            t.finished = out.finished
            yield out
        self._submit([t for t in tracked.values() if not t.finished])
        yield from self._stream(tracked, linger_s)

    def _prefill(self, requests: list[WorkRequest]) -> list[Handoff]:
        """First tokens of `requests`; a prefill worker that dies under the batch is dropped and the
        batch prefilled again on another (its KV blocks are content-keyed: a partial write is harmless)."""
        while True:
            if not self.prefill:
                raise NoWorkerError("no live prefill worker: the cluster needs at least one")
            worker = self.prefill[next(self._rr) % len(self.prefill)]
            for r in requests:
                r.kv_node_id = worker[1]  # where its prompt KV will be pooled
            try:
                handoffs = ray.get(worker[0].prefill.remote(requests))
            except ACTOR_DEAD:
                self.prefill.remove(worker)
                self.num_prefill_retries += 1
                continue
            if self.kv_transport != "pool":
                self.kv_source.update({h.request_id: worker[0] for h in handoffs if h.finish_reason is None})
            return handoffs

    def _submit(self, items: list[Tracked], workers: list | None = None) -> None:
        """Admit `items` on decode workers (picked here unless given), all at once; a request's first
        submit after its prefill brings its blocks directly under a direct KV transport."""
        groups: dict = {}  # (decode worker, prefill worker keeping the blocks or None) -> items
        for t, worker in zip(items, workers or self._pick_decode(items)):
            t.worker = self.seat_of[t.request.request_id] = worker
            groups.setdefault((worker, self.kv_source.pop(t.request.request_id, None)), []).append(t)
        sent = {key: self._send(*key, ts) for key, ts in groups.items()}
        for (worker, source), ref in sent.items():
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                if source is not None:  # maybe the blocks failed (their prefill worker died), not the worker:
                    again = [t for t in groups[(worker, source)] if t.worker is worker]
                    self.num_kv_fallbacks += 1
                    self._submit(again, [worker] * len(again))  # again from the pool; a dead worker fails there
                elif isinstance(e, ACTOR_DEAD):
                    self._drop(worker)
                    self._submit([t for t in items if t.worker is worker])
                else:
                    raise

    def _send(self, worker, source, items: list[Tracked]):
        reqs = [t.resume_request() for t in items]
        if source is None:
            return worker.submit.remote(reqs)
        kv = source.take_kv.options(tensor_transport=self.kv_transport).remote([r.request_id for r in reqs])
        return worker.submit.remote(reqs, kv)  # a top-level argument: Ray moves the tensor over the group

    def _pick_decode(self, items: list[Tracked]) -> list:
        if not self.decode:
            raise NoWorkerError("no live decode worker: the cluster needs at least one")
        if self.seating is None:
            return [self.decode[next(self._rr) % len(self.decode)] for _ in items]
        seats = self.seating.seat([t.routing for t in items], self.decode_nodes, self._running())
        return [self.decode[w] for w in seats]

    def _running(self) -> list[int]:
        """Requests each decode worker runs for this router now."""
        running = {id(w): 0 for w in self.decode}
        for worker in self.seat_of.values():
            if id(worker) in running:
                running[id(worker)] += 1
        return [running[id(w)] for w in self.decode]

    def _drop(self, worker) -> None:
        if worker in self.decode:
            i = self.decode.index(worker)
            del self.decode[i], self.decode_nodes[i]

    def _finish(self, t: Tracked) -> None:
        t.finished = True
        self.seat_of.pop(t.request.request_id, None)

    def _reseat(self, tracked: dict[str, Tracked]) -> None:
        """Move running requests whose routing so far favours another worker's node."""
        by_worker: dict = {}
        for t in tracked.values():
            if not t.finished and t.routing is not None:
                by_worker.setdefault(t.worker, []).append(t)
        asked = {w: w.routing.remote([t.request.request_id for t in ts]) for w, ts in by_worker.items()}
        items, routings = [], []
        for worker, ts in by_worker.items():
            try:
                seen = ray.get(asked[worker])
            except ACTOR_DEAD:
                continue  # the poll loop resumes its requests
            for t in ts:
                items.append(t)
                routings.append(t.routing + seen.get(t.request.request_id, 0))
        if not items or len(self.decode) < 2:
            return
        seats = [self.decode.index(t.worker) for t in items]
        moves = self.seating.reseat(routings, seats, self.decode_nodes, self._running())
        self._move_all([(t, self.decode[m], r) for t, m, r in zip(items, moves, routings) if m is not None])

    def _move(self, t: Tracked, target, routing=None) -> None:
        self._move_all([(t, target, routing)])

    def _move_all(self, moves: list[tuple]) -> None:
        """(request, target worker, its routing so far or None): each old worker pools its moving
        sequences' KV (partial blocks too) and drops them, in one call; the targets resume them
        (one call each). The routing is kept as the request's history (the target counts afresh)."""
        by_source: dict = {}
        for move in moves:
            by_source.setdefault(move[0].worker, []).append(move)
        asked = {w: w.release.remote([t.request.request_id for t, _, _ in ms]) for w, ms in by_source.items()}
        resumed = []
        for worker, ms in by_source.items():
            try:
                released = ray.get(asked[worker])
            except ACTOR_DEAD:
                continue
            for t, target, routing in ms:
                rid = t.request.request_id
                if rid not in released:  # it finished meanwhile: its last tokens are in the outbox
                    continue
                t.request.kv_node_id, t.request.kv_tail = released[rid], True
                if routing is not None:
                    t.routing = routing
                self.num_reseated += 1
                resumed.append((t, target))
        if resumed:
            self._submit([t for t, _ in resumed], [w for _, w in resumed])

    def _stream(self, tracked: dict[str, Tracked], linger_s: float) -> Iterator[RequestOutput]:
        last_reseat = time.monotonic()
        while any(not t.finished for t in tracked.values()):
            self._drop_cancelled(tracked)
            is_due = self.reseat_every_s and time.monotonic() - last_reseat > self.reseat_every_s
            if self.seating is not None and (is_due or self._reseat_requested):
                self._reseat_requested = False
                self._reseat(tracked)
                last_reseat = time.monotonic()
            while self._after_reseat:
                self._after_reseat.pop(0)()
            active: dict = {}
            for rid, t in tracked.items():
                if not t.finished:
                    active.setdefault(t.worker, []).append(rid)
            polls = {w.poll.remote(rids, self.poll_timeout_s, linger_s): (w, rids) for w, rids in active.items()}
            for ref, (worker, rids) in polls.items():
                try:
                    deltas: dict[str, TokenDelta] = ray.get(ref)
                except ACTOR_DEAD:
                    self._drop(worker)
                    self.num_resumed += len(rids)
                    self._submit([tracked[r] for r in rids])
                    continue
                yield from self._deliver(worker, tracked, deltas)

    def _drop_cancelled(self, tracked: dict[str, Tracked]) -> None:
        for rid in [r for r, t in tracked.items() if r in self.cancelled and not t.finished]:
            t = tracked[rid]
            self._finish(t)
            self.cancelled.discard(rid)
            try:
                t.worker.abort.remote([rid])
            except ACTOR_DEAD:
                pass

    def _deliver(self, worker, tracked: dict[str, Tracked], deltas: dict[str, TokenDelta]):
        stopped = []
        for rid, delta in deltas.items():
            t = tracked[rid]
            if t.worker is not worker:  # moved meanwhile: its tokens come from the new worker
                continue
            out = t.accept(delta.token_ids)
            if delta.finished and not out.finished:  # the worker's limits (e.g. context) ended it
                out.finished, out.finish_reason, t.finished = True, delta.finish_reason, True
            elif out.finished and not delta.finished:
                stopped.append(rid)  # a stop string: the worker does not know text
            if t.finished:
                self._finish(t)
            if out.token_ids or out.finished:
                yield out
        if stopped:
            worker.abort.remote(stopped)
