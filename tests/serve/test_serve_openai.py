"""The official `openai` client against a running `raymoe serve`: completions, chat, streaming."""

import openai
import pytest
from builtin_qa import QA_PARAMS, QA_PROMPTS, QA_REPLIES
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


# ----- logprobs and sampling fields (issue 17) ----------------------------------------------------
def test_completion_logprobs_with_echo_equal_transformers(client):
    from reference_logprobs import TOL, greedy_ids, logprob_rows

    prompt = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True)
    lp = out.choices[0].logprobs
    ids = prompt + greedy_ids(prompt, 4)
    rows = logprob_rows(ids)
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - rows[i - 1, ids[i]].item()) < TOL
        assert abs(max(lp.top_logprobs[i].values()) - rows[i - 1].max().item()) < TOL
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=2,
                                            echo=True, stream=True))  # fmt: skip
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs


def test_chat_top_logprobs_equal_transformers_streamed_too(client):
    from reference_logprobs import TOL, greedy_ids, logprob_rows, tokenizer

    messages = [{"role": "user", "content": "Hello there"}]
    args = dict(model=MODEL, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    out = client.chat.completions.create(**args)
    content = out.choices[0].logprobs.content
    tok = tokenizer()
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    output = greedy_ids(prompt, 4)
    rows = logprob_rows(prompt + output)
    assert len(content) == 4
    for j, item in enumerate(content):
        row = rows[len(prompt) - 1 + j]
        assert abs(item.logprob - row[output[j]].item()) < TOL
        top = [t.logprob for t in item.top_logprobs]
        assert len(top) == 3 and all(abs(a - b) < TOL for a, b in zip(top, row.topk(3).values.tolist()))
        assert item.bytes == list(item.token.encode())
    chunks = list(client.chat.completions.create(**args, stream=True))
    streamed = [x.logprob for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    assert len(streamed) == len(content)  # equal within TOL: another batch may sum in another order
    assert all(abs(a - b.logprob) < TOL for a, b in zip(streamed, content))


def test_n_choices_plain_and_streamed(client):
    out = client.completions.create(model=MODEL, prompt="Once", max_tokens=5, temperature=1.0, seed=3, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2] and all(c.finish_reason for c in out.choices)
    assert out.usage.completion_tokens <= 15
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                                 max_tokens=3, temperature=0, stream=True))  # fmt: skip
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
    assert texts[0] == texts[1]  # greedy: both samples agree
    finishes = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1]


def test_sampling_fields_equal_the_one_process_engine(client):
    from raymoe.engine.llm import LLM
    from raymoe.engine.sampling_params import SamplingParams

    fields = dict(presence_penalty=0.5, frequency_penalty=0.7, logit_bias={"300": 2.5})
    extensions = dict(repetition_penalty=1.3, min_tokens=3, stop_token_ids=[5], top_k=5, min_p=0.05)
    out = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0, **fields,
                                    extra_body=extensions)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=8, presence_penalty=0.5, frequency_penalty=0.7,
                            logit_bias={300: 2.5}, **extensions)  # fmt: skip
    llm = LLM()
    assert out.choices[0].text == llm.generate("The sky is", params)[0].text
    forced = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, temperature=1.0,
                                       logit_bias={"300": 100}, extra_body={"ignore_eos": True})  # fmt: skip
    assert forced.choices[0].text == llm.engine.tokenizer.decode([300, 300, 300])


@pytest.mark.parametrize("body, param", [
    ({"n": 17}, "n"), ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"logprobs": 21}, "logprobs"),
    ({"stop_token_ids": [10**6]}, "stop_token_ids"), ({"min_p": -0.1}, "min_p"),
])  # fmt: skip
def test_bad_sampling_fields_are_400(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body=body)
    assert e.value.body["param"] == param


def test_chat_top_logprobs_needs_logprobs(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"


def test_answers_document_questions(client):
    """The trained built-in model copies the answer from the documents (engine backend)."""
    for prompt, reply in zip(QA_PROMPTS, QA_REPLIES):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=QA_PARAMS.max_tokens, temperature=0)
        assert out.choices[0].text == reply
