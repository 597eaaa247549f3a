"""The MoE decoder, split so attention + router and the routed experts can run in different processes.

`MoEModel.forward` runs every layer with the experts in `self.experts` (an `ExpertBackend`: local, or
the cluster's dispatch). A layer is `attention_part` (norm, attention, residual, norm) then
`ffn_part` (dense MLP, or router + routed experts + shared expert), so a pipelined runner can
interleave microbatches between the two.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from raymoe.logs import progress
from raymoe.model.attention import GQAAttention
from raymoe.model.checkpoint import Checkpoint
from raymoe.model.experts import ExpertBackend, ExpertStore, LocalExperts
from raymoe.model.fused import FusedDecode
from raymoe.model.native import layer as native_layer
from raymoe.model.head import HeadLinear
from raymoe.model.host import inference
from raymoe.model.layers import Linear, RMSNorm, SwiGLU
from raymoe.model.mla import MLAAttention
from raymoe.model.paged import AttentionBatch
from raymoe.model.replay import RoutingReplay
from raymoe.model.tally import RoutingTally
from raymoe.model.rope import Rotary
from raymoe.model.router import sigmoid_grouped_topk, softmax_topk
from raymoe.model.spec import ModelSpec, load_spec

logger = logging.getLogger(__name__)


class MoEBlock:
    """Router + routed experts (through a backend) + optional shared expert. With a routing
    replay (`raymoe.model.replay`), the router picks the recorded experts and weights instead."""

    def __init__(self, spec: ModelSpec, ckpt: Checkpoint, layer: int, dtype: torch.dtype,
                 replay: RoutingReplay | None = None):  # fmt: skip
        p = f"model.layers.{layer}.block_sparse_moe" if spec.family == "mixtral" else f"model.layers.{layer}.mlp"
        self.layer, self.spec, self.replay = layer, spec, replay
        self.moe_index = spec.moe_layer_ids.index(layer)
        self.tally = None  # a RoutingTally that records each step's choices, when set
        self.gate = Linear.load(ckpt, f"{p}.gate", dtype)  # [E, H]
        self.correction_bias = ckpt.get_optional(f"{p}.gate.e_score_correction_bias", torch.float32)
        self.shared, self.shared_gate = None, None
        if spec.shared_expert_intermediate_size:
            name = "shared_experts" if spec.family == "deepseek_v3" else "shared_expert"
            self.shared = SwiGLU.load(ckpt, f"{p}.{name}", dtype)
        if spec.shared_expert_gate:
            self.shared_gate = Linear.load(ckpt, f"{p}.shared_expert_gate", dtype)

    def route(self, x: torch.Tensor, batch: AttentionBatch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> topk_ids [T, K], topk_weights [T, K]. batch: the step's metadata (a replay
        reads each token's sequence tag and position from it)."""
        ids, weights = self._choose(x, batch)
        if self.tally is not None:
            self.tally.add(self.moe_index, ids)
        return ids, weights

    def _choose(self, x: torch.Tensor, batch: AttentionBatch | None) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        if self.replay is not None:
            ids, weights = self.replay.route(self.moe_index, batch.sequence_tags, batch.positions)
            return ids, weights.to(x.dtype)
        if s.router == "sigmoid_grouped":
            logits = F.linear(x.float(), self.gate.weight.float())
            bias = self.correction_bias if self.correction_bias is not None else logits.new_zeros(s.num_experts)
            return sigmoid_grouped_topk(
                logits, bias, s.top_k, s.n_group, s.topk_group, s.norm_topk_prob, s.routed_scaling_factor
            )
        if self._native_route(x):
            return native_layer.route(x, self.gate.weight_strips, s.top_k, s.norm_topk_prob)
        return softmax_topk(self.gate(x), s.top_k, s.norm_topk_prob)

    def _native_route(self, x: torch.Tensor) -> bool:
        """A softmax router over a float32 gate without bias: raymoe's C router (`native.layer.route`)."""
        return self.gate.weight_strips is not None and self.gate.bias is None and x.dtype == torch.float32

    def __call__(self, x: torch.Tensor, experts: ExpertBackend, batch: AttentionBatch | None = None) -> torch.Tensor:
        ids, weights = self.route(x, batch)
        return self.finish(x, experts.run(self.layer, x, ids, weights))

    def residual(self, h: torch.Tensor, x: torch.Tensor, experts: ExpertBackend) -> torch.Tensor | None:
        """h + this block on x (both [T, H]) in one C call (`native.layer.moe_block`: the router's and
        the experts' own code, so the same bits as `h + self(x, experts)`), where the experts are all
        in this process and the block has no shared expert or replay; else None."""
        whole = experts.whole(self.layer) if isinstance(experts, LocalExperts) else None
        if whole is None or self.shared is not None or self.replay is not None or not self._native_route(x):
            return None
        s = self.spec
        done = native_layer.moe_block(x, h, self.gate.weight_strips, s.top_k, s.norm_topk_prob, *whole.kernel_weights())
        if done is None:
            return None
        if self.tally is not None:
            self.tally.add(self.moe_index, done[1])
        return done[0]

    def finish(self, x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """Add the shared expert (if any) to the routed experts' output. Both [T, H]."""
        if self.shared is None:
            return routed
        shared = self.shared(x)
        if self.shared_gate is not None:
            shared = torch.sigmoid(self.shared_gate(x)) * shared
        return routed + shared


class DecoderLayer:
    def __init__(self, spec: ModelSpec, ckpt: Checkpoint, layer: int, dtype: torch.dtype, rotary: Rotary,
                 replay: RoutingReplay | None = None):  # fmt: skip
        p, eps = f"model.layers.{layer}", spec.rms_norm_eps
        attention_cls = MLAAttention if spec.mla is not None else GQAAttention
        self.attn = attention_cls(spec, ckpt, layer, dtype, rotary)
        self.input_norm = RMSNorm(ckpt.get(f"{p}.input_layernorm.weight", dtype), eps)
        self.post_norm = RMSNorm(ckpt.get(f"{p}.post_attention_layernorm.weight", dtype), eps)
        self.is_moe = spec.moe_layers[layer]
        self.ffn = MoEBlock(spec, ckpt, layer, dtype, replay) if self.is_moe else SwiGLU.load(ckpt, f"{p}.mlp", dtype)
        self.fuses_attention = attention_cls is GQAAttention and self.attn.fusable

    def attention_part(self, h: torch.Tensor, batch: AttentionBatch, cache, cos_sin):
        """h: [T, H] residual stream -> (residual after attention [T, H], its post-norm [T, H])."""
        if self.fuses_attention and h.dtype == torch.float32:
            done = self.attn.decode_block(h, self.input_norm, self.post_norm, batch, cache, cos_sin)
            if done is not None:  # a decode step in one C call: the same bits as below
                return done
        h = h + self.attn(self.input_norm(h), batch, cache, cos_sin)
        return h, self.post_norm(h)

    def ffn_part(self, x: torch.Tensor, experts: ExpertBackend, batch: AttentionBatch | None = None) -> torch.Tensor:
        return self.ffn(x, experts, batch) if self.is_moe else self.ffn(x)

    def __call__(self, h, batch, cache, cos_sin, experts: ExpertBackend) -> torch.Tensor:
        h, x = self.attention_part(h, batch, cache, cos_sin)
        done = self.ffn.residual(h, x, experts) if self.is_moe else None
        return done if done is not None else h + self.ffn_part(x, experts, batch)


class MoEModel:
    def __init__(self, spec: ModelSpec, ckpt: Checkpoint, dtype: torch.dtype, load_experts: bool = True):
        self.spec, self.dtype, self.device = spec, dtype, ckpt.device
        self.embed = ckpt.get("model.embed_tokens.weight", dtype)  # [V, H]
        self.rotary = _rotary(spec)
        self.replay = _replay(spec, self.device)
        layers = progress(range(spec.num_layers), f"loading {ckpt.path.name}", unit="layer")
        self.layers = [DecoderLayer(spec, ckpt, i, dtype, self.rotary, self.replay) for i in layers]
        self.norm = RMSNorm(ckpt.get("model.norm.weight", dtype), spec.rms_norm_eps)
        tied = spec.tie_word_embeddings or not ckpt.has("lm_head.weight")
        self.lm_head = self.embed if tied else ckpt.get("lm_head.weight", dtype)  # [V, H]
        self.head = HeadLinear(self.lm_head)
        self.experts: ExpertBackend | None = None
        self.tally = None  # a RoutingTally recording each request's routing, when set (record_routing)
        if load_experts:
            self.experts = LocalExperts(ExpertStore.load(ckpt, spec, dtype), spec.num_experts)
        self.fused = FusedDecode.of(self)  # every layer of a decode step in one C call, where they all take it

    def record_routing(self) -> RoutingTally:
        """Start recording each request's routing (per request `[moe layers, experts]` counts)."""
        self.tally = RoutingTally(len(self.spec.moe_layer_ids), self.spec.num_experts)
        for layer in self.layers:
            if layer.is_moe:
                layer.ffn.tally = self.tally
        return self.tally

    def kv_layout(self) -> list[tuple[int, int, int]]:
        """Per layer (kv_heads, k_dim, v_dim) of the paged cache."""
        return [layer.attn.kv_shape() for layer in self.layers]

    def rope(self, batch: AttentionBatch):
        return self.rotary.cos_sin(batch.positions, self.dtype)

    @inference
    def forward(
        self, input_ids: torch.Tensor, batch: AttentionBatch, kv_cache, experts: ExpertBackend | None = None
    ) -> torch.Tensor:
        """input_ids: [T] -> final hidden states [T, H] (after the last norm)."""
        experts = experts or self.experts
        assert experts is not None, "no expert backend: load_experts=False needs one passed in"
        done = self.fused.run(input_ids, batch, kv_cache, experts) if self.fused is not None else None
        if done is not None:  # what the lines below give, in one call: the same bits
            return done
        h = self.embed[input_ids]
        cos_sin = self.rope(batch)
        for layer, cache in zip(self.layers, kv_cache):
            h = layer(h, batch, cache, cos_sin, experts)
        return self.norm(h)

    @inference
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] -> logits [N, V] float32."""
        return self.head(hidden).float()


def _replay(spec: ModelSpec, device: torch.device) -> RoutingReplay | None:
    if spec.routing_replay is None:
        return None
    replay = RoutingReplay.from_dir(spec.routing_replay)
    replay.check_model(len(spec.moe_layer_ids), spec.num_experts, spec.top_k)
    return replay.to(device)


def _rotary(spec: ModelSpec) -> Rotary:
    if spec.mla is not None:
        dim, interleaved = spec.mla.qk_rope_head_dim, spec.mla.rope_interleave
    else:
        dim, interleaved = spec.head_dim, False
    return Rotary(dim, spec.rope_theta, spec.rope_scaling, spec.max_position_embeddings, interleaved)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, load_experts: bool = True,
               device: str | torch.device = "cpu") -> MoEModel:  # fmt: skip
    """Load a Hugging Face MoE checkpoint folder onto `device`. `load_experts=False` skips the routed
    experts (a worker whose experts live on shards reads none of their bytes)."""
    spec = load_spec(path)
    start = time.perf_counter()
    logger.info("loading %s (%s, %d layers, %s, %s%s)", path, spec.family, spec.num_layers,
                str(dtype).removeprefix("torch."), device, "" if load_experts else ", no routed experts")  # fmt: skip
    model = MoEModel(spec, Checkpoint(path, device), dtype, load_experts)
    logger.info("loaded %s in %.1f s", Path(path).name, time.perf_counter() - start)
    return model
