"""The official `openai` client against a running `raymoe serve`: completions, chat, streaming."""

import openai
import pytest
from serve_harness import API_KEY, MODEL

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, timeout=120, max_retries=0)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_usage_and_length(client):
    out = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0)
    assert out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5 and out.usage.prompt_tokens > 0


def test_completion_stream_matches_non_stream(client):
    whole = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=6, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6 and not chunks[-1].choices


def test_chat_and_chat_stream(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == 5
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                                 stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seed_and_stop(client):
    args = dict(model=MODEL, prompt="A story:", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    first, second = (client.completions.create(**args).choices[0].text for _ in range(2))
    assert first == second
    greedy = client.completions.create(model=MODEL, prompt="A story:", max_tokens=8, temperature=0).choices[0].text
    stop = greedy.strip()[:2]
    if stop:
        out = client.completions.create(model=MODEL, prompt="A story:", max_tokens=8, temperature=0, stop=[stop])
        assert stop not in out.choices[0].text and out.choices[0].finish_reason == "stop"


def test_raw_sse_framing(server):
    import httpx

    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
