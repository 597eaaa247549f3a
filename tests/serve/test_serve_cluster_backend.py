"""`backend: cluster`: the same HTTP API served by the disaggregated cluster (controller, expert
shards, KV pool, prefill and decode worker actors) gives the one-process engine's greedy text."""

import httpx
import pytest
from openai import OpenAI

from raymoe.engine.llm import LLM
from raymoe.engine.sampling_params import SamplingParams
from serve_harness import API_KEY, CONFIG, MODEL, start_server, stop_server

CLUSTER_CONFIG = {**CONFIG, "backend": "cluster", "cluster": {"replicas": 1, "kv_pool_bytes": 16 << 20}}
PROMPTS = ["The quick brown fox", "Once upon a time", "def main():"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("cluster-serve"), CLUSTER_CONFIG)
    yield s
    assert stop_server(s) == 0, s.log()


def test_completions_equal_the_one_process_engine(server):
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY)
    llm = LLM()
    for prompt in PROMPTS:
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        expected = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
        assert got.choices[0].text == expected.text
        assert got.usage.completion_tokens == len(expected.token_ids)


def test_streaming_and_admin_report_the_cluster(server):
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=8, temperature=0, stream=True)  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    status = httpx.get(f"{server.base_url}/admin/cluster", headers=headers, timeout=60).json()
    assert status["backend"] == "cluster"
    assert {w["kind"] for w in status["workers"]} == {"prefill", "decode"}
    epoch = status["placement_epoch"]
    r = httpx.post(f"{server.base_url}/admin/rebalance", headers=headers, timeout=120)
    assert r.status_code == 200 and r.json()["placement_epoch"] > epoch
