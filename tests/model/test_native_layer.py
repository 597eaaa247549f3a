"""raymoe's float32 layer pieces in C (`raymoe.model.native.layer`).

`Linear` on small float32 weights: equal to torch's linear within float32 rounding, each row's bits
its own (alone or among others). The softmax router: torch's choice, its weights within rounding.
A decode step's layer in two calls (attention half, MoE half), and every layer of a decode step in
one call: bit for bit what the same pieces give one op at a time, on every family the blocks take,
with routing recorded alike; the blocks run on decode steps and decline what they do not take (a
shared expert, MLA, bfloat16)."""

import pytest
import torch
import torch.nn.functional as F

from checkpoints import engine_greedy
from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.engine.sampling_params import SamplingParams
from raymoe.model import model as model_mod
from raymoe.model.layers import Linear
from raymoe.model.model import load_model
from raymoe.model.native import layer as native_layer
from raymoe.model.router import softmax_topk
from tests.model.native_kernels import need_kernel

PROMPTS = [[(11 * i + 5 * j * j) % 200 + 3 for j in range(n)] for i, n in enumerate([3, 19, 1, 40, 8])]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
CONFIG = EngineConfig(max_num_seqs=5, max_num_batched_tokens=32, block_size=8, kv_cache_bytes=8 << 20)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_torch_and_keeps_each_rows_bits(bias):
    need_kernel()
    gen = torch.Generator().manual_seed(1)
    weight, b = torch.randn(200, 96, generator=gen), torch.randn(200, generator=gen) if bias else None
    lin, x = Linear(weight, b), torch.randn(37, 96, generator=gen)
    assert lin.weight_strips is not None and lin.weight_strips.shape == (200 * 96,)
    got = lin(x)
    torch.testing.assert_close(got, F.linear(x, weight, b), atol=2e-5, rtol=2e-5)
    for i in (0, 6, 36):
        assert torch.equal(lin(x[i : i + 1].clone())[0], got[i])  # a row alone: the same bits
    assert torch.equal(lin(x.view(37, 1, 96))[:, 0], got)  # any leading shape


def test_linear_keeps_torch_for_wide_inputs_and_low_precision():
    need_kernel()
    assert Linear(torch.randn(8, native_layer.MAX_IN + 1)).weight_strips is None
    assert Linear(torch.randn(8, 64).bfloat16()).weight_strips is None


@pytest.mark.parametrize("top_k,normalize", [(1, False), (2, True), (3, False)])
def test_router_equals_softmax_topk(top_k, normalize):
    need_kernel()
    gen = torch.Generator().manual_seed(top_k)
    gate, x = torch.randn(8, 64, generator=gen), torch.randn(50, 64, generator=gen)
    ids, weights = native_layer.route(x, Linear(gate).weight_strips, top_k, normalize)
    want_ids, want_weights = softmax_topk(F.linear(x, gate), top_k, normalize)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, atol=1e-6, rtol=1e-5)


def _greedy(path, mode: str, monkeypatch) -> tuple[list, list, dict]:
    """Tokens and logprobs of every prompt, and how often each C call ran, with mode "ops" (no block),
    "blocks" (a layer in two calls) or "step" (every layer of a decode step in one call)."""
    calls = {"attention": 0, "moe": 0, "step": 0}
    on = {"attention": mode != "ops", "moe": mode != "ops", "step": mode == "step"}
    for name, key in (("attention_block", "attention"), ("moe_block", "moe"), ("decode_step", "step")):
        real = getattr(native_layer, name)

        def counted(*a, _real=real, _key=key):
            done = _real(*a) if on[_key] else None
            calls[_key] += done is not None
            return done

        monkeypatch.setattr(native_layer, name, counted)
    engine = LLMEngine(load_model(path), None, CONFIG)
    tally = engine.model.record_routing()
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, GREEDY, request_id=str(i))
    tokens, logprobs = {str(i): [] for i in range(len(PROMPTS))}, {str(i): [] for i in range(len(PROMPTS))}
    while engine.has_unfinished():
        for d in engine.step():
            tokens[d.request_id] += d.token_ids
            logprobs[d.request_id] += d.logprobs
    monkeypatch.undo()
    routing = {rid: c.tolist() for rid, c in tally.counts.items()}
    return list(tokens.values()), list(logprobs.values()), {**calls, "routing": routing}


@pytest.mark.parametrize("family,moe_fuses", [("qwen3_moe", True), ("mixtral", True), ("qwen2_moe", False)])
def test_decode_step_in_c_calls_has_the_bits_of_the_ops(family, moe_fuses, checkpoint_dir, monkeypatch):
    """qwen3_moe: per-head q/k norm, 3 of 8 experts; mixtral: no q/k norm; qwen2_moe: q/k/v bias, a
    dense layer, a shared expert (its MoE half stays on the ops, and no step runs in one call)."""
    need_kernel()
    path = checkpoint_dir(family)
    want_tokens, want_logprobs, want_calls = _greedy(path, "ops", monkeypatch)
    for mode in ("blocks", "step"):
        tokens, logprobs, calls = _greedy(path, mode, monkeypatch)
        assert tokens == want_tokens and logprobs == want_logprobs, mode  # every float equal
        assert calls["routing"] == want_calls["routing"] and calls["routing"], mode  # recorded alike
        if mode == "blocks" or not moe_fuses:
            assert calls["attention"] > 0 and (calls["moe"] > 0) == moe_fuses and calls["step"] == 0, mode
        else:  # every decode step in one call: the attention block (decode steps only) runs for none
            assert calls["step"] > 0 and calls["attention"] == 0, mode
    assert want_tokens == engine_greedy(path, PROMPTS, GREEDY, CONFIG)  # the shared helper agrees


def test_blocks_decline_mla_and_bfloat16(checkpoint_dir):
    need_kernel()
    mla = load_model(checkpoint_dir("deepseek_v3"))
    assert not any(layer.fuses_attention for layer in mla.layers)
    low = load_model(checkpoint_dir("qwen3_moe"), dtype=torch.bfloat16)
    assert not any(layer.fuses_attention for layer in low.layers)
    assert isinstance(low.layers[0].ffn, model_mod.MoEBlock) and low.layers[0].ffn.gate.weight_strips is None
