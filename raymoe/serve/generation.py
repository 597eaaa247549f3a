"""One admitted request's backend stream, rendered as a JSON body or as OpenAI SSE events.

The backend stream yields lists of deltas ({"token_ids", "text", "finished", "finish_reason"}).
If the consumer stops early (the HTTP client went away) the stream is cancelled, which aborts
the sequence in the engine and frees its KV blocks.
"""

from __future__ import annotations

import time

from raymoe.serve import sse
from raymoe.serve.metrics import ServeMetrics
from raymoe.serve.openai_api import now


class Generation:
    """One admitted request's backend stream, rendered as a JSON body or as SSE events."""

    def __init__(self, request_id: str, model: str, num_prompt_tokens: int, stream, metrics: ServeMetrics,
                 start: float):  # fmt: skip
        self.request_id, self.model, self.num_prompt_tokens = request_id, model, num_prompt_tokens
        self.stream, self.metrics, self.start, self.created = stream, metrics, start, now()
        self.num_tokens, self.first, self.last, self.finish_reason = 0, None, None, None

    async def deltas(self):
        """Text per backend message (one or more tokens' deltas); cancels the backend stream
        (aborting the sequence) if the consumer stops early."""
        try:
            async for item in self.stream:
                if isinstance(item, dict) and "error" in item:
                    raise RuntimeError(item["error"]["message"])
                self.last = time.perf_counter()
                self.first = self.first or self.last
                for delta in item:
                    self.num_tokens += len(delta["token_ids"])
                    self.finish_reason = delta["finish_reason"]
                yield "".join(delta["text"] for delta in item)  # a chunk of deltas: one event
        finally:
            if self.finish_reason is None:
                self.stream.cancel()
            self.metrics.observe_generation(self.start, self.first, self.last, self.num_tokens)

    def usage(self) -> dict:
        n, m = self.num_prompt_tokens, self.num_tokens
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    async def completion_body(self, echo: str) -> dict:
        text = echo + "".join([t async for t in self.deltas()])
        chunk = sse.completion_chunk(self.request_id, self.created, self.model, text, self.finish_reason)
        return {**chunk, "object": "text_completion", "usage": self.usage()}

    async def chat_body(self) -> dict:
        text = "".join([t async for t in self.deltas()])
        message = {"role": "assistant", "content": text}
        return {"id": self.request_id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason}],
                "usage": self.usage()}  # fmt: skip

    async def completion_events(self, include_usage: bool, echo: str):
        args = (self.request_id, self.created, self.model)
        if echo:
            yield sse.event(sse.completion_chunk(*args, echo, None))
        async for text in self._with_finish(self.deltas()):
            yield sse.event(sse.completion_chunk(*args, *text))
        if include_usage:
            yield sse.event(sse.usage_chunk(sse.completion_chunk(*args, "", None), self.usage()))
        yield sse.DONE

    async def chat_events(self, include_usage: bool):
        args = (self.request_id, self.created, self.model)
        yield sse.event(sse.chat_chunk(*args, {"role": "assistant", "content": ""}, None))
        async for text, finish_reason in self._with_finish(self.deltas()):
            yield sse.event(sse.chat_chunk(*args, {"content": text} if text else {}, finish_reason))
        if include_usage:
            yield sse.event(sse.usage_chunk(sse.chat_chunk(*args, {}, None), self.usage()))
        yield sse.DONE

    async def _with_finish(self, texts):
        """(text, finish_reason) pairs; the finish reason rides on the last one, as OpenAI sends it."""
        async for text in texts:
            finish = self.finish_reason
            if text or finish:
                yield text, finish

