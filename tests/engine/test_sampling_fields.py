"""Sampling fields (issue 17): logit_bias, min_tokens, repetition / presence / frequency penalties,
min_p and n, each against a small reference implementation of its arithmetic written here."""

import math

import pytest
import torch

from checkpoints import load_reference
from engine_fakes import EOS, TinyModel
from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.engine.logits_process import adjust_row
from raymoe.engine.sampler import filtered_probs
from raymoe.engine.sampling_params import SamplingParams
from raymoe.errors import InvalidSamplingParams
from raymoe.model.model import load_model

V = 40


def reference_adjust(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int], eos) -> torch.Tensor:
    """The arithmetic, one token at a time: bias, min_tokens, repetition, frequency and presence."""
    x = logits.tolist()
    for t, b in p.logit_bias:
        x[t] += b
    if len(output) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            x[t] = -math.inf
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return torch.tensor(x)


ADJUSTMENTS = [
    pytest.param(dict(logit_bias={3: 5.0, 7: -100, 39: 0.5}), id="logit-bias"),
    pytest.param(dict(min_tokens=5, stop_token_ids=[9]), id="min-tokens-bars-eos-and-stop-ids"),
    pytest.param(dict(min_tokens=5, ignore_eos=True), id="min-tokens-ignore-eos"),
    pytest.param(dict(min_tokens=2), id="min-tokens-reached"),
    pytest.param(dict(repetition_penalty=1.3), id="repetition"),
    pytest.param(dict(repetition_penalty=0.7), id="repetition-below-1"),
    pytest.param(dict(frequency_penalty=0.8), id="frequency"),
    pytest.param(dict(presence_penalty=-1.5), id="presence-negative"),
    pytest.param(dict(frequency_penalty=1.1, presence_penalty=0.4, repetition_penalty=1.2, logit_bias={4: 2}),
                 id="all-together"),
]  # fmt: skip


@pytest.mark.parametrize("fields", ADJUSTMENTS)
def test_adjustments_match_the_reference(fields):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(V, generator=g) * 3
    p = SamplingParams(**fields)
    prompt, output = [5, 6, 6, 11], [6, 12, 12, 12, 30]
    got = adjust_row(logits.clone(), p, prompt, output, (1, 2))
    assert torch.allclose(got, reference_adjust(logits, p, prompt, output, (1, 2)), atol=1e-6)


def test_min_p_probabilities_match_the_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, V, generator=g) * 2
    params = [SamplingParams(temperature=0.7, min_p=0.1), SamplingParams(temperature=1.5, min_p=0.5, top_k=10),
              SamplingParams(temperature=1.0)]  # fmt: skip
    got = filtered_probs(logits.clone(), params)
    for row, p in zip(range(3), params):
        probs = (logits[row] / p.temperature).softmax(-1)
        keep = probs >= p.min_p * probs.max()
        if p.top_k > 0:
            keep &= probs >= probs.sort(descending=True).values[p.top_k - 1]
        expected = torch.where(keep, probs, 0.0)
        assert torch.allclose(got[row], expected / expected.sum(), atol=1e-6)


@pytest.mark.parametrize("fields, match", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"), ({"min_tokens": -1}, "min_tokens"),
    ({"logit_bias": {5: 101}}, "logit_bias"), ({"logit_bias": {-1: 1}}, "logit_bias"), ({"n": 0}, "n must"),
    ({"logprobs": 21}, "logprobs"), ({"prompt_logprobs": -1}, "prompt_logprobs"),
])  # fmt: skip
def test_out_of_range_fields_are_named(fields, match):
    with pytest.raises(InvalidSamplingParams, match=match):
        SamplingParams(**fields)


def reference_greedy_adjusted(reference, prompt: list[int], p: SamplingParams, eos) -> list[int]:
    output: list[int] = []
    with torch.no_grad():
        for _ in range(p.max_tokens):
            logits = reference(torch.tensor([prompt + output])).logits[0, -1]
            output.append(int(reference_adjust(logits, p, prompt, output, eos).argmax()))
    return output


