"""Grouped-query attention with rotary embeddings over the paged KV cache
(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raymoe.model import paged, ragged
from raymoe.model.checkpoint import Checkpoint
from raymoe.model.layers import Linear, RMSNorm
from raymoe.model.native import layer as native_layer
from raymoe.model.native import norm as native_norm
from raymoe.model.rope import Rotary
from raymoe.model.spec import ModelSpec


class GQAAttention:
    def __init__(self, spec: ModelSpec, ckpt: Checkpoint, layer: int, dtype: torch.dtype, rotary: Rotary):
        p = f"model.layers.{layer}.self_attn"
        self.heads, self.kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.qkv = Linear.fused([Linear.load(ckpt, f"{p}.{n}_proj", dtype) for n in "qkv"])
        self.o_proj = Linear.load(ckpt, f"{p}.o_proj", dtype)
        self.qk_norm = spec.qk_norm
        if spec.qk_norm:
            eps = spec.rms_norm_eps
            self.q_norm = RMSNorm(ckpt.get(f"{p}.q_norm.weight", dtype), eps)
            self.k_norm = RMSNorm(ckpt.get(f"{p}.k_norm.weight", dtype), eps)
        self.qk_head_weight = None  # [heads + kv_heads, d]: Qwen3's q and k head norms as one op
        if spec.qk_norm == "head":
            q_w, k_w = self.q_norm.weight, self.k_norm.weight
            self.qk_head_weight = torch.cat([q_w.expand(self.heads, -1), k_w.expand(self.kv_heads, -1)])
        self.clip_qkv = spec.clip_qkv
        self.sliding_window = spec.sliding_window[layer] if spec.sliding_window else None
        self.rotary = rotary
        self.scale = self.head_dim**-0.5
        self.fusable = (  # what native.layer.attention_block computes
            self.qkv.weight_strips is not None and self.o_proj.weight_strips is not None and self.o_proj.bias is None
            and spec.qk_norm in (None, "head") and self.clip_qkv is None and not rotary.interleaved
        )  # fmt: skip

    def kv_shape(self) -> tuple[int, int, int]:
        return self.kv_heads, self.head_dim, self.head_dim

    def __call__(self, x: torch.Tensor, batch: paged.AttentionBatch, cache, cos_sin) -> torch.Tensor:
        """x: [T, H] (normed hidden) -> [T, H]; writes this step's K/V into `cache`."""
        qk, v = self._rotated_qk_and_v(x, cos_sin)  # [T, heads + kv_heads, d], [T, kv_heads, d]
        q, k = qk[:, : self.heads], qk[:, self.heads :]
        paged.write_kv(cache, batch, k, v)
        plan = ragged.plan_for(batch)
        if plan is not None:  # no padding to the step's longest sequence
            out = ragged.attend_ragged(q, k, v, cache, plan, self.scale, self.sliding_window)
            return self.o_proj(out.reshape(out.shape[0], -1))
        k_ctx, v_ctx = paged.gather_context(cache[0], batch), paged.gather_context(cache[1], batch)
        out = paged.attend(q, k_ctx, v_ctx, batch, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(out.shape[0], -1))

    def decode_block(self, h: torch.Tensor, input_norm: RMSNorm, post_norm: RMSNorm, batch: paged.AttentionBatch,
                     cache, cos_sin) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
        """For a step of decodes only, float32, where `fusable`: h [T, H] -> (h + attention over
        input_norm(h), its post_norm) in one C call (writing this step's K/V), with the bits of the
        ops run one by one; None for any other step (nothing written)."""
        plan = ragged.plan_for(batch)
        if plan is None or plan.prefills or plan.native is None or input_norm.eps != post_norm.eps:
            return None
        cos, sin = cos_sin
        return native_layer.attention_block(self, h, input_norm.weight, post_norm.weight, input_norm.eps,
                                            (cos, self.rotary.signed(sin)), cache, batch.slot_mapping, plan.native)  # fmt: skip

    def cache_entries(self, x: torch.Tensor, cos_sin) -> tuple[torch.Tensor, torch.Tensor]:
        """What this layer caches for x [T, H] (normed hidden): keys [T, kv_heads, d] (rotated), values
        [T, kv_heads, d]; the same numbers `__call__` writes (chunk-cache repair compares them)."""
        qk, v = self._rotated_qk_and_v(x, cos_sin)
        return qk[:, self.heads :], v

    def rerotate_keys(self, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Cached keys [T, kv_heads, d] at positions p -> at p + delta [T]."""
        return self.rotary.rerotate(k, delta)

    def _rotated_qk_and_v(self, x: torch.Tensor, cos_sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Project, normalise and rotate; q and k rotate together as one [T, heads + kv_heads, d]
        tensor (fewer small ops per layer than rotating each)."""
        heads, kv_heads, d = self.heads, self.kv_heads, self.head_dim
        qkv = self.qkv(x)  # [T, (heads + 2 kv_heads) d]
        if self.qk_norm == "full":  # OLMoE normalises each whole projection
            q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
            qkv = torch.cat([self.q_norm(q), self.k_norm(k), v], dim=-1)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        qkv = qkv.view(-1, heads + 2 * kv_heads, d)
        qk, v = qkv[:, : heads + kv_heads], qkv[:, heads + kv_heads :]
        if self.qk_head_weight is not None:  # Qwen3 normalises each head; RMSNorm's math, in one op
            normed = native_norm.rms_norm(qk, self.qk_head_weight, self.q_norm.eps)
            if normed is None:
                normed = F.rms_norm(qk.float(), (d,), None, self.q_norm.eps).to(qk.dtype) * self.qk_head_weight
            qk = normed
        elif self.qk_norm == "head":
            qk = torch.cat([self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])], dim=1)
        cos, sin = cos_sin
        return self.rotary.apply(qk, cos, sin), v
