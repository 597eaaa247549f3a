"""A sequence moved between engines mid-decode takes its partial KV block along (`kv_tail`): the new
engine computes only its last token, and the outputs equal an engine that never moved it."""

import pytest

from raymoe.engine.kv_tail import tail_key, tail_span
from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.engine.sampling_params import SamplingParams
from raymoe.model.model import load_model

CONFIG = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, block_size=4, kv_cache_bytes=1 << 20)
PROMPT = [(7 * j) % 200 + 3 for j in range(9)]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _run(engine, steps=None) -> list[int]:
    out = []
    while engine.has_unfinished() and (steps is None or len(out) < steps):
        for d in engine.step():
            out.extend(d.token_ids)
    return out


@pytest.fixture(scope="module")
def model_and_expected(checkpoint_dir):
    """The model and the tokens of an engine that never moves the request."""
    model = load_model(checkpoint_dir("mixtral"))
    whole = LLMEngine(model, None, CONFIG)
    whole.add_request(PROMPT, GREEDY, "r")
    return model, _run(whole)


@pytest.mark.parametrize("pool_keeps_full_blocks", [True, False])
def test_moved_sequence_takes_its_partial_block(model_and_expected, pool_keeps_full_blocks):
    model, expected = model_and_expected

    src = LLMEngine(model, None, CONFIG)
    src.add_request(PROMPT, GREEDY, "r")
    first = _run(src, steps=4)  # 9 + 4 tokens: 12 computed, the last token not yet
    seq, _ = src.requests["r"]
    tokens = list(seq.token_ids)
    assert tail_span(len(tokens), 4) == (12, 0)
    first += _run(src, steps=2)  # 15 tokens, 14 computed: 3 full blocks and a tail of 2
    tokens = list(seq.token_ids)
    keys, blocks = src.export_prefix(tokens)
    key, block = src.export_tail("r")
    assert key == tail_key(tokens, 4) and len(keys) == 3
    pool = dict(zip(keys, blocks)) if pool_keeps_full_blocks else {}

    dst = LLMEngine(model, None, CONFIG)
    dst.import_prefix(tokens, lambda ks: [pool.get(k) for k in ks])
    dst.add_request(PROMPT, GREEDY, "r", first)
    dst.set_kv_tail("r", block)
    computed = dst.model_runner.num_computed_tokens
    rest = _run(dst, steps=1)
    # full blocks hit: only the last token runs; else the tail is dropped and everything recomputed
    assert dst.model_runner.num_computed_tokens - computed == (1 if pool_keeps_full_blocks else len(tokens))
    assert first + rest + _run(dst) == expected
