"""`serve.ingress_in_engine: false`: the HTTP ingress as a deployment of its own in front of the engine
deployment (the arrangement before the ingress moved into the engine replica), here also behind
Serve's HTTP proxy (`serve.direct_http: false`, as on a cluster raymoe joins), answers like the
default: the one-process engine's greedy output, the official client, 503 when the queue is full, a
disconnect that aborts, /health, /metrics and /admin. The checks shared with the shared server's are
the same functions, run here against this module's server (RAYMOE_TEST_INGRESS_IN_ENGINE=0 runs
every suite so)."""

import httpx
import pytest
from openai import OpenAI
from serve_harness import API_KEY, CONFIG, MODEL, proxied_config, separate_config, start_server, stop_server
from test_serve_errors import (  # noqa: F401  (fixtures and tests, run again on this server)
    http, test_admin, test_disconnect_mid_stream_aborts, test_health_and_metrics_open,
    test_overload_rejects_excess_and_finishes_accepted, test_the_ingress_replica_listens_on_the_port_itself,
)  # fmt: skip
from test_serve_openai import client, test_chat_and_chat_stream, test_completion_stream_matches_non_stream  # noqa: F401

from raymoe.engine.llm import LLM
from raymoe.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(300)
PROMPTS = ["The quick brown fox", "def main():"]
MESSAGES = [{"role": "user", "content": "Name three colours."}]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("separate-ingress"), proxied_config(separate_config(CONFIG)))
    yield s
    assert stop_server(s) == 0, s.log()


def test_two_deployments_greedy_equals_the_one_process_engine(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    status = httpx.get(f"{server.base_url}/admin/cluster", headers=headers, timeout=60).json()
    assert set(status["deployments"]) == {"ingress", "engine"}
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    llm = LLM()
    for prompt in PROMPTS:
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        expected = llm.generate([prompt], GREEDY)[0]
        assert (got.choices[0].text, got.usage.completion_tokens) == (expected.text, len(expected.token_ids))
    chunks = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    rendered = llm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text == llm.generate([llm.tokenizer.encode(rendered, add_special_tokens=False)], GREEDY)[0].text
