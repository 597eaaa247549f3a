"""`AsyncClient`: the asyncio SDK, the same calls as `Client` awaited; streams are async iterators.

    async with AsyncClient("http://127.0.0.1:8000") as client:
        async for chunk in client.complete_stream("Once upon a time", max_tokens=32):
            print(chunk.choices[0].text, end="")
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx

from raymoe.client import _common as common
from raymoe.client.errors import APIConnectionError, APIError, error_from_response
from raymoe.client.sync import _public
from raymoe.serve.openai_api import (
    AdminResult, ChatCompletion, ChatCompletionChunk, ClusterStatus, Completion, ModelList,
)  # fmt: skip


class AsyncClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 2):  # fmt: skip
        self.max_retries = max_retries
        self._http = httpx.AsyncClient(base_url=common.base_url(base_url), headers=common.headers(api_key), timeout=timeout)
        self._model: str | None = None

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # ----- OpenAI-compatible -----------------------------------------------------------------
    async def models(self) -> ModelList:
        return ModelList.model_validate(await self._request("GET", "/v1/models"))

    async def complete(self, prompt: str | list[int], model: str | None = None, max_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                       stop: str | list[str] | None = None, chunks: list[list[int]] | None = None,
                 chunk_share: float | str | None = None, documents: list[str] | None = None,
                 **extra) -> Completion:  # fmt: skip
        fields = {"prompt": prompt, **common.chunk_fields(chunks, chunk_share, documents), **extra}
        body = await self._body(model, max_tokens, temperature, top_p, seed, stop, False, fields)
        return Completion.model_validate(await self._request("POST", "/v1/completions", body))

    async def complete_stream(self, prompt: str | list[int], model: str | None = None, max_tokens: int | None = None,
                              temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                              stop: str | list[str] | None = None, chunks: list[list[int]] | None = None,
                 chunk_share: float | str | None = None, documents: list[str] | None = None,
                 **extra) -> AsyncIterator[Completion]:  # fmt: skip
        fields = {"prompt": prompt, **common.chunk_fields(chunks, chunk_share, documents), **extra}
        body = await self._body(model, max_tokens, temperature, top_p, seed, stop, True, fields)
        async for payload in self._stream("/v1/completions", body):
            yield Completion.model_validate(payload)

    async def chat(self, messages: list[dict], model: str | None = None, max_tokens: int | None = None,
                   temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                   stop: str | list[str] | None = None, **extra) -> ChatCompletion:  # fmt: skip
        body = await self._body(model, max_tokens, temperature, top_p, seed, stop, False, {"messages": messages, **extra})
        return ChatCompletion.model_validate(await self._request("POST", "/v1/chat/completions", body))

    async def chat_stream(self, messages: list[dict], model: str | None = None, max_tokens: int | None = None,
                          temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                          stop: str | list[str] | None = None, **extra) -> AsyncIterator[ChatCompletionChunk]:  # fmt: skip
        body = await self._body(model, max_tokens, temperature, top_p, seed, stop, True, {"messages": messages, **extra})
        async for payload in self._stream("/v1/chat/completions", body):
            yield ChatCompletionChunk.model_validate(payload)

    # ----- operations ------------------------------------------------------------------------
    async def health(self) -> dict:
        return await self._request("GET", "/health")

    async def cluster(self) -> ClusterStatus:
        return ClusterStatus.model_validate(await self._request("GET", "/admin/cluster"))

    async def rebalance(self) -> AdminResult:
        return AdminResult.model_validate(await self._request("POST", "/admin/rebalance", {}))

    async def scale(self, deployment: str, num_replicas: int) -> AdminResult:
        body = {"deployment": deployment, "num_replicas": num_replicas}
        return AdminResult.model_validate(await self._request("POST", "/admin/scale", body))

    # ----- plumbing --------------------------------------------------------------------------
    async def _body(self, model, max_tokens, temperature, top_p, seed, stop, stream, extra) -> dict:
        if model is None:
            self._model = self._model or (await self.models()).data[0].id
            model = self._model
        return common.sampling_body(model, max_tokens, temperature, top_p, seed, stop, stream, extra)

    async def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        return await self._with_retries(method, lambda: self._send(method, path, body))

    async def _send(self, method: str, path: str, body: dict | None) -> dict:
        response = await self._http.request(method, path, json=body)
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content, response.headers)
        return response.json()

    async def _stream(self, path: str, body: dict) -> AsyncIterator[dict]:
        response = await self._with_retries("POST", lambda: self._open_stream(path, body))
        try:
            async for line in response.aiter_lines():
                payload = common.sse_payload(line)
                if payload is not None:
                    yield payload
        except httpx.TransportError as e:
            raise APIConnectionError(f"the stream broke: {e}") from e
        finally:
            await response.aclose()  # leaving early closes the connection: the server aborts the request

    async def _open_stream(self, path: str, body: dict):
        request = self._http.build_request("POST", path, json=body)
        response = await self._http.send(request, stream=True)
        if response.status_code >= 400:
            content = await response.aread()
            await response.aclose()
            raise error_from_response(response.status_code, content, response.headers)
        return response

    async def _with_retries(self, method: str, attempt_fn):
        for attempt in range(self.max_retries + 1):
            try:
                return await attempt_fn()
            except (APIError, httpx.TransportError) as e:
                if attempt == self.max_retries or not common.is_retryable(e, method):
                    raise _public(e) from None
                await asyncio.sleep(common.backoff_s(e, attempt))