def test_engine_greedy_with_adjustments_equals_transformers_plus_the_reference(checkpoint_dir):
    path = checkpoint_dir("mixtral")
    prompt = [(7 * j * j + 3) % 250 + 3 for j in range(13)]
    engine = LLMEngine(load_model(path), None, EngineConfig(kv_cache_bytes=4 << 20, block_size=8))
    runs = {
        "penalties": SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.4,
                                    frequency_penalty=0.9, presence_penalty=0.5),
        "bias": SamplingParams(temperature=0, max_tokens=6, logit_bias={2: 30.0, 17: 4.0}, min_tokens=3),
    }  # fmt: skip
    for rid, p in runs.items():
        engine.add_request(prompt, p, rid)
    out = {rid: [] for rid in runs}
    while engine.has_unfinished():
        for d in engine.step():
            out[d.request_id] += d.token_ids
    reference = load_reference(path)
    assert out["penalties"] == reference_greedy_adjusted(reference, prompt, runs["penalties"], engine.eos_token_ids)
    expected = reference_greedy_adjusted(reference, prompt, runs["bias"], engine.eos_token_ids)
    assert out["bias"] == expected[: expected.index(2) + 1] and len(out["bias"]) == 4  # EOS (2) barred 3 tokens


def test_n_samples_share_the_prompt_blocks_and_equal_seeded_single_requests():
    prompt, n, new = list(range(3, 40)), 3, 5  # 37 tokens: 4 full blocks of 8, a tail of 5
    params = SamplingParams(temperature=3.0, seed=11, max_tokens=new, n=n, ignore_eos=True)
    model = TinyModel()
    engine = LLMEngine(model, None, EngineConfig(kv_cache_bytes=1 << 20, block_size=8))
    engine.add_request(prompt, params, "r")
    out: dict[int, list[int]] = {}
    finished_at: dict[int, int] = {}
    step = 0
    while engine.has_unfinished():
        for d in engine.step():
            assert d.request_id == "r"
            out.setdefault(d.index, []).extend(d.token_ids)
            if d.finished:
                finished_at[d.index] = step
        step += 1
    assert finished_at[1] == finished_at[2]  # two samples finishing in one step
    # sample 0 prefills all 37; the others reuse its 4 full blocks and compute the 5-token tail
    assert model.num_forward_tokens == len(prompt) + (n - 1) * 5 + n * (new - 1)
    single = LLMEngine(TinyModel(), None, EngineConfig(kv_cache_bytes=1 << 20, block_size=8))
    for i in range(n):
        single.add_request(prompt, SamplingParams(temperature=3.0, seed=11 + i, max_tokens=new, ignore_eos=True), str(i))
    expected: dict[int, list[int]] = {}
    while single.has_unfinished():
        for d in single.step():
            expected.setdefault(int(d.request_id), []).extend(d.token_ids)
    assert out == expected
    assert not engine.requests and not engine.has_request("r")


def test_abort_drops_every_sample():
    engine = LLMEngine(TinyModel(), None, EngineConfig(kv_cache_bytes=1 << 20, block_size=8))
    engine.add_request(list(range(3, 30)), SamplingParams(max_tokens=20, n=4, ignore_eos=True), "r")
    engine.step()
    engine.step()
    assert len(engine.requests) == 4
    engine.abort("r")
    assert not engine.has_unfinished() and not engine.has_request("r")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_min_tokens_holds_back_eos():
    engine = LLMEngine(TinyModel(), None, EngineConfig(kv_cache_bytes=1 << 20))
    engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=10, logit_bias={EOS: 100}, min_tokens=3))
    tokens = []
    while engine.has_unfinished():
        for d in engine.step():
            tokens += d.token_ids
            reason = d.finish_reason
    assert len(tokens) == 4 and tokens[-1] == EOS and EOS not in tokens[:3] and reason == "stop"


def test_runner_leaves_plain_greedy_logits_alone():
    from raymoe.engine.logits_process import adjust_logits
    from raymoe.engine.sequence import Sequence

    x = torch.randn(2, V)
    seqs = [Sequence([1, 2], SamplingParams(temperature=0)), Sequence([3], SamplingParams())]
    assert adjust_logits(x, seqs, (1,)) is x
