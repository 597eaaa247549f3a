"""`LocalBackend` over a `LocalEngine` in this process (no Ray; its engine in a child process or a
thread of this one, `serve.engine_process`): the handle calls the ingress makes
give the one-process engine's greedy token ids, and cancelling a stream aborts its sequence and
frees its KV blocks."""

import asyncio

import pytest

from raymoe.engine.llm import LLM
from raymoe.engine.sampling_params import SamplingParams
from raymoe.model.builtin import builtin_model_path
from raymoe.serve.local_backend import LocalStream, local_engine
from serve_harness import CONFIG

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)  # still running when cancelled
CONFIG_1_THREAD = {**CONFIG, "engine": {**CONFIG["engine"], "threads": 1}}  # not asked of Ray


async def _collect(backend, request_id: str, prompt_ids: list[int], params: SamplingParams,
                   cancel_after: int | None = None) -> list[int]:  # fmt: skip
    stream = backend.options(stream=True).generate.remote(request_id, prompt_ids, params)
    assert isinstance(stream, LocalStream) and await stream.__anext__() == {"accepted": True}
    ids: list[int] = []
    async for deltas in stream:
        ids += [t for d in deltas for t in d["token_ids"]]
        if cancel_after is not None and len(ids) >= cancel_after:
            stream.cancel()
            break
    return ids


@pytest.mark.parametrize("engine_process", [True, False], ids=["engine-process", "engine-thread"])
def test_streams_equal_the_engine_and_cancel_frees_the_sequence(engine_process):
    config = {**CONFIG_1_THREAD, "serve": {**CONFIG_1_THREAD["serve"], "engine_process": engine_process}}
    backend = local_engine(config, str(builtin_model_path()))
    try:
        llm = LLM()
        prompt_ids = llm.tokenizer.encode("The quick brown fox")

        async def run():
            info = await backend.info.remote()
            whole = await _collect(backend, "a", prompt_ids, GREEDY)
            part = await _collect(backend, "b", prompt_ids, LONG, cancel_after=1)
            await asyncio.sleep(0)  # the close runs after the current await
            for _ in range(200):  # the stepping thread applies the abort
                if backend.target.loop.stats.num_admitted == 0:
                    break
                await asyncio.sleep(0.01)
            return info, whole, part

        info, whole, part = asyncio.run(run())
        assert info["backend"] == "engine" and info["vocab_size"] > 0
        assert whole == list(llm.generate([prompt_ids], GREEDY)[0].token_ids)
        assert part and part[: len(whole)] == whole[: len(part)] and len(part) < LONG.max_tokens
        loop = backend.target.loop
        own = loop.engine_stats()  # an engine process answers after applying the abort
        assert (loop.stats.num_finished, loop.stats.num_aborted, loop.stats.num_admitted) == (1, 1, 0)
        assert own["num_free_kv_blocks"] == own["num_kv_blocks"] and own["num_engine_requests"] == 0
        backend.check_health()
    finally:
        backend.close()
