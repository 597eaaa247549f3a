"""ServeFront (backend: cluster) without Ray: n samples fan out after sample 0's prefill, each with
its own seed, and logprobs ride from the prefill's handoff and the decode stream to the caller."""

import asyncio
from types import SimpleNamespace

from raymoe.cluster.handoff import Handoff, TokenDelta, WorkRequest
from raymoe.engine.sampling_params import SamplingParams
from raymoe.serve.cluster_front import ServeFront, sample_request


class FakeStream:
    def __init__(self, deltas):
        self.deltas = list(deltas)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.deltas:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        return self.deltas.pop(0)

    def cancel(self):
        pass


def fake_handles(log: list):
    """Prefill answers token 10 (+ its entry); decode streams 11, 12 then finishes at max_tokens=3."""

    async def prefill(request: WorkRequest) -> Handoff:
        log.append(("prefill", request.request_id, request.params.seed, request.params.prompt_logprobs))
        await asyncio.sleep(0.01)
        prompt_lp = [None, (-1.0, [])] if request.params.prompt_logprobs is not None else None
        return Handoff(request.request_id, 10, None, 0, logprobs=[(-0.5, [])], prompt_logprobs=prompt_lp)

    def decode(request: WorkRequest):
        log.append(("decode", request.request_id, request.params.prompt_logprobs))
        return FakeStream([TokenDelta([11], logprobs=[(-0.25, [])]), TokenDelta([12], True, "length", [(-0.125, [])])])

    prefill_handle = SimpleNamespace(prefill=SimpleNamespace(remote=prefill))
    decode_handle = SimpleNamespace(options=lambda stream: SimpleNamespace(decode=SimpleNamespace(remote=decode)))
    return prefill_handle, decode_handle


def test_n_samples_fan_out_after_sample_0_with_logprobs():
    log: list = []
    front = ServeFront(*fake_handles(log), None, (2,), 512)
    params = SamplingParams(n=3, seed=5, max_tokens=3, logprobs=0, prompt_logprobs=0)

    async def collect():
        return [d async for d in front.run_samples(WorkRequest("r", [1, 2], params))]

    deltas = asyncio.run(collect())
    prefills = [e for e in log if e[0] == "prefill"]
    assert prefills[0] == ("prefill", "r#0", 5, 0)  # sample 0 alone first; only it scores the prompt
    assert sorted(prefills[1:]) == [("prefill", "r#1", 6, None), ("prefill", "r#2", 7, None)]
    assert all(e[2] is None for e in log if e[0] == "decode")  # decode never rescores the prompt
    for i in range(3):
        mine = [d for d in deltas if d.index == i]
        assert all(d.request_id == "r" for d in mine)
        assert [t for d in mine for t in d.token_ids] == [10, 11, 12]
        assert [e[0] for d in mine for e in d.logprobs] == [-0.5, -0.25, -0.125]
        assert mine[-1].finished and mine[-1].finish_reason == "length"
    assert [d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None] == [[None, (-1.0, [])]]


def test_one_sample_is_the_request_itself():
    r = WorkRequest("r", [1], SamplingParams(seed=3))
    assert sample_request(r, 0) is r
