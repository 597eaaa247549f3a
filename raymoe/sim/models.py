"""Model presets: the layer sizes the simulator needs, from each model's published config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int  # all decoder layers
    num_moe_layers: int  # the last `num_moe_layers` are MoE; the others dense
    num_experts: int  # routed experts per MoE layer
    top_k: int
    hidden_size: int
    expert_intermediate: int  # routed expert FFN width
    attention_params: int  # weights per layer of attention (projections)
    kv_bytes_per_token: int  # KV cache bytes per token per layer
    vocab_size: int
    num_shared_experts: int = 0
    dense_intermediate: int = 0  # FFN width of the dense layers
    weight_bytes: int = 2  # bytes per weight (bf16 = 2, fp8 = 1)
    activation_bytes: int = 2  # bytes per activation element on the wire

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.expert_intermediate  # gate, up, down

    @property
    def expert_bytes(self) -> int:
        return self.expert_params * self.weight_bytes

    @property
    def token_bytes(self) -> int:
        """One token's hidden state on the wire (dispatch or combine)."""
        return self.hidden_size * self.activation_bytes


# allenai/OLMoE-1B-7B-0924: 16 layers, 64 experts top-8, MHA 16 x 128.
OLMOE_1B_7B = ModelSpec(
    name="olmoe-1b-7b",
    num_layers=16,
    num_moe_layers=16,
    num_experts=64,
    top_k=8,
    hidden_size=2048,
    expert_intermediate=1024,
    attention_params=4 * 2048 * 2048,
    kv_bytes_per_token=2 * 16 * 128 * 2,
    vocab_size=50304,
)

# mistralai/Mixtral-8x7B-v0.1: 32 layers, 8 experts top-2, GQA 32 query / 8 KV heads of 128.
MIXTRAL_8X7B = ModelSpec(
    name="mixtral-8x7b",
    num_layers=32,
    num_moe_layers=32,
    num_experts=8,
    top_k=2,
    hidden_size=4096,
    expert_intermediate=14336,
    attention_params=4096 * (4096 + 2 * 1024) + 4096 * 4096,
    kv_bytes_per_token=2 * 8 * 128 * 2,
    vocab_size=32000,
)

# deepseek-ai/DeepSeek-V3: 61 layers (3 dense, 58 MoE), 256 routed experts top-8 plus one
# shared, MLA (128 heads, q rank 1536, kv rank 512, rope 64); weights in fp8 as released.
_MLA_PARAMS = 7168 * 1536 + 1536 * 128 * 192 + 7168 * (512 + 64) + 512 * 128 * 256 + 128 * 128 * 7168
DEEPSEEK_V3 = ModelSpec(
    name="deepseek-v3",
    num_layers=61,
    num_moe_layers=58,
    num_experts=256,
    top_k=8,
    hidden_size=7168,
    expert_intermediate=2048,
    attention_params=_MLA_PARAMS,
    kv_bytes_per_token=(512 + 64) * 2,
    vocab_size=129280,
    num_shared_experts=1,
    dense_intermediate=18432,
    weight_bytes=1,
)


def from_model_spec(spec, name: str, weight_bytes: int = 2, activation_bytes: int | None = None) -> ModelSpec:
    """The simulator's view of a `raymoe.model.spec.ModelSpec` (duck-typed: no torch imported here).

    GQA attention only (MLA models have hand-written presets); the shared expert's width must be
    a multiple of the routed experts' (it is priced as that many routed experts)."""
    if spec.mla is not None:
        raise ValueError(f"{name}: MLA attention has no generic formula here; write a preset")
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shared, width = spec.shared_expert_intermediate_size, spec.moe_intermediate_size
    if shared % width:
        raise ValueError(f"{name}: shared expert width {shared} is not a multiple of {width}")
    return ModelSpec(
        name=name, num_layers=spec.num_layers, num_moe_layers=sum(spec.moe_layers),
        num_experts=spec.num_experts, top_k=spec.top_k, hidden_size=spec.hidden_size,
        expert_intermediate=width, attention_params=2 * spec.hidden_size * (q + kv),
        kv_bytes_per_token=2 * kv * weight_bytes, vocab_size=spec.vocab_size,
        num_shared_experts=shared // width, dense_intermediate=spec.dense_intermediate_size,
        weight_bytes=weight_bytes, activation_bytes=activation_bytes or weight_bytes,
    )  # fmt: skip


# raymoe's random-weight test model (builtin.random_model_path, Qwen3-MoE layout): 4 MoE layers, 16 experts
# top-4, GQA 8 query / 2 KV heads of 32, float32 weights, KV cache and wire rows as it runs.
BUILTIN = ModelSpec(
    name="raymoe-builtin",
    num_layers=4,
    num_moe_layers=4,
    num_experts=16,
    top_k=4,
    hidden_size=256,
    expert_intermediate=256,
    attention_params=2 * 256 * (256 + 64),
    kv_bytes_per_token=2 * 64 * 4,
    vocab_size=4096,
    dense_intermediate=512,
    weight_bytes=4,
    activation_bytes=4,
)

MODELS = {m.name: m for m in (OLMOE_1B_7B, MIXTRAL_8X7B, DEEPSEEK_V3, BUILTIN)}
