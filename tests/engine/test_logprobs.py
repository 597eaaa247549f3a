"""Logprobs (issue 17): the sampled tokens' and the prompt's, with the top-N, equal log_softmax of
transformers' logits within 1e-4; chunked prefill and a cached prefix change nothing."""

import torch

from checkpoints import load_reference
from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.engine.sampling_params import SamplingParams
from raymoe.model.model import load_model

TOL = 1e-4
PROMPT = [(11 * j * j + 5) % 250 + 3 for j in range(21)]


def run(engine: LLMEngine, params: SamplingParams, request_id: str):
    engine.add_request(PROMPT, params, request_id)
    tokens, logprobs, prompt_logprobs = [], [], None
    while engine.has_unfinished():
        for d in engine.step():
            tokens += d.token_ids
            logprobs += d.logprobs or []
            prompt_logprobs = d.prompt_logprobs if d.prompt_logprobs is not None else prompt_logprobs
    return tokens, logprobs, prompt_logprobs


def assert_entry(entry, row: torch.Tensor, token: int, num_top: int):
    """entry: (logprob, [(id, logprob)]); row: [V] reference log_softmax at the position before `token`."""
    assert abs(entry[0] - row[token].item()) < TOL
    top = row.topk(num_top)
    assert [t for t, _ in entry[1]] == top.indices.tolist()
    assert torch.allclose(torch.tensor([lp for _, lp in entry[1]]), top.values, atol=TOL)


def test_sampled_and_prompt_logprobs_equal_transformers(checkpoint_dir):
    path = checkpoint_dir("qwen3_moe")
    # 8 tokens a step: the 21-token prompt prefills in three chunks
    engine = LLMEngine(load_model(path), None, EngineConfig(block_size=8, max_num_batched_tokens=8, kv_cache_bytes=4 << 20))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    first = run(engine, params, "a")
    second = run(engine, params, "b")  # its prompt blocks are cached now: still every position scored
    reference = load_reference(path)
    tokens, logprobs, prompt_logprobs = first
    with torch.no_grad():
        rows = torch.log_softmax(reference(torch.tensor([PROMPT + tokens])).logits[0].float(), dim=-1)  # [L, V]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(PROMPT)
    for i in range(1, len(PROMPT)):
        assert_entry(prompt_logprobs[i], rows[i - 1], PROMPT[i], 2)
    assert len(logprobs) == len(tokens) == 6
    for j, token in enumerate(tokens):
        assert_entry(logprobs[j], rows[len(PROMPT) - 1 + j], token, 3)
        assert token == logprobs[j][1][0][0]  # greedy: the most likely
    assert second[0] == tokens
    for a, b in zip(second[2][1:], prompt_logprobs[1:]):
        assert abs(a[0] - b[0]) < TOL


def test_sampled_logprobs_are_of_the_raw_logits_and_zero_top_is_empty():
    """With a penalty, the reported logprob is still the model's (vLLM's default), top-0 lists none."""
    from engine_fakes import TinyModel

    model = TinyModel()
    engine = LLMEngine(model, None, EngineConfig(kv_cache_bytes=1 << 20))
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=0, logit_bias={40: 100})
    engine.add_request([5, 6, 7], params, "x")
    (delta,) = engine.step()
    assert delta.token_ids == [40] and delta.logprobs[0][1] == []
    raw = LLMEngine(TinyModel(), None, EngineConfig(kv_cache_bytes=1 << 20))
    raw.add_request([5, 6, 7, 40], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), "y")
    (plain,) = raw.step()  # the prompt's last entry: the model's logprob of 40 after [5, 6, 7]
    assert abs(delta.logprobs[0][0] - plain.prompt_logprobs[3][0]) < 1e-5
