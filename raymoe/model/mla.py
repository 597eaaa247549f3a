"""DeepSeek multi-head latent attention (MLA) over the paged KV cache.

The cache holds, per token, the compressed latent only: `[kv_lora_rank]` (after its norm) and the
shared rotary key `[qk_rope_head_dim]`, as one "head" of width kv_lora_rank + qk_rope_head_dim.
Each step expands the gathered latents to per-head keys and values with `kv_b_proj`.
"""

from __future__ import annotations

import torch

from raymoe.model import paged
from raymoe.model.checkpoint import Checkpoint
from raymoe.model.layers import Linear, RMSNorm
from raymoe.model.rope import Rotary, _yarn_mscale
from raymoe.model.spec import ModelSpec


def mla_scale(spec: ModelSpec) -> float:
    """Softmax scale: 1/sqrt(qk_head_dim), times mscale^2 under YaRN with mscale_all_dim."""
    scale = spec.head_dim**-0.5
    rope = spec.rope_scaling
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        m = _yarn_mscale(rope["factor"], rope["mscale_all_dim"])
        scale *= m * m
    return scale


class MLAAttention:
    def __init__(self, spec: ModelSpec, ckpt: Checkpoint, layer: int, dtype: torch.dtype, rotary: Rotary):
        p, m = f"model.layers.{layer}.self_attn", spec.mla
        self.heads, self.m = spec.num_heads, m
        self.qk_head_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            self.q_proj = Linear.load(ckpt, f"{p}.q_proj", dtype)
        else:
            self.q_a_proj = Linear.load(ckpt, f"{p}.q_a_proj", dtype)
            self.q_a_norm = RMSNorm(ckpt.get(f"{p}.q_a_layernorm.weight", dtype), 1e-6)
            self.q_b_proj = Linear.load(ckpt, f"{p}.q_b_proj", dtype)
        self.kv_a_proj = Linear.load(ckpt, f"{p}.kv_a_proj_with_mqa", dtype)
        self.kv_a_norm = RMSNorm(ckpt.get(f"{p}.kv_a_layernorm.weight", dtype), 1e-6)
        self.kv_b_proj = Linear.load(ckpt, f"{p}.kv_b_proj", dtype)
        self.o_proj = Linear.load(ckpt, f"{p}.o_proj", dtype)
        self.rotary = rotary
        self.scale = mla_scale(spec)

    def kv_shape(self) -> tuple[int, int, int]:
        return 1, self.m.kv_lora_rank + self.m.qk_rope_head_dim, 0

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.m.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))

    def __call__(self, x: torch.Tensor, batch: paged.AttentionBatch, cache, cos_sin) -> torch.Tensor:
        """x: [T, H] -> [T, H]; writes this step's latents into `cache`."""
        m, cos, sin = self.m, *cos_sin
        q = self._query(x).view(-1, self.heads, self.qk_head_dim)  # [T, heads, nope + rope]
        q_nope, q_rot = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        q_rot = self.rotary.apply(q_rot, cos, sin)
        paged.write_kv(cache, batch, self.cache_entries(x, cos_sin)[0], None)
        ctx = paged.gather_context(cache[0], batch)[:, :, 0]  # [B, max_ctx, rank + rope]
        k, v = self._expand(ctx)
        out = paged.attend(torch.cat([q_nope, q_rot], dim=-1), k, v, batch, self.scale)
        return self.o_proj(out.reshape(out.shape[0], -1))

    def cache_entries(self, x: torch.Tensor, cos_sin) -> tuple[torch.Tensor, None]:
        """What this layer caches for x [T, H]: [T, 1, rank + rope] (normed latent, rotated key); no values."""
        m, (cos, sin) = self.m, cos_sin
        latent, k_rot = self.kv_a_proj(x).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        k_rot = self.rotary.apply(k_rot[:, None, :], cos, sin)  # [T, 1, rope]
        return torch.cat([self.kv_a_norm(latent)[:, None, :], k_rot], dim=-1), None

    def rerotate_keys(self, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Cached rows [T, 1, rank + rope] at positions p -> at p + delta [T]: the latent does not
        depend on position, the rotary key part turns."""
        latent, k_rot = k.split([self.m.kv_lora_rank, self.m.qk_rope_head_dim], dim=-1)
        return torch.cat([latent, self.rotary.rerotate(k_rot, delta)], dim=-1)

    def _expand(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, C, rank + rope] latents -> keys [B, C, heads, nope + rope], values [B, C, heads, v]."""
        m = self.m
        latent, k_rot = ctx.split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(latent).view(*latent.shape[:2], self.heads, m.qk_nope_head_dim + m.v_head_dim)
        k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rot[:, :, None, :].expand(-1, -1, self.heads, -1)], dim=-1)
        return k, v
