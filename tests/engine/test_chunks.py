"""Chunk-cache reuse in the one-process engine, on every family's tiny checkpoint: exact where it
must be (a 100% recompute share is a full prefill; a chunk at position 0 is the prefix cache),
fewer tokens computed otherwise, and blended KV never served to a plain request."""

import pytest
import torch
from checkpoints import FAMILIES

from raymoe.engine.chunk_cache import LocalChunkStore
from raymoe.engine.chunks import ChunkReuse, plan_blend
from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.engine.sampling_params import SamplingParams
from raymoe.engine.sequence import Sequence
from raymoe.errors import InvalidRequestError, InvalidSamplingParams
from raymoe.model.model import load_model

BLOCK = 8
CONFIG = EngineConfig(block_size=BLOCK, kv_cache_bytes=8 << 20, max_num_batched_tokens=64)
DOCS = [[(31 * d + 7 * i * i + i) % 240 + 10 for i in range(n)] for d, n in enumerate((27, 19, 33))]
INTRO, SEP, QUESTION = [3, 4, 5], [6], [7, 8, 9, 4, 5, 6, 7]
PROMPT = INTRO + DOCS[2] + SEP + DOCS[0] + DOCS[1] + QUESTION  # documents out of their pool order
IN_ORDER = (DOCS[2], DOCS[0], DOCS[1])


def greedy(max_tokens=16, reuse=None):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, chunk_reuse=reuse)


def run(engine: LLMEngine, prompt, params, request_id="r") -> list[int]:
    engine.add_request(prompt, params, request_id)
    out = []
    while engine.has_unfinished():
        for delta in engine.step():
            out += delta.token_ids
    return out


@pytest.fixture(scope="module")
def models(checkpoint_dir):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_model(checkpoint_dir(family))
        return cache[family]

    return get


