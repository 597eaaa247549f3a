"""Matmuls of bfloat16 / float16 weights, per op on the path that pays on this machine.

A CPU without bfloat16 instructions (no `avx512_bf16`, no `amx_bf16` flag) runs torch's bfloat16
GEMMs 9-38x slower than float32 ones at the shapes of an engine step (docs/benchmarks.md), while
widening the operands to float32 for the one op costs 1.0-1.5x the float32 time. So there the
weights stay in bfloat16 (half the memory) and each matmul computes in float32, rounding its
output back; with the instructions, or on an accelerator, the op runs in bfloat16. float32 is
never touched.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

LOW = (torch.bfloat16, torch.float16)


@functools.cache
def cpu_has_bf16() -> bool:
    """The CPU's flags name bfloat16 dot products (AVX512-BF16 or AMX-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def widen(t: torch.Tensor) -> bool:
    """True where a matmul on `t` should compute in float32: low precision on a CPU without bf16."""
    return t.dtype in LOW and t.device.type == "cpu" and not cpu_has_bf16()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, in] @ weight [out, in]^T (+ bias) -> [N, out] in x's dtype."""
    if not widen(weight):
        return F.linear(x, weight, bias)
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def matmul(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """x [N, in] @ weight_t [in, out] -> [N, out] in x's dtype."""
    if not widen(weight_t):
        return x @ weight_t
    return (x.float() @ weight_t.float()).to(x.dtype)
