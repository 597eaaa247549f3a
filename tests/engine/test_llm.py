"""raymoe.LLM on the built-in model: generate, streaming, per-prompt params, bad input."""

import pytest

import raymoe
from raymoe import InvalidSamplingParams, PromptTooLongError, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return raymoe.LLM(max_num_seqs=4, max_num_batched_tokens=32, kv_cache_bytes=8 << 20)


def test_generate_batch_matches_one_by_one(llm):
    prompts = ["Hello world", "The sky is blue and the sea is deep, said the old sailor", "A"]
    outs = llm.generate(prompts, GREEDY)
    assert [o.prompt_token_ids for o in outs] == [llm.tokenizer.encode(p) for p in prompts]
    for prompt, out in zip(prompts, outs):
        assert out.finished and out.finish_reason == "length" and len(out.token_ids) == 6
        assert out.token_ids == llm.generate(prompt, GREEDY)[0].token_ids
        assert out.text == llm.tokenizer.decode(out.token_ids)


def test_stream_yields_the_same_tokens_and_text(llm):
    whole = llm.generate("Once upon a time", GREEDY)[0]
    deltas = list(llm.generate_stream("Once upon a time", GREEDY))
    assert [len(d.token_ids) for d in deltas] == [1] * 6
    assert sum((d.token_ids for d in deltas), []) == whole.token_ids
    assert "".join(d.text for d in deltas) == whole.text
    assert [d.finished for d in deltas] == [False] * 5 + [True]


def test_closing_a_stream_aborts_the_request(llm):
    stream = llm.generate_stream("Once upon a time", GREEDY)
    next(stream)
    stream.close()
    assert not llm.engine.has_unfinished()


def test_one_params_per_prompt_and_token_id_prompts(llm):
    ids = llm.tokenizer.encode("Hello world")
    short, long = (SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (2, 4))
    outs = llm.generate([ids, ids], [short, long])
    assert [o.prompt_token_ids for o in outs] == [ids, ids]
    assert [len(o.token_ids) for o in outs] == [2, 4] and outs[0].token_ids == outs[1].token_ids[:2]
    assert llm.generate([], GREEDY) == []


def test_bad_input_is_a_typed_error(llm):
    with pytest.raises(InvalidSamplingParams, match="2 SamplingParams for 3 prompts"):
        llm.generate(["a", "b", "c"], [GREEDY, GREEDY])
    with pytest.raises(PromptTooLongError, match="at most"):
        llm.generate(["fine", "word " * 5000], GREEDY)
    assert not llm.engine.has_unfinished()  # the good prompt added first was aborted


def test_speculative_decoding_keeps_the_greedy_output(llm):
    spec = raymoe.LLM(max_num_seqs=4, max_num_batched_tokens=32, kv_cache_bytes=8 << 20, speculative="prompt_lookup",
                      num_speculative_tokens=4)  # fmt: skip
    prompts = ["The quick brown fox", "one two one two one two one"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    assert [o.text for o in spec.generate(prompts, params)] == [o.text for o in llm.generate(prompts, params)]
    assert spec.engine.spec_stats()["num_verify_steps"] > 0


@pytest.mark.parametrize("options, message", [
    ({"speculative": "medusa"}, "speculative must be one of ['none', 'token_recycling', 'prompt_lookup']"),
    ({"speculative": "prompt_lookup", "num_speculative_tokens": 0}, "num_speculative_tokens must be a positive"),
])  # fmt: skip
def test_bad_speculative_options_are_config_errors(options, message):
    with pytest.raises(raymoe.ConfigError) as e:
        raymoe.LLM(**options)
    assert message in str(e.value)
