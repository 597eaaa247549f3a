"""Grouped-query attention with rotary embeddings over the paged KV cache
(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)."""

from __future__ import annotations

import torch

from raymoe.model import paged
from raymoe.model.checkpoint import Checkpoint
from raymoe.model.layers import Linear, RMSNorm
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
        self.clip_qkv = spec.clip_qkv
        self.sliding_window = spec.sliding_window[layer] if spec.sliding_window else None
        self.rotary = rotary
        self.scale = self.head_dim**-0.5

    def kv_shape(self) -> tuple[int, int, int]:
        return self.kv_heads, self.head_dim, self.head_dim

    def __call__(self, x: torch.Tensor, batch: paged.AttentionBatch, cache, cos_sin) -> torch.Tensor:
        """x: [T, H] (normed hidden) -> [T, H]; writes this step's K/V into `cache`."""
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        if self.qk_norm == "full":  # OLMoE normalises the whole projection
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(-1, self.heads, self.head_dim)  # [T, heads, d]
        k = k.view(-1, self.kv_heads, self.head_dim)
        v = v.view(-1, self.kv_heads, self.head_dim)
        if self.qk_norm == "head":  # Qwen3 normalises each head
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos_sin
        q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
        paged.write_kv(cache, batch, k, v)
        k_ctx, v_ctx = paged.gather_context(cache[0], batch), paged.gather_context(cache[1], batch)
        out = paged.attend(q, k_ctx, v_ctx, batch, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(out.shape[0], -1))
