"""Matmuls of bfloat16 / float16 weights, per op and shape on the path that pays on this machine.

A CPU without bfloat16 instructions (no `avx512_bf16`, no `amx_bf16` flag) runs torch's bfloat16
GEMMs 9-38x slower than float32 ones at the shapes of an engine step (docs/benchmarks.md), while
widening the operands to float32 for the one op costs 1.0-1.5x the float32 time. So there the
weights stay in bfloat16 (half the memory) and each matmul computes in float32, rounding its
output back.

With the instructions (AVX512-BF16 / AMX) a bfloat16 GEMM still costs ~15 µs a call at one thread
before any work (oneDNN builds its descriptors anew each call, ~60 aligned mallocs; its kernel runs
in 3-9 µs), against ~2-3 µs for MKL's float32 one, so small ops run faster in float32
(`bench/bf16_shapes.py`, docs/benchmarks.md). For an op of M rows over an [N, K] weight:
- from a float32 copy kept beside the bfloat16 weight while M N K <= `F32_MAX_WORK`. Only weights
  that take that path at one row (N K <= F32_MAX_WORK, 2 MiB in float32) get a copy (`f32_copy`):
  the attention projections, router and LM head of small models; never experts (a CPU without bf16
  instructions keeps the same copies, for every op on them, rather than widen them at each call);
- else widened per call while (M + `WIDEN_ROWS`) N K <= F32_MAX_WORK (widening the weight costs
  about as much as 4 rows of float32 work): experts with few rows;
- else in bfloat16; and experts padded into two batched calls where that beats two per expert
  (`pad_pays`).
oneDNN builds a kernel for each new GEMM shape (JIT code, 1-2 ms at one thread, against 50-100 µs
for the GEMM of a 400-token chunk) and keeps it in its primitive cache, so the bfloat16 calls get
their rows padded up to one of a few sizes (`bucket`): a prompt chunk of any length then reuses
one of ~8 kernels per doubling of its rows.
Fixed rules rather than a timing probe at load, so which path an op takes (and so its rounding)
does not depend on the machine's load. On an accelerator the op runs in its dtype; float32 is
never touched.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

LOW = (torch.bfloat16, torch.float16)
F32_MAX_WORK = 1 << 19  # multiply-adds up to which a low-precision op runs faster in float32 (bf16 CPU)
WIDEN_ROWS = 4  # widening a weight per call costs about this many rows of float32 work


@functools.cache
def cpu_has_bf16() -> bool:
    """The CPU's flags name bfloat16 dot products (AVX512-BF16 or AMX-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def low_on_cpu(t: torch.Tensor) -> bool:
    return t.dtype in LOW and t.device.type == "cpu"


def widen(t: torch.Tensor) -> bool:
    """True where every matmul on `t` computes in float32: low precision on a CPU without bf16."""
    return low_on_cpu(t) and not cpu_has_bf16()


def native_low(t: torch.Tensor) -> bool:
    """Low precision on a CPU with bf16 instructions: the per-shape rules of this module apply."""
    return low_on_cpu(t) and cpu_has_bf16()


def widen_op(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x [..., K] times weight ([N, K] or [K, N]): compute in float32, widening the weight for this call."""
    if widen(weight):
        return True
    rows = x.numel() // max(x.shape[-1], 1)
    return native_low(weight) and (rows + WIDEN_ROWS) * weight.numel() <= F32_MAX_WORK


def bucket(rows: int) -> int:
    """rows rounded up to one of 8 sizes per doubling (at most 12.5 % padding; exact up to 16)."""
    if rows <= 16:
        return rows
    step = max(8, (1 << (rows.bit_length() - 1)) // 8)
    return -(-rows // step) * step


def _bucketed(op, x: torch.Tensor, weight: torch.Tensor, *args) -> torch.Tensor:
    """op(x [..., K], weight, *args) -> [..., N]; for a low-precision weight on a CPU with bf16
    instructions (oneDNN's kernels) with x's rows padded up to `bucket` for the call."""
    flat = x.reshape(-1, x.shape[-1])
    n = flat.shape[0]
    if not native_low(weight) or bucket(n) == n:
        return op(x, weight, *args)
    out = op(F.pad(flat, (0, 0, 0, bucket(n) - n)), weight, *args)[:n]
    return out.view(*x.shape[:-1], out.shape[-1])


def f32_copy(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [out, in]: its float32 copy where ops on it run in float32 and it is small (low precision
    on a CPU, out * in <= F32_MAX_WORK): ops of a few rows on a CPU with bf16 instructions, every op
    on one without (which would otherwise widen the weight at each call), else None."""
    return weight.float() if low_on_cpu(weight) and weight.numel() <= F32_MAX_WORK else None


def pad_pays(rows: torch.Tensor, counts: list[int]) -> bool:
    """rows [P, H] in groups of `counts` rows (one per expert, zeros allowed): True where two batched
    matmuls over every group padded to the largest beat two per non-empty group: low precision on a
    CPU with bf16 instructions, at least 4 non-empty groups, padded rows at most 2 P + 64."""
    if not native_low(rows):
        return False
    return sum(1 for c in counts if c) >= 4 and len(counts) * max(counts) <= 2 * rows.shape[0] + 64


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, weight_f32: torch.Tensor | None = None
) -> torch.Tensor:
    """x [N, in] @ weight [out, in]^T (+ bias) -> [N, out] in x's dtype. `weight_f32` (from
    `f32_copy`) serves ops of at most F32_MAX_WORK multiply-adds."""
    if weight_f32 is not None and (widen(weight) or x.numel() * weight.shape[0] <= F32_MAX_WORK):
        weight = weight_f32  # the same float32 values widening would give, kept
    elif not widen_op(x, weight):
        return _bucketed(F.linear, x, weight, bias)
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def matmul(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """x [N, in] @ weight_t [in, out] -> [N, out] in x's dtype."""
    if not widen_op(x, weight_t):
        return _bucketed(torch.matmul, x, weight_t)
    return (x.float() @ weight_t.float()).to(x.dtype)
