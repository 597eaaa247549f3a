"""A layer's expert FFNs on rows sorted by expert in one C call (`experts.c`).

Torch pays per op there (an `mm` per group and projection, plus the activation's ops); the kernel
runs the whole layer at once, at or above MKL's float32 rate from 1 row to hundreds per expert
where the weights stay in cache (`bench/kernel_costs.py`). `takes` says where it is used. A row's
result does not depend on the other rows of the call: one expert run alone gives the bits it gives
among the others, in a decode step or in a prompt.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from raymoe.model.host import ints
from raymoe.model.native.build import bind

SMALL = 16  # groups of at most this many rows run here whatever the widths (decode steps)
PANEL_BYTES = 128 * 1024  # larger groups too while a panel of weights (in x 128 float32) is this small
CHUNK = 64  # rows a group runs at a time (the kernel's scratch)
_I, _P = ctypes.c_int64, ctypes.c_void_p
_ARGS = [_P, _I, _P, _I, _P, _P, _I, _I, _P, _P]
_NAMES = {torch.float32: "experts_f32", torch.bfloat16: "experts_bf16"}
_STRIPS_MAX = 256  # widths up to which float32 experts keep a copy packed by strips (as `native.layer.pack`)


def pack(gate_up_t: torch.Tensor, down_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stacked float32 experts gate_up_t [E, H, 2I], down_t [E, I, H] -> copies of the same shapes
    whose memory holds each expert's matrix packed by strips (`gemm.h`: for each `strip_columns()`
    columns, their [K, width] block row-major), for the `strips` kernels only. None where the kernels
    are not built, another dtype or device, or widths over _STRIPS_MAX (the copy doubles the
    experts' memory: kept for small experts, where the kernel's time is the step's)."""
    if gate_up_t.dtype != torch.float32 or not gate_up_t.is_cpu or down_t.dtype != torch.float32:
        return None
    width = strip_columns()
    if max(gate_up_t.shape[1], down_t.shape[1]) > _STRIPS_MAX or width is None:
        return None

    def strips(w: torch.Tensor) -> torch.Tensor:  # [E, K, N] -> [E, K, N] packed by strips of N
        return torch.cat([part.reshape(w.shape[0], -1) for part in w.contiguous().split(width, dim=2)], dim=1).view(w.shape)

    return strips(gate_up_t), strips(down_t)


@functools.cache
def strip_columns() -> int | None:
    """Output columns of a strip of a packed weight (a register tile's width in `gemm.h`: 16 with
    AVX2, 64 with AVX-512), or None where the kernels are not built."""
    fn = bind("experts", "strip_columns", [], restype=ctypes.c_int64)
    return None if fn is None else int(fn())


def kernel_for(rows: torch.Tensor, gate_up_t: torch.Tensor, down_t: torch.Tensor, strips: bool = False):
    """The C function for these tensors (strips: they are `pack`'s), or None (not built, another
    dtype or device, a strided operand)."""
    if rows.dtype not in _NAMES or rows.device.type != "cpu" or not gate_up_t.dtype == down_t.dtype == rows.dtype:
        return None
    if not (rows.is_contiguous() and gate_up_t.is_contiguous() and down_t.is_contiguous()):
        return None
    return bind("experts", _NAMES[rows.dtype] + ("_strips" if strips else ""), _ARGS)


def takes(largest: int, hidden: int, inter: int) -> bool:
    """Whether the kernel runs a layer whose largest group has `largest` rows: always for decode-sized
    groups; for larger ones while the widest weight panel (K rows x 128 columns, float32) is small
    enough that the kernel beats torch's GEMMs: 1.8-2.3x at the built-in model's 128 / 192 from 32
    to 512 tokens, 0.7-0.9x at 256 / 512 (`bench/kernel_costs.py`; it does not block over K as
    MKL does)."""
    return largest <= SMALL or max(hidden, inter) * 128 * 4 <= PANEL_BYTES


def run(fn, rows: torch.Tensor, counts: list[int], gate_up_t: torch.Tensor, down_t: torch.Tensor,
        out: torch.Tensor) -> None:
    """Write into out [P, H] the expert outputs of rows [P, H] (contiguous groups, counts[e] rows for
    stacked expert e of gate_up_t [E, H, 2I], down_t [E, I, H]); fn from `kernel_for`."""
    hidden, inter = rows.shape[1], down_t.shape[1]
    scratch = torch.empty(CHUNK * (2 * hidden + 3 * inter), dtype=torch.float32)
    counts_t = ints(counts)
    fn(rows.data_ptr(), hidden, counts_t.data_ptr(), len(counts), gate_up_t.data_ptr(), down_t.data_ptr(), inter,
       CHUNK, out.data_ptr(), scratch.data_ptr())  # fmt: skip


_MOE_NAMES = {torch.float32: "moe_f32", torch.bfloat16: "moe_bf16"}
_MOE_ARGS = [_P, _I, _I, _P, _P, _I, _I, _P, _P, _I, _I, _P, _P, _P]


def run_layer(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up_t: torch.Tensor,
              down_t: torch.Tensor, strips: bool = False) -> torch.Tensor | None:
    """A layer's routed experts from the router's choice in one call: x [T, H], topk_ids / topk_weights
    [T, K] over the E stacked experts of gate_up_t [E, H, 2I], down_t [E, I, H] -> [T, H], with the
    bits of `group_tokens` + `ExpertStore.run_groups` + `combine` on this kernel (its grouping and
    combine's order of operations). strips: the weights are `pack`'s. None where it does not take
    them (see `kernel_for`, `takes`, with every group counted as large as T)."""
    tokens, hidden = x.shape
    if kernel_for(x, gate_up_t, down_t, strips) is None or not takes(tokens, hidden, down_t.shape[1]):
        return None
    fn = bind("experts", _MOE_NAMES[x.dtype] + ("_strips" if strips else ""), _MOE_ARGS)
    ids = topk_ids.contiguous()
    weights = topk_weights.to(x.dtype).contiguous()  # as combine casts them
    experts, top_k, inter = gate_up_t.shape[0], ids.shape[1], down_t.shape[1]
    out = torch.empty_like(x)
    scratch = torch.empty(CHUNK * (2 * hidden + 3 * inter), dtype=torch.float32)
    order = torch.empty(experts + 1 + tokens * top_k, dtype=torch.long)
    rc = fn(x.data_ptr(), tokens, hidden, ids.data_ptr(), weights.data_ptr(), top_k, experts, gate_up_t.data_ptr(),
            down_t.data_ptr(), inter, CHUNK, out.data_ptr(), scratch.data_ptr(), order.data_ptr())  # fmt: skip
    return out if rc == 0 else None
