"""What the sync and async clients share: request bodies, retry rules, SSE parsing."""

from __future__ import annotations

import json
from typing import Any

from raymoe.client.errors import APIError, RateLimitError, ServiceUnavailableError

MAX_BACKOFF_S = 10.0


def base_url(url: str) -> str:
    """The server's root: "http://host:8000" and the OpenAI-style "http://host:8000/v1" both work."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def sampling_body(model: str, max_tokens, temperature, top_p, seed, stop, stream: bool, extra: dict) -> dict:
    body: dict[str, Any] = {"model": model, "stream": stream}
    for key, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                       ("seed", seed), ("stop", stop)):  # fmt: skip
        if value is not None:
            body[key] = value
    # as the openai client: a stream ends with a usage chunk (no choices) only when asked, with
    # stream_options={"include_usage": True}
    return {**body, **extra}


def chunk_fields(chunks, share, documents=None) -> dict:
    """The raymoe chunk-cache extension fields: `chunks`, token-id spans of the prompt whose KV the
    server may reuse at any position, or `documents`, texts placed before the prompt and reused the
    same way; `share` of their tokens recomputed (float, "adaptive", None: the server's default)."""
    fields = {} if share is None else {"raymoe_chunk_share": share}
    if chunks is not None:
        fields["raymoe_chunks"] = [list(c) for c in chunks]
    if documents is not None:
        fields["raymoe_documents"] = list(documents)
    return fields


def is_retryable(error: Exception, method: str) -> bool:
    """Retry only where no work can be repeated: the server refused (429/503) before taking the
    request, or the connection never opened; other failures are retried for GET alone."""
    import httpx

    if isinstance(error, (RateLimitError, ServiceUnavailableError)):
        return True
    if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return True
    if method == "GET":
        return isinstance(error, httpx.TransportError) or (isinstance(error, APIError) and error.status_code >= 500)
    return False


def backoff_s(error: Exception, attempt: int) -> float:
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        return min(float(retry_after), MAX_BACKOFF_S)
    return min(0.25 * 2**attempt, MAX_BACKOFF_S)


def sse_payload(line: str) -> dict | None:
    """The JSON of one `data:` line; None for blank lines, comments and the final [DONE]."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    return json.loads(data)


def headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
