"""16 concurrent greedy streams each give exactly the text of the same request sent alone."""

import asyncio

import httpx
import pytest
from serve_harness import API_KEY, MODEL

from raymoe.client import AsyncClient

pytestmark = pytest.mark.timeout(300)
PROMPTS = ["The cat", "In the beginning", "Numbers: 1, 2, 3", "Dear reader,"]
MAX_TOKENS = 8


def test_concurrent_streams_equal_alone(server):
    alone = {}
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        for p in PROMPTS:
            body = {"model": MODEL, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0}
            alone[p] = c.post("/v1/completions", json=body).json()["choices"][0]["text"]

    async def one(client, prompt):
        text = ""
        async for chunk in client.complete_stream(prompt, model=MODEL, max_tokens=MAX_TOKENS, temperature=0):
            text += "".join(c.text for c in chunk.choices)
        return text

    async def all_at_once():
        async with AsyncClient(server.base_url, api_key=API_KEY, timeout=240, max_retries=0) as client:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
            return prompts, await asyncio.gather(*(one(client, p) for p in prompts))

    prompts, texts = asyncio.run(all_at_once())
    assert [alone[p] for p in prompts] == texts
