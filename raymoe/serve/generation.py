"""One admitted request's backend stream, rendered as a JSON body or as OpenAI SSE events.

The backend stream yields lists of deltas ({"token_ids", "text", "finished", "finish_reason",
"index", "logprobs", "prompt_logprobs"}); a request with n > 1 has one choice per `index`, each
finishing on its own. If the consumer stops early (the HTTP client went away) the stream is
cancelled, which aborts the sequence in the engine and frees its KV blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from raymoe.serve import sse
from raymoe.serve.metrics import ServeMetrics
from raymoe.serve.openai_api import now


@dataclass
class Part:
    """One choice's new output in one backend message (or, summed, its whole output)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, other: "Part") -> None:
        self.text += other.text
        self.token_ids += other.token_ids
        self.logprobs += other.logprobs
        self.finish_reason = other.finish_reason


@dataclass
class Echo:
    """The prompt, shown before the output (completions with echo)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)


class Generation:
    """One admitted request's backend stream, rendered as a JSON body or as SSE events.

    logprobs: a `LogprobsFormat` when the request asked for logprobs, else None."""

    def __init__(self, request_id: str, model: str, num_prompt_tokens: int, stream, metrics: ServeMetrics,
                 start: float, n: int = 1, logprobs=None):  # fmt: skip
        self.request_id, self.model, self.num_prompt_tokens = request_id, model, num_prompt_tokens
        self.stream, self.metrics, self.start, self.created = stream, metrics, start, now()
        self.n, self.format = n, logprobs
        self.num_tokens, self.first, self.last = 0, None, None
        self.finish_reasons: list[str | None] = [None] * n
        self.prompt_logprobs: list | None = None  # [None, Entry, ...] once sample 0's first token came

    async def parts(self):
        """Per backend message: {choice index: Part}; cancels the backend stream (aborting the
        sequences) if the consumer stops early."""
        try:
            async for item in self.stream:
                if isinstance(item, dict) and "error" in item:
                    raise RuntimeError(item["error"]["message"])
                self.last = time.perf_counter()
                self.first = self.first or self.last
                parts: dict[int, Part] = {}
                for d in item:
                    i = d.get("index", 0)
                    self.num_tokens += len(d["token_ids"])
                    self.finish_reasons[i] = d["finish_reason"]
                    if d.get("prompt_logprobs") is not None:
                        self.prompt_logprobs = d["prompt_logprobs"]
                    parts.setdefault(i, Part()).add(Part(d["text"], list(d["token_ids"]), d.get("logprobs") or [],
                                                         d["finish_reason"]))  # fmt: skip
                yield parts
        finally:
            if None in self.finish_reasons:
                self.stream.cancel()
            self.metrics.observe_generation(self.start, self.first, self.last, self.num_tokens)

    def usage(self) -> dict:
        n, m = self.num_prompt_tokens, self.num_tokens
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    async def _whole(self) -> list[Part]:
        whole = [Part() for _ in range(self.n)]
        async for parts in self.parts():
            for i, part in parts.items():
                whole[i].add(part)
        return whole

    def _completion_logprobs(self, part: Part, echo: Echo | None, offset: int) -> tuple[dict | None, int]:
        """The logprobs of echo (the prompt, scored) + part's tokens, text offsets from `offset`."""
        if self.format is None:
            return None, offset
        ids, entries = part.token_ids, part.logprobs
        if echo is not None:
            ids, entries = echo.token_ids + ids, (self.prompt_logprobs or [None] * len(echo.token_ids)) + entries
        return self.format.completion(ids, entries, offset)

    async def completion_body(self, echo: Echo) -> dict:
        choices = []
        for i, part in enumerate(await self._whole()):
            logprobs, _ = self._completion_logprobs(part, echo if echo.text or echo.token_ids else None, 0)
            choices.append({"index": i, "text": echo.text + part.text, "logprobs": logprobs,
                            "finish_reason": part.finish_reason})  # fmt: skip
        return {"id": self.request_id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}  # fmt: skip

    async def chat_body(self) -> dict:
        choices = []
        for i, part in enumerate(await self._whole()):
            logprobs = self.format.chat(part.token_ids, part.logprobs) if self.format else None
            choices.append({"index": i, "message": {"role": "assistant", "content": part.text}, "logprobs": logprobs,
                            "finish_reason": part.finish_reason})  # fmt: skip
        return {"id": self.request_id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}  # fmt: skip

    async def completion_events(self, include_usage: bool, echo: Echo):
        args = (self.request_id, self.created, self.model)
        offsets, echoed = [0] * self.n, [not (echo.text or echo.token_ids)] * self.n
        async for parts in self.parts():
            for i, part in parts.items():
                with_echo = None if echoed[i] else echo  # the prompt rides on each choice's first chunk
                if part.text or part.finish_reason or with_echo is not None:
                    logprobs, offsets[i] = self._completion_logprobs(part, with_echo, offsets[i])
                    text = (with_echo.text if with_echo else "") + part.text
                    yield sse.event(sse.completion_chunk(*args, text, part.finish_reason, i, logprobs))
                    echoed[i] = True
                elif self.format is not None and part.token_ids:  # tokens with no text yet: their logprobs
                    logprobs, offsets[i] = self._completion_logprobs(part, None, offsets[i])
                    yield sse.event(sse.completion_chunk(*args, "", None, i, logprobs))
        if include_usage:
            yield sse.event(sse.usage_chunk(sse.completion_chunk(*args, "", None), self.usage()))
        yield sse.DONE

    async def chat_events(self, include_usage: bool):
        args = (self.request_id, self.created, self.model)
        for i in range(self.n):
            yield sse.event(sse.chat_chunk(*args, {"role": "assistant", "content": ""}, None, i))
        async for parts in self.parts():
            for i, part in parts.items():
                logprobs = self.format.chat(part.token_ids, part.logprobs) if self.format and part.token_ids else None
                if part.text or part.finish_reason or logprobs:
                    delta = {"content": part.text} if part.text else {}
                    yield sse.event(sse.chat_chunk(*args, delta, part.finish_reason, i, logprobs))
        if include_usage:
            yield sse.event(sse.usage_chunk(sse.chat_chunk(*args, {}, None), self.usage()))
        yield sse.DONE
