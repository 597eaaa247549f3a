"""Whether `torch._grouped_mm` can run a layer's experts: every group in one call.

On CPU, `torch._grouped_mm(rows [P, K], weights [G, K, N], offs [G] int32)` runs one `mm` per group
of contiguous rows, so its outputs equal a per-expert loop's bit for bit in float32 (checked once
per dtype here, and in tests/model/test_grouped.py). Older torch builds lack it, some dtypes need
16-byte aligned strides, and on accelerators it is a different kernel with its own rules: those
take the fallback in `raymoe.model.experts`.
"""

from __future__ import annotations

import torch

from raymoe.model.matmul import widen

_EXACT: dict[torch.dtype, bool] = {}  # dtype -> the probe's verdict


def can_group(rows: torch.Tensor, *weights: torch.Tensor) -> bool:
    """rows [P, H] and stacked weights [G, K, N] (all on one device): True where the grouped
    call runs and gives the per-group matmuls' exact results (and low precision has CPU support)."""
    if rows.device.type != "cpu" or not hasattr(torch, "_grouped_mm") or widen(rows):
        return False
    if any(w.stride(-1) != 1 or not _aligned(w) for w in weights) or not _aligned(rows):
        return False
    if rows.dtype not in _EXACT:
        _EXACT[rows.dtype] = _probe(rows.dtype)
    return _EXACT[rows.dtype]


def _aligned(t: torch.Tensor) -> bool:
    """Every stride but the last a multiple of 16 bytes (what the grouped kernel asks of bf16/fp16)."""
    return all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])


def _probe(dtype: torch.dtype) -> bool:
    """Run a small grouped matmul (with an empty group) against a per-group loop."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(11, 16, generator=gen).to(dtype)  # [P, K]
    weights = torch.randn(3, 16, 32, generator=gen).to(dtype)  # [G, K, N], group 1 gets no rows
    try:
        got = torch._grouped_mm(rows, weights, offs=torch.tensor([4, 4, 11], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    want = torch.cat([rows[:4] @ weights[0], rows[4:] @ weights[2]])
    return torch.equal(got, want)
