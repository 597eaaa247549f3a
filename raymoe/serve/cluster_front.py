"""The request path of `backend: cluster` over Serve handles: prefill, hand over, decode, stream.

`ServeFront.run(request)` asks the prefill deployment for the first token (its KV lands in the
prefill node's pool), then streams the rest from the decode deployment, turning tokens into text
with stop strings applied (`Tracked`, shared with the actor-based front). A decode stream that
breaks (its replica died, or was stopped by a scale-down before the sequence ended) is resumed on
another replica from the tokens already delivered, its prompt KV fetched from the pool: the
caller never sees a token twice or misses one. A lost prefill is retried the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

from raymoe.cluster.handoff import Handoff, WorkRequest
from raymoe.cluster.front import Tracked
from raymoe.engine.llm_engine import RequestOutput
from raymoe.errors import InvalidRequestError, RaymoeError

logger = logging.getLogger(__name__)
CLIENT_ERRORS = (InvalidRequestError, ValueError)  # the request's own fault: retrying cannot help


def retryable(error: Exception) -> bool:
    """A lost replica or worker, a node gone under a call, a shard being replaced: anything but
    the request's own fault. Resuming is idempotent (delivered tokens are tracked), so it is safe."""
    return not isinstance(error, CLIENT_ERRORS)
MAX_ATTEMPTS = 60  # per request, for prefill and for decode resumes each
RETRY_WAIT_S = 1.0  # Serve or the replica needs a moment to replace a dead worker


class RequestLostError(RaymoeError):
    """A request kept failing over; no healthy replica finished it."""


class ServeFront:
    def __init__(self, prefill, decode, tokenizer, eos_token_ids, max_model_len: int):
        self.prefill, self.decode = prefill, decode
        self.tokenizer, self.eos_token_ids, self.max_model_len = tokenizer, eos_token_ids, max_model_len
        self.stats = {"resumed": 0, "prefill_retries": 0}

    async def run(self, request: WorkRequest) -> AsyncIterator[RequestOutput]:
        """Yield the request's deltas (text with stop strings applied) until it finishes."""
        tracked = Tracked(request, self.tokenizer, self.eos_token_ids, self.max_model_len)
        handoff = await self._prefill(request)
        request.kv_node_id = handoff.kv_node_id
        tracked.routing = handoff.routing  # the decode router seats it by its prompt's experts
        out = tracked.accept([handoff.first_token], handoff.logprobs)
        out.prompt_logprobs = handoff.prompt_logprobs
        out.finished = out.finished or handoff.finish_reason is not None
        out.finish_reason = out.finish_reason or handoff.finish_reason
        tracked.finished = out.finished
        yield out
        for attempt in range(MAX_ATTEMPTS):
            if tracked.finished:
                return
            if attempt:
                self.stats["resumed"] += 1
                await asyncio.sleep(RETRY_WAIT_S)
            try:
                async for delta in self._decode(tracked):
                    yield delta
            except Exception as e:
                if not retryable(e):
                    raise
                logger.warning("decode of %s broke (%r); resuming elsewhere", request.request_id, e)
        if not tracked.finished:
            raise RequestLostError(f"{request.request_id}: decode failed over {MAX_ATTEMPTS} times")

    async def run_samples(self, request: WorkRequest) -> AsyncIterator[RequestOutput]:
        """`run` for each of the request's n samples, their deltas interleaved (`index` set).
        Sample 0 runs first; once its prompt KV is in the pool (its first delta came) the others
        start, and their prefills fetch those blocks instead of computing them."""
        n = request.params.n
        if n == 1:
            async for delta in self.run(request):
                yield delta
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def one(i: int) -> None:
            try:
                async for delta in self.run(sample_request(request, i)):
                    delta.request_id, delta.index = request.request_id, i
                    await queue.put(delta)
                await queue.put(None)
            except Exception as e:  # handed to the consumer
                await queue.put(e)

        tasks = [asyncio.create_task(one(0))]
        try:
            num_done = 0
            while num_done < n:
                item = await queue.get()
                if len(tasks) == 1:
                    tasks += [asyncio.create_task(one(i)) for i in range(1, n)]
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    num_done += 1
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    async def _prefill(self, request: WorkRequest) -> Handoff:
        for attempt in range(MAX_ATTEMPTS):
            try:
                return await self.prefill.prefill.remote(request)
            except Exception as e:
                if not retryable(e):
                    raise
                logger.warning("prefill of %s broke (%r); retrying", request.request_id, e)
                self.stats["prefill_retries"] += 1
                await asyncio.sleep(RETRY_WAIT_S)
        raise RequestLostError(f"{request.request_id}: prefill failed {MAX_ATTEMPTS} times")

    async def _decode(self, tracked: Tracked) -> AsyncIterator[RequestOutput]:
        """One decode stream from where the request stands; stops it on a stop string."""
        stream = self.decode.options(stream=True).decode.remote(tracked.resume_request())
        try:
            async for delta in stream:
                out = tracked.accept(delta.token_ids, delta.logprobs)
                if delta.finished and not out.finished:  # the worker's limits (e.g. context) ended it
                    out.finished, out.finish_reason, tracked.finished = True, delta.finish_reason, True
                if out.token_ids or out.finished:
                    yield out
                if tracked.finished:
                    return
        finally:
            stream.cancel()  # a no-op when it ended; else the replica aborts it (stop string, caller gone)


def sample_request(request: WorkRequest, index: int) -> WorkRequest:
    """Sample `index` of a request as a request of its own (n = 1, seed + index, as the engine's forks)."""
    p = request.params
    if p.n == 1:
        return request
    params = dataclasses.replace(p, n=1, seed=None if p.seed is None else (p.seed + index) % 2**64,
                                 prompt_logprobs=p.prompt_logprobs if index == 0 else None)  # fmt: skip
    return WorkRequest(f"{request.request_id}#{index}", list(request.prompt_token_ids), params)
