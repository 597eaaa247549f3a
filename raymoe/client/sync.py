"""`Client`: the blocking SDK.

    client = Client("http://127.0.0.1:8000", api_key=None)     # or ".../v1", as the openai client takes
    out = client.complete("The sky is", max_tokens=16, temperature=0)
    print("".join(c.choices[0].text for c in client.complete_stream("The sky is", max_tokens=16)))
    for chunk in client.chat_stream([{"role": "user", "content": "Hi"}]):
        print(chunk.choices[0].delta.content or "", end="")

Streams carry choices only; pass stream_options={"include_usage": True} for a last chunk with the
token counts and no choices (as OpenAI's API).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx

from raymoe.client import _common as common
from raymoe.client.errors import APIConnectionError, APIError, APITimeoutError, error_from_response
from raymoe.serve.openai_api import (
    AdminResult, ChatCompletion, ChatCompletionChunk, ClusterStatus, Completion, ModelList,
)  # fmt: skip


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 2):  # fmt: skip
        self.max_retries = max_retries
        self._http = httpx.Client(base_url=common.base_url(base_url), headers=common.headers(api_key), timeout=timeout)
        self._model: str | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----- OpenAI-compatible -----------------------------------------------------------------
    def models(self) -> ModelList:
        return ModelList.model_validate(self._request("GET", "/v1/models"))

    def complete(self, prompt: str | list[int], model: str | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: str | list[str] | None = None, chunks: list[list[int]] | None = None,
                 chunk_share: float | str | None = None, documents: list[str] | None = None,
                 **extra) -> Completion:  # fmt: skip
        fields = {"prompt": prompt, **common.chunk_fields(chunks, chunk_share, documents), **extra}
        body = self._body(model, max_tokens, temperature, top_p, seed, stop, False, fields)
        return Completion.model_validate(self._request("POST", "/v1/completions", body))

    def complete_stream(self, prompt: str | list[int], model: str | None = None, max_tokens: int | None = None,
                        temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                        stop: str | list[str] | None = None, chunks: list[list[int]] | None = None,
                 chunk_share: float | str | None = None, documents: list[str] | None = None,
                 **extra) -> Iterator[Completion]:  # fmt: skip
        fields = {"prompt": prompt, **common.chunk_fields(chunks, chunk_share, documents), **extra}
        body = self._body(model, max_tokens, temperature, top_p, seed, stop, True, fields)
        for payload in self._stream("/v1/completions", body):
            yield Completion.model_validate(payload)

    def chat(self, messages: list[dict], model: str | None = None, max_tokens: int | None = None,
             temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
             stop: str | list[str] | None = None, **extra) -> ChatCompletion:  # fmt: skip
        body = self._body(model, max_tokens, temperature, top_p, seed, stop, False, {"messages": messages, **extra})
        return ChatCompletion.model_validate(self._request("POST", "/v1/chat/completions", body))

    def chat_stream(self, messages: list[dict], model: str | None = None, max_tokens: int | None = None,
                    temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                    stop: str | list[str] | None = None, **extra) -> Iterator[ChatCompletionChunk]:  # fmt: skip
        body = self._body(model, max_tokens, temperature, top_p, seed, stop, True, {"messages": messages, **extra})
        for payload in self._stream("/v1/chat/completions", body):
            yield ChatCompletionChunk.model_validate(payload)

    # ----- operations ------------------------------------------------------------------------
    def health(self) -> dict:
        return self._request("GET", "/health")

    def cluster(self) -> ClusterStatus:
        return ClusterStatus.model_validate(self._request("GET", "/admin/cluster"))

    def rebalance(self) -> AdminResult:
        return AdminResult.model_validate(self._request("POST", "/admin/rebalance", {}))

    def scale(self, deployment: str, num_replicas: int) -> AdminResult:
        body = {"deployment": deployment, "num_replicas": num_replicas}
        return AdminResult.model_validate(self._request("POST", "/admin/scale", body))

    # ----- plumbing --------------------------------------------------------------------------
    def _body(self, model, max_tokens, temperature, top_p, seed, stop, stream, extra) -> dict:
        if model is None:
            self._model = self._model or self.models().data[0].id
            model = self._model
        return common.sampling_body(model, max_tokens, temperature, top_p, seed, stop, stream, extra)

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        return self._with_retries(method, lambda: self._send(method, path, body))

    def _send(self, method: str, path: str, body: dict | None) -> dict:
        response = self._http.request(method, path, json=body)
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content, response.headers)
        return response.json()

    def _stream(self, path: str, body: dict) -> Iterator[dict]:
        """SSE payloads; retried only until the server accepts (status 200), never mid-stream."""
        response = self._with_retries("POST", lambda: self._open_stream(path, body))
        try:
            for line in response.iter_lines():
                payload = common.sse_payload(line)
                if payload is not None:
                    yield payload
        except httpx.TransportError as e:
            raise APIConnectionError(f"the stream broke: {e}") from e
        finally:
            response.close()  # leaving early closes the connection: the server aborts the request

    def _open_stream(self, path: str, body: dict):
        request = self._http.build_request("POST", path, json=body)
        response = self._http.send(request, stream=True)
        if response.status_code >= 400:
            content = response.read()
            response.close()
            raise error_from_response(response.status_code, content, response.headers)
        return response

    def _with_retries(self, method: str, attempt_fn):
        for attempt in range(self.max_retries + 1):
            try:
                return attempt_fn()
            except (APIError, httpx.TransportError) as e:
                if attempt == self.max_retries or not common.is_retryable(e, method):
                    raise _public(e) from None
                time.sleep(common.backoff_s(e, attempt))


def _public(error: Exception) -> Exception:
    if isinstance(error, httpx.TimeoutException):
        return APITimeoutError(f"no answer within the timeout: {error}")
    if isinstance(error, httpx.TransportError):
        return APIConnectionError(f"cannot reach the server: {error}")
    return error
