"""Server-sent events exactly as OpenAI sends them: `data: <json>\\n\\n` per chunk, then `data: [DONE]`."""

from __future__ import annotations

import json

DONE = "data: [DONE]\n\n"


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def completion_chunk(request_id: str, created: int, model: str, text: str, finish_reason: str | None,
                     index: int = 0, logprobs: dict | None = None) -> dict:  # fmt: skip
    return {
        "id": request_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }  # fmt: skip


def chat_chunk(request_id: str, created: int, model: str, delta: dict, finish_reason: str | None,
               index: int = 0, logprobs: dict | None = None) -> dict:  # fmt: skip
    return {
        "id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }  # fmt: skip


def usage_chunk(base: dict, usage: dict) -> dict:
    """The extra last chunk sent with stream_options.include_usage: no choices, only usage."""
    return {**{k: base[k] for k in ("id", "object", "created", "model")}, "choices": [], "usage": usage}
