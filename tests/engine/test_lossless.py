"""Every family: 8 prompts of different lengths join the running batch at different steps, with
chunked prefill on; each greedy continuation of 32 tokens equals transformers' `generate`."""

import pytest

from checkpoints import FAMILIES, assert_same_greedy, load_reference, reference_greedy
from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.engine.sampling_params import SamplingParams
from raymoe.model.model import load_model

NEW_TOKENS = 32
LENGTHS = [3, 41, 1, 17, 90, 8, 55, 26]
PROMPTS = [[(13 * i + 7 * j * j) % 250 + 3 for j in range(n)] for i, n in enumerate(LENGTHS)]
JOIN_STEP = [0, 0, 1, 3, 4, 7, 12, 20]  # prompt i is added before step JOIN_STEP[i]


def run_staggered(engine: LLMEngine) -> dict[int, list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    out: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    step = 0
    while step <= max(JOIN_STEP) or engine.has_unfinished():
        for i, join in enumerate(JOIN_STEP):
            if join == step:
                engine.add_request(PROMPTS[i], params, request_id=str(i))
        for delta in engine.step():
            out[int(delta.request_id)].extend(delta.token_ids)
        step += 1
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_staggered_chunked_greedy_equals_transformers(family, checkpoint_dir):
    path = checkpoint_dir(family)
    # 24 tokens a step: the 90- and 55-token prompts prefill in chunks beside running decodes.
    config = EngineConfig(max_num_seqs=6, max_num_batched_tokens=24, block_size=8, kv_cache_bytes=8 << 20)
    out = run_staggered(LLMEngine(load_model(path), None, config))
    reference = load_reference(path)
    for i, prompt in enumerate(PROMPTS):
        expected = reference_greedy(reference, prompt, NEW_TOKENS)
        assert_same_greedy(reference, prompt, out[i], expected)
