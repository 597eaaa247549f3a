"""Chunk work under the step's token budget (and `long_prefill_token_threshold`): the blend region
runs in pieces over steps, beside a decoding request that gets a token every step, with the same
result as blending it at once (exact at a 100% share), also when the request is preempted halfway."""

import pytest
from test_chunks import BLOCK, IN_ORDER, PROMPT, greedy, run

from raymoe.engine.chunk_cache import LocalChunkStore
from raymoe.engine.chunks import ChunkReuse, plan_blend
from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.model.model import load_model

BUDGET = 12  # tokens a step: the 80-token blend region of PROMPT takes several steps
SMALL = EngineConfig(block_size=BLOCK, kv_cache_bytes=8 << 20, max_num_batched_tokens=BUDGET)
WHOLE = EngineConfig(block_size=BLOCK, kv_cache_bytes=8 << 20, max_num_batched_tokens=128)


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    return load_model(checkpoint_dir("mixtral"))


@pytest.fixture(scope="module")
def store(model):
    """Every chunk of PROMPT stored (computed by an engine with a large budget)."""
    store = LocalChunkStore(16 << 20)
    run(LLMEngine(model, None, WHOLE, store), PROMPT, greedy(1, ChunkReuse(IN_ORDER, 1.0)))
    return store


def steps_beside_a_decode(engine, reuse) -> tuple[list[int], list[int]]:
    """PROMPT with `reuse` beside a decoding request; returns (PROMPT's tokens, blend token-layers
    run in each step), checking that the decoding request got a token every step."""
    engine.add_request([3, 4, 5], greedy(40), "other")
    engine.step()
    engine.add_request(PROMPT, greedy(reuse=reuse), "chunks")
    got, per_step, other_done = [], [], False
    while engine.has_unfinished():
        before = engine.blender.stats["blend_token_layers"]
        deltas = {d.request_id: d for d in engine.step()}
        per_step.append(engine.blender.stats["blend_token_layers"] - before)
        assert other_done or "other" in deltas  # never stalled by the blend
        other_done = other_done or deltas["other"].finished
        got += deltas["chunks"].token_ids if "chunks" in deltas else []
    return got, per_step


def test_blend_region_runs_in_pieces_of_the_budget_and_equals_a_full_prefill(model, store):
    expected = run(LLMEngine(model, None, SMALL), PROMPT, greedy())
    engine = LLMEngine(model, None, SMALL, store)
    got, per_step = steps_beside_a_decode(engine, ChunkReuse(IN_ORDER, 1.0))
    assert got == expected
    num_layers = len(model.layers)
    pieces = [n for n in per_step if n]
    assert len(pieces) >= 4 and max(pieces) <= BUDGET * num_layers
    assert engine.chunk_stats()["blended_requests"] == 1


def test_long_prefill_token_threshold_bounds_chunk_work_too(model, store):
    threshold = 6
    config = EngineConfig(block_size=BLOCK, kv_cache_bytes=8 << 20, max_num_batched_tokens=128,
                          long_prefill_token_threshold=threshold)  # fmt: skip
    expected = run(LLMEngine(model, None, config), PROMPT, greedy())
    engine = LLMEngine(model, None, config, store)
    got, per_step = steps_beside_a_decode(engine, ChunkReuse(IN_ORDER, 1.0))
    assert got == expected
    assert max(per_step) <= threshold * len(model.layers) and len([n for n in per_step if n]) >= 8


def test_partial_share_in_pieces_equals_one_pass(model, store):
    reuse = ChunkReuse(IN_ORDER, 0.15)
    whole = LLMEngine(model, None, WHOLE, store)
    expected = run(whole, PROMPT, greedy(reuse=reuse))
    engine = LLMEngine(model, None, SMALL, store)
    got, per_step = steps_beside_a_decode(engine, reuse)
    assert got == expected
    assert len([n for n in per_step if n]) >= 2
    for key in ("chunk_tokens_placed", "chunk_tokens_recomputed", "blend_token_layers"):
        assert engine.chunk_stats()[key] == whole.chunk_stats()[key]


def test_a_blend_preempted_halfway_starts_again(model, store):
    expected = run(LLMEngine(model, None, SMALL), PROMPT, greedy())
    engine = LLMEngine(model, None, SMALL, store)
    engine.add_request(PROMPT, greedy(reuse=ChunkReuse(IN_ORDER, 1.0)), "chunks")
    engine.step()
    engine.step()
    [seq] = engine.scheduler.running
    assert 0 < engine.blender.stats["blend_token_layers"] and seq.num_cached_tokens == 0  # mid-blend
    halfway = engine.blender.stats["blend_token_layers"]
    engine.scheduler._preempt(seq)  # as a decode short of blocks would
    got = []
    while engine.has_unfinished():
        got += [t for d in engine.step() for t in d.token_ids]
    assert got == expected
    assert engine.chunk_stats()["blended_requests"] == 1
    region = plan_blend(PROMPT, ChunkReuse(IN_ORDER, 1.0), BLOCK).end  # every token in every layer at 100%
    assert engine.blender.stats["blend_token_layers"] == halfway + region * len(model.layers)  # started again
