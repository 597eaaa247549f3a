"""Small building blocks shared by every family: RMSNorm, linear with optional bias, SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raymoe.model.checkpoint import Checkpoint
from raymoe.model.matmul import f32_copy, linear
from raymoe.model.native import layer as native_layer
from raymoe.model.native import norm as native_norm


class RMSNorm:
    def __init__(self, weight: torch.Tensor, eps: float):
        self.weight, self.eps = weight, eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fast = native_norm.rms_norm(x, self.weight, self.eps)  # raymoe's kernel where it is built
        if fast is not None:
            return fast
        if x.dtype == torch.float32:  # one fused op, same math as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Linear:
    """y = x W^T (+ b). W: [out, in]; for small bfloat16 weights a float32 copy beside it (`f32_copy`);
    for small float32 ones on the CPU a copy packed for raymoe's C linear, which then runs every call
    (`raymoe.model.native.layer`: a row's bits never depend on its step's other rows)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        self.weight_f32 = f32_copy(weight)
        self.weight_strips = native_layer.pack(weight)

    @classmethod
    def load(cls, ckpt: Checkpoint, prefix: str, dtype: torch.dtype) -> "Linear":
        return cls(ckpt.get(f"{prefix}.weight", dtype), ckpt.get_optional(f"{prefix}.bias", dtype))

    @classmethod
    def fused(cls, parts: list["Linear"]) -> "Linear":
        """Concatenate output rows so one matmul does the work of several (same per-output math)."""
        biases = [p.bias for p in parts]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else p.weight.new_zeros(p.weight.shape[0]) for p, b in zip(parts, biases)])
        return cls(torch.cat([p.weight for p in parts]), bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_strips is not None and x.dtype == torch.float32:
            return native_layer.linear(x, self.weight_strips, self.bias)
        return linear(x, self.weight, self.bias, self.weight_f32)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


class SwiGLU:
    """down(silu(gate(x)) * up(x)), with gate and up fused into one [2I, H] matmul."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        self.gate_up, self.down = gate_up, down  # [2I, H], [H, I]

    @classmethod
    def load(cls, ckpt: Checkpoint, prefix: str, dtype: torch.dtype, names=("gate_proj", "up_proj", "down_proj")):
        gate, up, down = (ckpt.get(f"{prefix}.{n}.weight", dtype) for n in names)
        return cls(torch.cat([gate, up]), down)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.gate_up).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.down)
