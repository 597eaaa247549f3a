"""Decode attention from the paged KV pool in one C call for every decode of a step
(`decode_attention.c`): no gathered copy of the contexts, no SDPA call per group of them.

Each decode is computed alone, so its result is the same whatever else the step holds; it differs
from torch's SDPA by float32 rounding only (tests/model/test_native.py).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from raymoe.model.native.build import bind, library

_I, _P = ctypes.c_int64, ctypes.c_void_p
_ARGS = [_P, _I, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _I, ctypes.c_float, _I, _P, _I, _P]
_NAMES = {torch.float32: "decode_attention_f32", torch.bfloat16: "decode_attention_bf16"}


@dataclass
class Decodes:
    """The step's decodes (one new token each), as the kernel reads them."""

    rows: torch.Tensor  # [n] int64: each decode's row among the step's T tokens
    ctx_lens: torch.Tensor  # [n] int64: keys it sees, its own included
    tables: torch.Tensor  # [n, max_blocks] int64, contiguous: its context blocks
    scratch: dict  # dtype -> float32 score buffer, reused by every layer of the step


def kernel(dtype: torch.dtype):
    """The C function for pools of `dtype`, or None (no kernel built, or a dtype it lacks)."""
    return bind("decode_attention", _NAMES[dtype], _ARGS) if dtype in _NAMES else None


def attend(q: torch.Tensor, cache, decodes: Decodes, out: torch.Tensor, scale: float, window: int | None) -> bool:
    """Write the decodes' attention into out [T, heads, dv] from q [T, heads, d] (rows of head-contiguous
    vectors) over the (k_cache [blocks, block_size, kv_heads, d], v_cache [..., dv]) pools; False where
    the kernel does not take these tensors (nothing written: the caller's path runs)."""
    k_cache, v_cache = cache
    fn = kernel(k_cache.dtype)
    same = q.dtype == k_cache.dtype == v_cache.dtype == out.dtype
    if fn is None or not same or q.device.type != "cpu" or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return False
    heads, d = q.shape[1], q.shape[2]
    if q.stride(2) != 1 or q.stride(1) != d or not out.is_contiguous():
        return False
    kv_heads, block_size, max_ctx = k_cache.shape[2], k_cache.shape[1], decodes.tables.shape[1] * k_cache.shape[1]
    group = heads // kv_heads
    scratch = decodes.scratch.get(q.dtype)
    if scratch is None or scratch.numel() < (group + 3) * max_ctx:  # scores, and an int64 slot per position
        scratch = decodes.scratch[q.dtype] = torch.empty((group + 3) * max_ctx, dtype=torch.float32)
    rc = fn(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), decodes.tables.data_ptr(),
        decodes.tables.shape[1], decodes.ctx_lens.data_ptr(), decodes.rows.data_ptr(), decodes.rows.shape[0],
        group, kv_heads, d, v_cache.shape[3], block_size, scale, window or 0, out.data_ptr(), out.stride(0),
        scratch.data_ptr(),
    )
    return rc == 0


def available() -> bool:
    """Whether the kernel is built (and not switched off): a plan then lays its decodes out for it."""
    return library("decode_attention") is not None
