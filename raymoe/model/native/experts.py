"""A layer's expert FFNs on rows sorted by expert in one C call (`experts.c`) when every group has
at most `SMALL` rows: a decode step's groups. There torch pays per op (an `mm` per group and
projection, plus the activation's ops: ~46 us for one token through the built-in model's 2 experts,
against ~14 us here, 1.3x at 32 tokens); larger groups stay with torch's GEMMs, which the kernel
does not beat (`bench/kernel_costs.py`). A row's result does not depend on the other rows of its
call: one expert run alone gives the bits it gives among the others."""

from __future__ import annotations

import ctypes

import torch

from raymoe.model.host import ints
from raymoe.model.native.build import bind

SMALL = 16  # groups of at most this many rows run here
_I, _P = ctypes.c_int64, ctypes.c_void_p
_ARGS = [_P, _I, _P, _I, _P, _P, _I, _I, _P, _P]
_NAMES = {torch.float32: "experts_f32", torch.bfloat16: "experts_bf16"}


def kernel_for(rows: torch.Tensor, gate_up_t: torch.Tensor, down_t: torch.Tensor):
    """The C function for these tensors, or None (not built, another dtype or device, a strided
    operand)."""
    if rows.dtype not in _NAMES or rows.device.type != "cpu" or not gate_up_t.dtype == down_t.dtype == rows.dtype:
        return None
    if not (rows.is_contiguous() and gate_up_t.is_contiguous() and down_t.is_contiguous()):
        return None
    return bind("experts", _NAMES[rows.dtype], _ARGS)


def run_small(fn, rows: torch.Tensor, counts: list[int], gate_up_t: torch.Tensor, down_t: torch.Tensor,
              out: torch.Tensor) -> None:
    """Write into out [P, H] the outputs of the groups of at most SMALL rows of rows [P, H] (contiguous
    groups, counts[e] rows for stacked expert e of gate_up_t [E, H, 2I], down_t [E, I, H]); fn from
    `kernel_for`. The rows of larger groups in out are left as they are (callers send none)."""
    hidden, inter = rows.shape[1], down_t.shape[1]
    scratch = torch.empty(SMALL * (2 * hidden + 3 * inter), dtype=torch.float32)
    counts_t = ints(counts)
    fn(rows.data_ptr(), hidden, counts_t.data_ptr(), len(counts), gate_up_t.data_ptr(), down_t.data_ptr(), inter,
       SMALL, out.data_ptr(), scratch.data_ptr())  # fmt: skip
