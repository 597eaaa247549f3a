"""Every family the tests build: greedy tokens with drafts equal plain decoding's, for a batch of
one and for mixed lengths with chunked prefill (plain decoding equals transformers: test_lossless)."""

import pytest

from checkpoints import FAMILIES
from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.engine.sampling_params import SamplingParams
from raymoe.model.model import load_model

PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [[(11 * i + 5 * j * j) % 250 + 3 for j in range(n)] for i, n in enumerate([30, 4, 13])]


def greedy(model, prompts, **config) -> tuple[list[list[int]], dict]:
    # 16 tokens a step: the 30-token prompt prefills in chunks beside the others' decodes and drafts
    engine = LLMEngine(model, None, EngineConfig(max_num_batched_tokens=16, block_size=8, kv_cache_bytes=4 << 20,
                                                 **config))  # fmt: skip
    for i, p in enumerate(prompts):
        engine.add_request(p, PARAMS, request_id=str(i))
    out = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for d in engine.step():
            out[d.request_id].extend(d.token_ids)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [out[str(i)] for i in range(len(prompts))], engine.spec_stats()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_drafts_keep_greedy_tokens(family, checkpoint_dir):
    model = load_model(checkpoint_dir(family))
    plain, _ = greedy(model, PROMPTS)
    for drafter in ("prompt_lookup", "token_recycling"):
        out, stats = greedy(model, PROMPTS, speculative=drafter, num_speculative_tokens=5)
        assert out == plain, drafter
        assert stats["num_verify_steps"] > 0, drafter
    # batch of one; cheap drafts: a wide tree (root with 8 children), so random weights keep some
    alone, stats = greedy(model, PROMPTS[:1], speculative="token_recycling", speculative_draft_cost=0.01)
    assert alone == plain[:1] and stats["num_accepted_tokens"] > 0