def chunk_engine(model) -> LLMEngine:
    return LLMEngine(model, None, CONFIG, LocalChunkStore(16 << 20))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_recompute_share_equals_full_prefill(family, models):
    model = models(family)
    expected = run(LLMEngine(model, None, CONFIG), PROMPT, greedy())
    engine = chunk_engine(model)
    got = run(engine, PROMPT, greedy(reuse=ChunkReuse(IN_ORDER, 1.0)))
    stats = engine.chunk_stats()
    assert stats["blended_requests"] == 1 and stats["chunk_tokens_placed"] > 0
    assert stats["chunk_tokens_recomputed"] == stats["chunk_tokens_placed"]  # went through the blend
    assert got == expected


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunk_at_position_zero_equals_the_prefix_cache(family, models):
    model = models(family)
    prompt = DOCS[0] + QUESTION
    plain = LLMEngine(model, None, CONFIG)
    expected = run(plain, prompt, greedy())
    engine = chunk_engine(model)
    run(engine, INTRO + DOCS[0] + QUESTION, greedy(2, ChunkReuse([DOCS[0]], 0.0)), "warm")  # stores the chunk
    reuse = ChunkReuse([DOCS[0]], 0.0)  # nothing recomputed: the cached KV as it is
    assert plan_blend(prompt, reuse, BLOCK).salt is None  # exact: plain prefix hashing
    assert run(engine, prompt, greedy(reuse=reuse)) == expected
    assert engine.chunk_stats()["chunk_tokens_recomputed"] == 0
    keys, blocks = engine.export_prefix(prompt)
    plain_keys, plain_blocks = plain.export_prefix(prompt)
    assert keys == plain_keys and len(keys) == (len(prompt) - 1) // BLOCK
    for got, want in zip(blocks, plain_blocks):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_partial_share_computes_fewer_tokens_and_never_serves_plain_requests(family, models):
    model = models(family)
    engine = chunk_engine(model)
    run(engine, PROMPT, greedy(1, ChunkReuse(IN_ORDER, 1.0)), "warm")  # stores the chunks
    before = engine.chunk_stats()
    reuse = ChunkReuse(IN_ORDER, 0.15)
    run(engine, PROMPT, greedy(1, reuse), "blend")
    after = engine.chunk_stats()
    placed = after["chunk_tokens_placed"] - before["chunk_tokens_placed"]
    recomputed = after["chunk_tokens_recomputed"] - before["chunk_tokens_recomputed"]
    assert recomputed == -(-placed * 15 // 100)  # ceil(15%)
    full = len(PROMPT) + 1  # a plain prefill of the prompt, and the one decode step
    assert after["computed_tokens"] - before["computed_tokens"] < 0.8 * full
    assert after["chunk_prefill_tokens"] == before["chunk_prefill_tokens"]  # all chunks were hits
    # The blended blocks hash under the request's salt: a plain request finds only the blocks
    # before the first moved chunk; a request with the same chunk reuse finds them all.
    plan = plan_blend(PROMPT, reuse, BLOCK)
    plain, salted = Sequence(PROMPT, greedy()), Sequence(PROMPT, greedy(reuse=reuse))
    salted.cache_salt = plan.salt
    assert len(engine.block_manager.prefix_hits(plain)) <= plan.salt.start_block
    assert len(engine.block_manager.prefix_hits(salted)) >= plan.end // BLOCK
    expected = run(LLMEngine(model, None, CONFIG), PROMPT, greedy())
    assert run(engine, PROMPT, greedy(), "plain") == expected


def test_bad_chunk_requests_are_refused(models):
    engine = chunk_engine(models("qwen3_moe"))
    with pytest.raises(InvalidRequestError, match="not a sub-span"):
        engine.add_request(PROMPT, greedy(reuse=ChunkReuse([[1, 2, 3]])))
    with pytest.raises(InvalidRequestError, match="order given"):
        engine.add_request(PROMPT, greedy(reuse=ChunkReuse([DOCS[1], DOCS[0]])))
    for share in (-0.1, 1.5, float("nan"), "0.2", True):
        with pytest.raises(InvalidRequestError, match="recompute_share"):
            ChunkReuse([DOCS[0]], share)
    for chunks in ([], [[]], [[1, -2]], "abc", [[1.5]]):
        with pytest.raises(InvalidRequestError, match="chunk"):
            ChunkReuse(chunks)
    with pytest.raises(InvalidSamplingParams, match="chunk_reuse"):
        SamplingParams(chunk_reuse=[[1, 2]])
    assert not engine.has_unfinished()


def test_an_engine_without_a_chunk_store_prefills_in_full(models):
    model = models("mixtral")
    expected = run(LLMEngine(model, None, CONFIG), PROMPT, greedy())
    engine = LLMEngine(model, None, CONFIG)
    assert run(engine, PROMPT, greedy(reuse=ChunkReuse(IN_ORDER, 0.0))) == expected
    assert engine.chunk_stats()["blended_requests"] == 0


def test_chunk_work_shares_the_step_budget(models):
    """Chunks missing from the store are computed alone within the tokens a step schedules for
    their request (at least one chunk per step), not all at once: a request decoding beside it
    gets a token every step, and the output is still the plain prefill's (100% share)."""
    model = models("mixtral")
    config = EngineConfig(block_size=BLOCK, kv_cache_bytes=8 << 20, max_num_batched_tokens=24)
    expected = run(LLMEngine(model, None, config), PROMPT, greedy())
    engine = LLMEngine(model, None, config, LocalChunkStore(16 << 20))
    engine.add_request([3, 4, 5], greedy(30), "other")
    engine.step()  # "other" is prefilled: it decodes from here on
    engine.add_request(PROMPT, greedy(reuse=ChunkReuse(IN_ORDER, 1.0)), "chunks")
    spent, got, other_done = [], [], False
    while engine.has_unfinished():
        before = engine.blender.stats["chunk_prefill_tokens"]
        deltas = {d.request_id: d for d in engine.step()}
        spent.append(engine.blender.stats["chunk_prefill_tokens"] - before)
        assert other_done or "other" in deltas  # never stalled by the chunk request
        other_done = other_done or deltas["other"].finished
        got += deltas["chunks"].token_ids if "chunks" in deltas else []
    assert got == expected
    assert [n for n in spent if n] == [len(c) for c in IN_ORDER]  # one chunk a step (each > the budget)
