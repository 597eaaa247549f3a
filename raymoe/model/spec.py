"""ModelSpec: one normalised, frozen description of an MoE checkpoint's shape.

Hugging Face families spell the same thing differently (`num_local_experts` vs `num_experts`,
`rope_theta` at the top or inside `rope_parameters`); this module reads `config.json` once and
everything downstream reads only a `ModelSpec`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from raymoe.errors import CheckpointError, UnsupportedArchitectureError

# architecture name in config.json -> raymoe family
ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")


@dataclass(frozen=True)
class MLASpec:
    """DeepSeek multi-head latent attention sizes."""

    q_lora_rank: int | None  # None: q comes from one full projection
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True  # rotary pairs (x0, x1), (x2, x3)... as DeepSeek lays them out


@dataclass(frozen=True)
class ModelSpec:
    family: str  # one of ARCHITECTURES' values
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # per-head size of q/k for GQA families (MLA: qk_nope + qk_rope)
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)  # rope_parameters minus rope_theta
    attention_bias: bool = False  # q/k/v biases (Qwen2-MoE)
    qk_norm: str | None = None  # "head" (Qwen3: per head) | "full" (OLMoE: whole projection)
    clip_qkv: float | None = None  # OLMoE clamps q/k/v
    sliding_window: tuple[int | None, ...] = ()  # per layer; None = full attention
    # Mixture of experts
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE block (True) or dense MLP (False)
    dense_intermediate_size: int = 0  # dense MLP layers' width
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE gates its shared expert with a sigmoid
    router: str = "softmax"  # "softmax" | "sigmoid_grouped" (DeepSeek-V3)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    mla: MLASpec | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    routing_replay: str | None = None  # a trace folder whose routing the routers replay (model/replay.py)

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, is_moe in enumerate(self.moe_layers) if is_moe]

    @property
    def num_parameters_estimate(self) -> int:
        expert = 3 * self.hidden_size * self.moe_intermediate_size
        return self.num_experts * expert * sum(self.moe_layers) + 2 * self.vocab_size * self.hidden_size


def load_spec(path: str | Path) -> ModelSpec:
    """Read `<path>/config.json` into a ModelSpec; raise a CheckpointError saying what to fix."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} not found: a model folder needs config.json (Hugging Face format)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); re-save the checkpoint") from e
    return spec_from_config(cfg, source=str(cfg_path))


def spec_from_config(cfg: dict, source: str = "config.json") -> ModelSpec:
    family = _family(cfg, source)
    try:
        return _BUILDERS[family](cfg)
    except KeyError as e:
        raise CheckpointError(f"{source} lacks the field {e.args[0]!r}, needed for a {family} model") from e


def _family(cfg: dict, source: str) -> str:
    names = cfg.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    supported = ", ".join(sorted(ARCHITECTURES))
    raise UnsupportedArchitectureError(
        f"{source}: architecture {names or cfg.get('model_type')!r} is not supported; raymoe serves {supported}"
    )


def _rope(cfg: dict) -> tuple[float, dict]:
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"rope type {rope_type!r} is not supported; raymoe supports {SUPPORTED_ROPE_TYPES}")
    params["rope_type"] = rope_type
    return float(theta), params


def _eos(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _common(cfg: dict, family: str) -> dict:
    num_heads = cfg["num_attention_heads"]
    theta, scaling = _rope(cfg)
    return dict(
        family=family,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        num_experts=cfg.get("num_local_experts") or cfg.get("num_experts") or cfg["n_routed_experts"],
        top_k=cfg["num_experts_per_tok"],
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos(cfg),
        routing_replay=cfg.get("raymoe_routing_replay"),
    )


def _sliding(cfg: dict, n: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False:
        return (None,) * n
    types = cfg.get("layer_types") or ["sliding_attention"] * n
    return tuple(window if t == "sliding_attention" else None for t in types)


def _mixtral(cfg: dict) -> ModelSpec:
    c = _common(cfg, "mixtral")
    n = c["num_layers"]
    return ModelSpec(
        **c,
        sliding_window=_sliding(cfg, n),
        moe_intermediate_size=cfg["intermediate_size"],
        norm_topk_prob=True,
        moe_layers=(True,) * n,
    )


def _qwen_moe_layers(cfg: dict, n: int) -> tuple[bool, ...]:
    only_dense = set(cfg.get("mlp_only_layers") or [])
    step = cfg.get("decoder_sparse_step", 1) or 1
    return tuple(i not in only_dense and (i + 1) % step == 0 for i in range(n))


def _qwen2_moe(cfg: dict) -> ModelSpec:
    c = _common(cfg, "qwen2_moe")
    n = c["num_layers"]
    return ModelSpec(
        **c,
        attention_bias=bool(cfg.get("qkv_bias", cfg.get("attention_bias", True))),
        sliding_window=_sliding(cfg, n),
        moe_intermediate_size=cfg["moe_intermediate_size"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=_qwen_moe_layers(cfg, n),
        dense_intermediate_size=cfg["intermediate_size"],
        shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size", 0),
        shared_expert_gate=True,
    )


def _qwen3_moe(cfg: dict) -> ModelSpec:
    c = _common(cfg, "qwen3_moe")
    n = c["num_layers"]
    return ModelSpec(
        **c,
        attention_bias=bool(cfg.get("attention_bias", False)),
        qk_norm="head",
        sliding_window=_sliding(cfg, n),
        moe_intermediate_size=cfg["moe_intermediate_size"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=_qwen_moe_layers(cfg, n),
        dense_intermediate_size=cfg["intermediate_size"],
    )


def _olmoe(cfg: dict) -> ModelSpec:
    c = _common(cfg, "olmoe")
    n = c["num_layers"]
    return ModelSpec(
        **c,
        attention_bias=bool(cfg.get("attention_bias", False)),
        qk_norm="full",
        clip_qkv=cfg.get("clip_qkv"),
        sliding_window=(None,) * n,
        moe_intermediate_size=cfg["intermediate_size"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=(True,) * n,
    )


def _deepseek_v3(cfg: dict) -> ModelSpec:
    c = _common(cfg, "deepseek_v3")
    n = c["num_layers"]
    mla = MLASpec(
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=cfg["kv_lora_rank"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"],
        qk_rope_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"],
        rope_interleave=bool(cfg.get("rope_interleave", True)),
    )
    c["head_dim"] = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    c["num_kv_heads"] = c["num_heads"]  # MLA expands the latent to every head
    first_dense = cfg.get("first_k_dense_replace", 0)
    return ModelSpec(
        **c,
        sliding_window=(None,) * n,
        moe_intermediate_size=cfg["moe_intermediate_size"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        moe_layers=tuple(i >= first_dense for i in range(n)),
        dense_intermediate_size=cfg["intermediate_size"],
        shared_expert_intermediate_size=cfg["moe_intermediate_size"] * cfg.get("n_shared_experts", 0),
        router="sigmoid_grouped",
        n_group=cfg.get("n_group", 1),
        topk_group=cfg.get("topk_group", 1),
        routed_scaling_factor=cfg.get("routed_scaling_factor", 1.0),
        mla=mla,
    )


_BUILDERS = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
}
