"""Tiny random float32 checkpoints of every supported family, built with transformers.

transformers is the reference the tests compare with; raymoe never imports it at run time.
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES = {
    "mixtral": lambda t: (
        t.MixtralConfig(**COMMON, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2),
        t.MixtralForCausalLM,
    ),
    "qwen2_moe": lambda t: (
        t.Qwen2MoeConfig(
            **COMMON,
            intermediate_size=128,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=96,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            mlp_only_layers=[1],
        ),
        t.Qwen2MoeForCausalLM,
    ),
    "qwen3_moe": lambda t: (
        t.Qwen3MoeConfig(
            **COMMON, head_dim=32, intermediate_size=128, moe_intermediate_size=48, num_experts=8,
            num_experts_per_tok=3, norm_topk_prob=True,
        ),
        t.Qwen3MoeForCausalLM,
    ),
    "olmoe": lambda t: (
        t.OlmoeConfig(**COMMON, intermediate_size=48, num_experts=8, num_experts_per_tok=2, clip_qkv=5.0),
        t.OlmoeForCausalLM,
    ),
    "deepseek_v3": lambda t: (
        t.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4},
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            routed_scaling_factor=2.5,
        ),
        t.DeepseekV3ForCausalLM,
    ),
}


def build_checkpoint(family: str, path: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random float32 model of `family` to `path`; returns `path`."""
    import transformers

    config, model_cls = FAMILIES[family](transformers)
    if overrides:
        config = type(config)(**{**config.to_dict(), **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    _randomize(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)


def _randomize(model, seed: int) -> None:
    """Random init gives near-uniform routing and logits; widen weights so routing and greedy
    choices are decisive (ties would make the comparison depend on summation order)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p.shape[-1] ** 0.5))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))


def load_reference(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


NEAR_TIE = 1e-4  # the one parting forgiven: the reference's top-2 logits this close


def reference_greedy(reference, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def assert_same_greedy(reference, prompt: list[int], got: list[int], expected: list[int]) -> None:
    """Equal greedy continuations, except a parting at a near-tie of the reference's top-2 logits."""
    assert len(got) == len(expected), (len(got), len(expected))
    first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    if first is None:
        return
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + expected[:first]])).logits[0, -1]
    top2 = torch.topk(logits, 2).values
    margin = (top2[0] - top2[1]).item()
    assert margin <= NEAR_TIE, f"tokens part at step {first} where the reference's margin is {margin:.2e}: {got} vs {expected}"


def engine_greedy(path, prompts: list[list[int]], params, config, device: str = "cpu") -> list[list[int]]:
    """Token ids of raymoe's one-process engine for every prompt (all added before the first step)."""
    from raymoe.engine.llm_engine import LLMEngine
    from raymoe.model.model import load_model

    engine = LLMEngine(load_model(path, device=device), None, config)
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=str(i))
    out = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for d in engine.step():
            out[d.request_id].extend(d.token_ids)
    return [out[str(i)] for i in range(len(prompts))]
