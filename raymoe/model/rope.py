"""Rotary position embeddings (default, linear and YaRN scaling), as the HF reference computes them."""

from __future__ import annotations

import math

import torch


def inv_freq_and_scale(dim: int, theta: float, scaling: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim // 2] and the cos/sin scale for a rope_parameters dict."""
    base = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return base, 1.0
    if rope_type == "linear":
        return base / scaling["factor"], 1.0
    assert rope_type == "yarn", rope_type
    return _yarn(dim, theta, scaling, max_positions)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, theta: float, p: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    original = p.get("original_max_position_embeddings") or max_positions
    factor = p.get("factor") or max_positions / original
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv_freq, float(attention_factor)


class Rotary:
    """cos/sin tables by position; `apply` rotates [T, heads, dim] tensors (half-split layout)."""

    def __init__(self, dim: int, theta: float, scaling: dict, max_positions: int, interleaved: bool = False):
        inv_freq, self.scale = inv_freq_and_scale(dim, theta, scaling, max_positions)
        self.inv_freq = inv_freq  # [dim / 2] float32, on the host until the first table is built
        self.interleaved = interleaved
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None
        self._sin: tuple[torch.Tensor, torch.Tensor] | None = None  # (the last sin, its signed form)
        self._signed_table: tuple[torch.Tensor, torch.Tensor] | None = None  # (the sin table, its signed form)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, dim] (broadcast over heads), from a table grown on demand."""
        needed = int(positions.max()) + 1 if positions.numel() else 1
        cos, sin = self._grown(needed, dtype, positions.device)
        return cos[positions][:, None, :], sin[positions][:, None, :]

    def tables(self, needed: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables by position, at least `needed` rows: cos and signed sin (`signed`), each [L, dim]
        contiguous; row p is what `cos_sin` and `signed` give position p."""
        cos, sin = self._grown(needed, dtype, device)
        if self._signed_table is None or self._signed_table[0] is not sin:
            self._signed_table = sin, _signed(sin)
        return cos, self._signed_table[1]

    def _grown(self, needed: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._table
        if t is None or t[0].shape[0] < needed or t[0].dtype != dtype or t[0].device != device:
            self._table = self._build(max(needed, 2 * (t[0].shape[0] if t else 256)), dtype, device)
        return self._table

    def _build(self, length: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        self.inv_freq = self.inv_freq.to(device)
        freqs = torch.arange(length, device=device)[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)

    def rerotate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Move keys already rotated by `apply` to other positions: x [T, heads, dim] rotated at
        positions p, delta [T] -> x rotated at p + delta. Rotations compose, R(p + d) = R(d) R(p),
        so this rotates by the raw angles d * inv_freq: no attention scale (x carries it already)
        and the half-split layout whatever `interleaved` (`apply` writes half-split)."""
        freqs = delta.to(torch.float32)[:, None] * self.inv_freq.to(delta.device)[None, :]  # [T, dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, dim]
        xf = x.float()
        x1, x2 = xf[..., : x.shape[-1] // 2], xf[..., x.shape[-1] // 2 :]
        return (xf * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()).to(x.dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            half = cos.shape[-1] // 2
            c, s = cos[..., :half], sin[..., :half]
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
        # x * cos + cat(-x2, x1) * sin, as cat(x2, x1) * cat(-sin1, sin2) (same products: negating a
        # factor is exact) in 4 ops instead of 7
        return x * cos + x.roll(x.shape[-1] // 2, -1) * self.signed(sin)

    def signed(self, sin: torch.Tensor) -> torch.Tensor:
        """sin [..., dim] -> cat(-first half, second half), made once per step's table (every layer
        passes the same `sin`)."""
        if self._sin is None or self._sin[0] is not sin:
            self._sin = sin, _signed(sin)
        return self._sin[1]


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., dim] -> cat(-first half, second half)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
