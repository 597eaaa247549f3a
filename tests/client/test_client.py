"""raymoe's SDK (sync, async, streaming, admin, typed errors) against a running `raymoe serve`."""

import asyncio

import httpx
import pytest
from serve_harness import API_KEY, MODEL

from raymoe.client import (
    AsyncClient, AuthenticationError, BadRequestError, Client, NotFoundError, NotImplementedByServerError,
    ServiceUnavailableError,
)  # fmt: skip
from raymoe.client import _common
from raymoe.client.errors import error_from_response
from raymoe.serve.openai_api import ChatCompletion, ChatCompletionChunk, Completion

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.base_url, api_key=API_KEY, timeout=120, max_retries=1) as c:
        yield c


def test_sync_complete_and_stream(client):
    out = client.complete("The sky is", max_tokens=4, temperature=0)  # model picked from /v1/models
    assert isinstance(out, Completion) and out.model == MODEL and out.usage.completion_tokens == 4
    # as with the openai client: every chunk has a choice unless usage is asked for
    text = "".join(c.choices[0].text for c in client.complete_stream("The sky is", max_tokens=4, temperature=0))
    assert text == out.choices[0].text
    chunks = list(client.complete_stream("The sky is", max_tokens=4, temperature=0,
                                         stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].usage.completion_tokens == 4 and not chunks[-1].choices


@pytest.mark.parametrize("suffix", ["", "/v1/"])
def test_base_url_with_or_without_v1(server, suffix):
    with Client(server.base_url + suffix, api_key=API_KEY, timeout=120, max_retries=0) as c:
        assert c.models().data[0].id == MODEL
        chat = c.chat_stream([{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0)
        assert isinstance("".join(ch.choices[0].delta.content or "" for ch in chat), str)


def test_base_url_normalisation():
    assert _common.base_url("http://h:8000/v1/") == _common.base_url("http://h:8000") == "http://h:8000"
    assert _common.base_url("http://h/raymoe/v1") == "http://h/raymoe"


def test_sync_chat_and_stream(client):
    messages = [{"role": "user", "content": "Hello"}]
    out = client.chat(messages, max_tokens=4, temperature=0)
    assert isinstance(out, ChatCompletion) and out.choices[0].finish_reason == "length"
    chunks = list(client.chat_stream(messages, max_tokens=4, temperature=0))
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content


def test_async_client(server):
    async def run():
        async with AsyncClient(f"{server.base_url}/v1", api_key=API_KEY, timeout=120) as c:  # openai-style URL
            whole = await c.complete("Numbers:", max_tokens=4, temperature=0)
            text = "".join([ch.choices[0].text async for ch in c.complete_stream("Numbers:", max_tokens=4,
                                                                                 temperature=0)])  # fmt: skip
            chat = await c.chat([{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)
            streamed = [ch async for ch in c.chat_stream([{"role": "user", "content": "Hi"}], max_tokens=3,
                                                         temperature=0)]  # fmt: skip
            return whole, text, chat, streamed, (await c.cluster()).backend

    whole, text, chat, streamed, backend = asyncio.run(run())
    assert text == whole.choices[0].text
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == chat.choices[0].message.content
    assert backend == "engine"


def test_typed_errors_carry_server_message(server, client):
    with pytest.raises(BadRequestError) as e:
        client.complete("x", max_tokens=0)
    assert e.value.param == "max_tokens" and "max_tokens" in e.value.message and e.value.status_code == 400
    with pytest.raises(NotFoundError):
        client.complete("x", model="no-such-model")
    with Client(server.base_url, api_key="wrong") as bad, pytest.raises(AuthenticationError) as e:
        bad.models()
    assert e.value.code == "invalid_api_key"
    with pytest.raises(NotImplementedByServerError):
        client.scale("decode", 2)
    assert client.health()["status"] == "ok" and client.cluster().workers


def test_retry_rules():
    refused = error_from_response(503, b'{"error": {"message": "full", "type": "server_overloaded"}}',
                                  {"retry-after": "2"})  # fmt: skip
    assert isinstance(refused, ServiceUnavailableError) and refused.retry_after == 2 and refused.message == "full"
    assert _common.is_retryable(refused, "POST")  # the server did not take it: safe to resend
    assert _common.is_retryable(httpx.ConnectError("refused"), "POST")  # never sent
    assert not _common.is_retryable(httpx.ReadTimeout("slow"), "POST")  # may be generating: never resent
    assert _common.is_retryable(httpx.ReadTimeout("slow"), "GET")
    internal = error_from_response(500, b"oops", {})
    assert not _common.is_retryable(internal, "POST") and internal.message == "oops"


def test_connection_error_typed():
    from raymoe.client import APIConnectionError

    with Client("http://127.0.0.1:9", timeout=2, max_retries=1) as c, pytest.raises(APIConnectionError):
        c.health()
