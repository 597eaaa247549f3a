"""LLMEngine over a tiny paged-attention model: batching never changes greedy outputs."""

import pytest

from engine_fakes import TinyModel, run_to_end
from raymoe.engine.sampling_params import SamplingParams
from raymoe.errors import InvalidSamplingParams, PromptTooLongError
from raymoe.engine.llm_engine import InvalidRequestError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[(7 * i + 3 * j) % 90 + 2 for j in range(n)] for i, n in enumerate([3, 40, 17, 1, 64, 9, 33, 120])]


def alone(make_engine, prompt, params=GREEDY) -> list[int]:
    engine = make_engine(max_num_batched_tokens=4096)
    engine.add_request(prompt, params, request_id="x")
    return run_to_end(engine)["x"]


def staggered(engine, prompts, params=GREEDY, every: int = 2) -> dict[str, list[int]]:
    """Add prompt i at step i * every, stepping in between; run to the end."""
    out: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, request_id=str(i))
        for _ in range(every):
            for d in engine.step():
                out.setdefault(d.request_id, []).extend(d.token_ids)
    for rid, ids in run_to_end(engine).items():
        out.setdefault(rid, []).extend(ids)
    return out


@pytest.fixture(scope="module")
def expected():
    return {}


def reference(make_engine, expected, i):
    if i not in expected:
        expected[i] = alone(make_engine, PROMPTS[i])
    return expected[i]


def test_continuous_batching_with_chunked_prefill_matches_one_at_a_time(make_engine, expected):
    engine = make_engine(max_num_batched_tokens=16, max_num_seqs=4)
    out = staggered(engine, PROMPTS)
    assert {rid: len(ids) for rid, ids in out.items()} == {str(i): 12 for i in range(len(PROMPTS))}
    for i in range(len(PROMPTS)):
        assert out[str(i)] == reference(make_engine, expected, i), f"prompt {i}"


def test_preemption_keeps_greedy_outputs(make_engine):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    block_bytes = 16 * 2 * 32 * 4  # block_size 16, 2 heads, k + v dims 32, float32
    engine = make_engine(kv_cache_bytes=7 * block_bytes, max_num_batched_tokens=32, max_num_seqs=8)
    prompts = PROMPTS[:4] + PROMPTS[5:7]
    out = staggered(engine, prompts, params, every=3)
    assert engine.scheduler.num_preemptions >= 3
    for i, prompt in enumerate(prompts):
        assert out[str(i)] == alone(make_engine, prompt, params), f"prompt {i}"
    assert engine.block_manager.num_free_blocks == 7


def test_shared_prefix_is_computed_once(make_engine):
    model = TinyModel()
    engine = make_engine(model=model)
    prefix = list(range(2, 50))  # 3 full blocks
    engine.add_request(prefix + [60, 61], GREEDY, request_id="a")
    first = run_to_end(engine)["a"]
    before = model.num_forward_tokens
    engine.add_request(prefix + [60, 61], GREEDY, request_id="b")
    assert run_to_end(engine)["b"] == first
    assert model.num_forward_tokens - before == 2 + 11  # 48 cached; 2 prompt tokens, 11 decodes


def test_seeded_request_ignores_its_batch_mates(make_engine):
    mine = SamplingParams(temperature=1.0, seed=42, max_tokens=10, ignore_eos=True)
    solo = alone(make_engine, PROMPTS[2], mine)
    engine = make_engine(max_num_batched_tokens=16)
    others = SamplingParams(temperature=1.2, max_tokens=10, ignore_eos=True)
    engine.add_request(PROMPTS[1], others, request_id="other")
    engine.step()
    engine.add_request(PROMPTS[2], mine, request_id="mine")
    assert run_to_end(engine)["mine"] == solo


def test_eos_finishes_unless_ignored(make_engine):
    model = TinyModel()
    model.lm_head[1] += 100.0  # EOS (id 1) wins every step
    engine = make_engine(model=model)
    engine.add_request([5, 6], SamplingParams(temperature=0), request_id="eos")
    engine.add_request([5, 6], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), request_id="ign")
    finals = {}
    while engine.has_unfinished():
        finals.update({d.request_id: d for d in engine.step() if d.finished})
    assert (finals["eos"].token_ids, finals["eos"].finish_reason) == ([1], "stop")
    assert finals["ign"].finish_reason == "length"


def test_abort_frees_blocks(make_engine):
    engine = make_engine(max_num_batched_tokens=8)
    free = engine.block_manager.num_free_blocks
    engine.add_request(PROMPTS[4], GREEDY, request_id="a")
    engine.step()
    assert engine.block_manager.num_free_blocks < free
    engine.abort("a")
    engine.abort("unknown")  # ignored
    assert not engine.has_unfinished() and engine.block_manager.num_free_blocks == free
    assert engine.step() == []


@pytest.mark.parametrize(
    "prompt, error, match",
    [
        pytest.param([], InvalidRequestError, "empty", id="empty-ids"),
        pytest.param("", InvalidRequestError, "empty", id="empty-text"),
        pytest.param([3, 96], InvalidRequestError, r"\[0, 96\)", id="id-out-of-vocab"),
        pytest.param([3, -1], InvalidRequestError, r"\[0, 96\)", id="negative-id"),
        pytest.param([2] * 512, PromptTooLongError, "512 tokens, but at most 511", id="too-long"),
    ],
)
def test_bad_prompts(make_engine, prompt, error, match):
    engine = make_engine(tokenizer=True)
    with pytest.raises(error, match=match):
        engine.add_request(prompt)
    assert not engine.has_unfinished()


def test_prompt_longer_than_the_kv_cache_says_so(make_engine):
    engine = make_engine(kv_cache_bytes=4 * 16 * 2 * 32 * 4)  # 4 blocks = 64 tokens
    with pytest.raises(PromptTooLongError, match="KV cache holds 64 tokens; raise kv_cache_bytes"):
        engine.add_request([2] * 64)
    engine.add_request([2] * 63, SamplingParams(max_tokens=100, ignore_eos=True), request_id="fits")
    out = run_to_end(engine)
    assert len(out["fits"]) == 1  # the sequence reached the cache's 64 tokens: "length"


def test_request_checks(make_engine):
    engine = make_engine()
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        engine.add_request("text")
    with pytest.raises(InvalidSamplingParams, match="SamplingParams"):
        engine.add_request([3], {"temperature": 0})
    engine.add_request([3], request_id="dup")
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request([4], request_id="dup")
