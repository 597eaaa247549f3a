"""EngineLoop (raymoe.serve.engine_loop) streams in chunks: first and last token at once, the rest
`stream_interval(batch)` at a time, the same tokens as the engine run alone."""

import asyncio

from engine_fakes import run_to_end
from raymoe.engine.sampling_params import SamplingParams
from raymoe.serve.engine_loop import MESSAGES_PER_STEP, EngineLoop, stream_interval

PROMPTS = [[3 + i, 7, 11 + i % 5] for i in range(24)]
PARAMS = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)


def test_stream_interval_bounds_messages_per_step():
    assert [stream_interval(n) for n in (0, 1, MESSAGES_PER_STEP, MESSAGES_PER_STEP + 1)] == [1, 1, 1, 2]
    assert all(-(-n // stream_interval(n)) <= MESSAGES_PER_STEP for n in range(1, 200))


async def _collect(loop: EngineLoop) -> dict[str, list[list]]:
    queues = {f"r{i}": loop.submit(f"r{i}", p, PARAMS) for i, p in enumerate(PROMPTS)}
    chunks: dict[str, list[list]] = {rid: [] for rid in queues}
    for rid, queue in queues.items():
        while not chunks[rid] or not chunks[rid][-1][-1].finished:
            chunks[rid].append(await asyncio.wait_for(queue.get(), 60))
    return chunks


def test_chunks_carry_the_engines_tokens(make_engine):
    alone = make_engine(max_num_seqs=32)
    for i, p in enumerate(PROMPTS):
        alone.add_request(p, PARAMS, f"r{i}")
    expected = run_to_end(alone)
    loop = EngineLoop(make_engine(max_num_seqs=32), max_pending=64)
    try:
        chunks = asyncio.run(_collect(loop))
    finally:
        loop.shutdown()
    interval = stream_interval(len(PROMPTS))
    assert interval > 1
    for rid, got in chunks.items():
        assert [t for chunk in got for d in chunk for t in d.token_ids] == expected[rid]
        assert len(got[0]) == 1  # the first token goes out alone (time to first token)
        assert all(len(c) <= interval for c in got) and got[-1][-1].finish_reason == "length"
    assert loop.stats.num_messages < loop.stats.num_generated_tokens
    assert loop.stats.num_admitted == 0 and loop.stats.num_finished == len(PROMPTS)
