"""The chunk-cache extension of the OpenAI API (`raymoe_chunks`, `raymoe_chunk_share`): validated into
the request's ChunkReuse, bad values answered 400 naming the field; through a running server and the
raymoe SDK, a 100% recompute share returns the plain completion, and /metrics counts the reused tokens."""

import httpx
import pytest
from serve_harness import API_KEY, MODEL

from raymoe.client import Client
from raymoe.client.errors import BadRequestError
from raymoe.engine.chunks import DEFAULT_SHARE
from raymoe.serve.openai_api import CompletionRequest
from raymoe.serve.protocol import APIError, sampling_params


def params_of(**fields):
    req = CompletionRequest.model_validate({"model": MODEL, "prompt": [1, 2, 3, 4], **fields})
    return sampling_params(req, 4, 512, 16)


def test_extension_fields_become_the_chunk_reuse():
    assert params_of().chunk_reuse is None  # off by default
    assert params_of(raymoe_chunks=[[2, 3]]).chunk_reuse.recompute_share == DEFAULT_SHARE
    reuse = params_of(raymoe_chunks=[[2, 3], [4]], raymoe_chunk_share=0.3).chunk_reuse
    assert reuse.chunks == ((2, 3), (4,)) and reuse.recompute_share == 0.3
    assert params_of(raymoe_chunks=[[2]], raymoe_chunk_share="adaptive").chunk_reuse.recompute_share is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"raymoe_chunks": [[2]], "raymoe_chunk_share": 1.5}, "raymoe_chunk_share"),
        ({"raymoe_chunks": [[]]}, "raymoe_chunks"),
        ({"raymoe_chunks": [[-1]]}, "raymoe_chunks"),
        ({"raymoe_chunk_share": 0.2}, "raymoe_chunk_share"),
    ],
)
def test_bad_extension_values_are_400(fields, param):
    with pytest.raises(APIError) as e:
        params_of(**fields)
    assert e.value.status == 400 and e.value.param == param


@pytest.mark.timeout(300)
def test_sdk_chunks_through_the_server(server):
    doc = [(7 * i + 3) % 200 + 10 for i in range(40)]
    prompt = [11, 12] + doc + [13, 14, 15]
    with Client(server.base_url, api_key=API_KEY, timeout=120, max_retries=0) as client:
        plain = client.complete(prompt, model=MODEL, max_tokens=8, temperature=0)
        full = client.complete(prompt, model=MODEL, max_tokens=8, temperature=0, chunks=[doc], chunk_share=1.0)
        assert full.choices[0].text == plain.choices[0].text
        reused = client.complete(prompt, model=MODEL, max_tokens=8, temperature=0, chunks=[doc], chunk_share=0.1)
        assert reused.usage.completion_tokens == 8
        assert metric(server, "raymoe_chunk_tokens_reused_total") > 0  # share 0.1: most placed tokens kept
        with pytest.raises(BadRequestError, match="not a sub-span"):
            client.complete(prompt, model=MODEL, max_tokens=4, chunks=[list(range(1, 9))])


def metric(server, name: str) -> float:
    """A metric's value on the server's /metrics (0 when absent)."""
    for line in httpx.get(server.base_url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.timeout(300)
def test_documents_as_text_through_the_server(server):
    """raymoe_documents: each document tokenized alone before the prompt; a 100% share equals the
    plain completion of those same token ids, and chat document parts are accepted the same way."""
    from raymoe.engine.chunks import Chunk, build_prompt
    from raymoe.model.builtin import builtin_model_path
    from raymoe.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(builtin_model_path())
    docs = ["Ray schedules tasks and actors across a cluster of machines.", "Experts are feed-forward layers."]
    ids, reuse = build_prompt(lambda t, add: tok.encode(t, add_special_tokens=add), [Chunk(d) for d in docs] + [" Q:"])
    assert reuse is not None and len(reuse.chunks) == 2
    with Client(server.base_url, api_key=API_KEY, timeout=120, max_retries=0) as client:
        plain = client.complete(ids, model=MODEL, max_tokens=8, temperature=0)
        full = client.complete(" Q:", model=MODEL, max_tokens=8, temperature=0, documents=docs, chunk_share=1.0)
        assert full.choices[0].text == plain.choices[0].text
        assert full.usage.prompt_tokens == len(ids)
        parts = [{"type": "text", "text": docs[0], "raymoe_document": True}, {"type": "text", "text": "Summarize."}]
        chat = client.chat([{"role": "user", "content": parts}], model=MODEL, max_tokens=4, temperature=0)
        assert chat.usage.completion_tokens == 4
        with pytest.raises(BadRequestError, match="needs the prompt as text"):
            client.complete([1, 2], model=MODEL, max_tokens=4, documents=docs)


def test_rendered_chat_is_cut_at_each_document():
    from raymoe.engine.chunks import Chunk
    from raymoe.serve.documents import chat_documents, split_rendered

    parts = [{"type": "text", "text": "DOC A", "raymoe_document": True}, {"type": "text", "text": "question"}]
    flat, docs = chat_documents([{"role": "system", "content": "be brief"}, {"role": "user", "content": parts}])
    assert docs == ["DOC A"] and flat[1]["content"] == "DOC A\n\nquestion" and flat[0]["content"] == "be brief"
    assert split_rendered("<u>DOC A\n\nquestion</u>", docs) == ["<u>", Chunk("DOC A"), "\n\nquestion</u>"]
