"""Matmuls of bfloat16 / float16 weights, per op on the path that pays on this machine.

A CPU without bfloat16 instructions (no `avx512_bf16`, no `amx_bf16` flag) runs torch's bfloat16
GEMMs 9-38x slower than float32 ones at the shapes of an engine step (docs/benchmarks.md), while
widening the operands to float32 for the one op costs 1.0-1.5x the float32 time. So there the
weights stay in bfloat16 (half the memory) and each matmul computes in float32, rounding its
output back; with the instructions, or on an accelerator, the op runs in bfloat16. float32 is
never touched.

With the instructions (AVX512-BF16 / AMX) a bfloat16 GEMM still has a fixed cost of ~15 µs a call
at one thread (oneDNN builds its descriptors anew each call, ~60 aligned mallocs; its kernel runs
3-9 µs), against ~2-3 µs for MKL's float32 one, so small ones run faster in float32. The rule,
from `bench/bf16_shapes.py` (docs/benchmarks.md): an op of M rows over a [N, K] weight computes in
float32, from a float32 copy of the weight kept beside the bfloat16 one, while M * N * K <=
`F32_MAX_WORK`; above that bfloat16 pays. Only weights small enough to take that path at one row
(N * K <= `F32_MAX_WORK`, 2 MiB in float32) get a copy (`f32_copy`): the attention projections,
router and LM head of small models, never experts. A fixed rule rather than a timing probe at
load, so which path an op takes (and so its rounding) does not depend on the machine's load.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

LOW = (torch.bfloat16, torch.float16)
F32_MAX_WORK = 1 << 19  # M * N * K at or under which a bf16 op runs faster in float32 (bf16 CPU)


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


def f32_copy(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [out, in]: its float32 copy where small low-precision ops on it run faster in float32
    (low precision on a CPU with bf16 instructions, out * in <= F32_MAX_WORK), else None."""
    small = weight.numel() <= F32_MAX_WORK and weight.dtype in LOW and weight.device.type == "cpu"
    return weight.float() if small and cpu_has_bf16() else None


def pad_pays(rows: torch.Tensor, counts: list[int]) -> bool:
    """rows [P, H] in groups of `counts` rows (one per expert, zeros allowed): True where two batched
    matmuls over every group padded to the largest beat two per non-empty group. Only in low precision
    on a CPU with bf16 instructions (each oneDNN call costs ~15 µs before any work), from at least 4
    non-empty groups, while the padded rows are at most 2 P + 64 (bench/bf16_shapes.py, docs/benchmarks.md)."""
    if rows.dtype not in LOW or rows.device.type != "cpu" or not cpu_has_bf16():
        return False
    return sum(1 for c in counts if c) >= 4 and len(counts) * max(counts) <= 2 * rows.shape[0] + 64


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, weight_f32: torch.Tensor | None = None
) -> torch.Tensor:
    """x [N, in] @ weight [out, in]^T (+ bias) -> [N, out] in x's dtype. `weight_f32` (from
    `f32_copy`) serves ops of at most F32_MAX_WORK multiply-adds."""
    if weight_f32 is not None and x.numel() * weight.shape[0] <= F32_MAX_WORK:
        weight = weight_f32
    elif not widen(weight):
        return F.linear(x, weight, bias)
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def matmul(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """x [N, in] @ weight_t [in, out] -> [N, out] in x's dtype."""
    if not widen(weight_t):
        return x @ weight_t
    return (x.float() @ weight_t.float()).to(x.dtype)
