"""RMSNorm in one C call (`norm.c`): torch's op is a composite of ~6 aten ops, ~20 us a call at a
decode step's sizes, 13 calls a step in the built-in model. Same math as `RMSNorm`; the mean's
summation order is the kernel's own, so results differ from torch's by float32 rounding only."""

from __future__ import annotations

import ctypes

import torch

from raymoe.model.native.build import bind

_I, _P = ctypes.c_int64, ctypes.c_void_p
_ARGS = [_P, _I, _I, _I, _I, _P, _I, ctypes.c_float, _P]
_NAMES = {torch.float32: "rms_norm_f32", torch.bfloat16: "rms_norm_bf16"}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x [..., n] times weight [n] (every row) -> a new tensor; or x [T, H, n] with its heads packed
    (rows at one stride, e.g. a view into a fused projection) times weight [n] or [H, n] (per head)
    -> [T, H, n] contiguous. None where the kernel does not take these tensors (not built, another
    dtype or device, other strides). Kept lean: it runs 13 times a step."""
    name = _NAMES.get(x.dtype)
    if name is None or not x.is_cpu or weight.dtype != x.dtype or not weight.is_contiguous():
        return None
    n, numel = x.shape[-1], x.numel()
    if x.is_contiguous():
        heads = x.shape[-2] if weight.dim() == 2 and x.dim() >= 2 else 1
        tokens, stride = numel // (n * heads), n * heads
    elif x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == n:  # [T, H, n], rows at stride(0)
        tokens, heads, stride = x.shape[0], x.shape[1], x.stride(0)
    else:
        return None
    if weight.shape[-1] != n or (weight.dim() == 2 and weight.shape[0] != heads) or weight.dim() > 2 or not numel:
        return None
    fn = bind("norm", name, _ARGS)
    if fn is None:
        return None
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    fn(x.data_ptr(), tokens, heads, n, stride, weight.data_ptr(), n if weight.dim() == 2 else 0, eps, out.data_ptr())
    return out
