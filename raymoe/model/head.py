"""The LM head (`[N, H] -> [N, V]` logits): raymoe's C linear for small float32 heads (hidden size
at most `native.layer.MAX_IN`; each row's bits its own, and faster than MKL's packed sgemm at the
built-in model's decode batches); else the weight pre-packed for MKL where that is exact.

On this kind of CPU MKL's plain sgemm slows down sharply once the weight leaves L2 (the 4 MiB head
of the built-in model: 9 ms at N = 32 against 2 ms from a packed copy). `torch.ops.mkl._mkl_linear`
over a weight packed once for `PACK_ROWS` rows runs the same kernel as `F.linear` from a layout
that streams; rows are padded to `PACK_ROWS`. For most row counts the results equal `F.linear`'s bit
for bit, but not all (few rows take a matrix-vector path with another summation order, and which
counts do depends on the shape): `HeadLinear` finds the exact row counts once at load and uses
`F.linear` for the others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raymoe.model.matmul import f32_copy, linear
from raymoe.model.native import layer as native_layer

PACK_ROWS = 32  # rows the packed weight is laid out for (the default decode batch)
MAX_PACKED_BYTES = 16 << 20  # the packed copy doubles the head's memory (and the check costs): small heads


class HeadLinear:
    """y = x W^T, W: [V, H]. In C (a packed copy) when float32 on CPU with a small hidden size;
    else packed for MKL when float32 on CPU, small, and bitwise exact."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.weight_strips = native_layer.pack(weight)
        self.packed, self.exact_rows = _pack(weight) if self.weight_strips is None else (None, frozenset())
        self.weight_f32 = f32_copy(weight)  # small bfloat16 heads: a few rows run in float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, H] -> [N, V]."""
        if self.weight_strips is not None and x.dtype == torch.float32:
            return native_layer.linear(x, self.weight_strips, None)
        n = x.shape[0]
        if n not in self.exact_rows:
            return linear(x, self.weight, weight_f32=self.weight_f32)
        padded = torch.cat([x, x.new_zeros(PACK_ROWS - n, x.shape[1])]) if n < PACK_ROWS else x
        return torch.ops.mkl._mkl_linear(padded, self.packed, self.weight, None, PACK_ROWS)[:n]


def _pack(weight: torch.Tensor) -> tuple[torch.Tensor | None, frozenset[int]]:
    """(packed weight, row counts 1..PACK_ROWS where it gives F.linear's results), or (None, {})."""
    none = None, frozenset()
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.nbytes > MAX_PACKED_BYTES:
        return none
    if not torch.backends.mkl.is_available() or not hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"):
        return none
    weight = weight.contiguous()
    try:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, PACK_ROWS)
        x = torch.randn(PACK_ROWS, weight.shape[1], generator=torch.Generator().manual_seed(0))
        got = torch.ops.mkl._mkl_linear(x, packed, weight, None, PACK_ROWS)  # rows are independent
    except (RuntimeError, NotImplementedError):
        return none
    exact = frozenset(n for n in range(1, PACK_ROWS + 1) if torch.equal(got[:n], F.linear(x[:n], weight)))
    return (packed, exact) if exact else none
