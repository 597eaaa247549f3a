"""Routed experts in their compute layout, in one file per node that every expert holder maps.

A worker that co-hosts the experts placed on its node and an expert shard on that node hold the
same experts; neither keeps a private copy. One file per (checkpoint, dtype, MoE layer) in the
node's expert cache directory (`$RAYMOE_EXPERT_CACHE`, default `<tmp>/raymoe-experts`) holds the
layer's experts stacked as `LayerExperts` computes with them; every process maps it shared
(`mmap`), so the weights sit once in the node's page cache however many processes hold them.

Layout: E flag bytes (padded to a page: expert e is filled), gate_up_t [E, H, 2I], down_t [E, I, H].
The file is sparse: only the experts someone on the node holds are ever written. A holder fills
the experts it loads under an exclusive `flock` (so two processes never write one expert at the
same time, and nobody reads an expert before it is whole), then uses views into the mapping.
The key of a file names the checkpoint's path, file sizes and times, and the dtype: a changed
checkpoint gets new files. The directory is a cache: delete it to reclaim the disk.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from raymoe.model.layers import SwiGLU

CACHE_ENV = "RAYMOE_EXPERT_CACHE"
PAGE = mmap.PAGESIZE


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "raymoe-experts")


def checkpoint_key(model_path: str | Path, dtype: torch.dtype) -> str:
    """Names one checkpoint's expert files: its folder, its files' sizes and times, the dtype."""
    folder = Path(model_path).resolve()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors"))
    return hashlib.sha256(repr((str(folder), files, str(dtype))).encode()).hexdigest()[:24]


class LayerFile:
    """One MoE layer's experts, mapped shared. gate_up_t: [E, H, 2I], down_t: [E, I, H] (views)."""

    def __init__(self, path: Path, num_experts: int, hidden: int, inter: int, dtype: torch.dtype):
        itemsize = torch.empty(0, dtype=dtype).element_size()
        header = -(-num_experts // PAGE) * PAGE
        gate_up_bytes = num_experts * hidden * 2 * inter * itemsize
        size = header + gate_up_bytes + num_experts * inter * hidden * itemsize
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        with self._locked():
            if os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, size)  # sparse: pages appear as experts are written
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        raw = torch.frombuffer(self.map, dtype=torch.uint8)
        self.flags = raw[:num_experts]
        self.gate_up_t = raw[header : header + gate_up_bytes].view(dtype).view(num_experts, hidden, 2 * inter)
        self.down_t = raw[header + gate_up_bytes :].view(dtype).view(num_experts, inter, hidden)

    def fill(self, experts: Iterable[int], read: Callable[[int], SwiGLU]) -> None:
        """Write the experts not in the file yet; read(e) -> its weights (gate_up [2I, H], down [H, I])."""
        with self._locked():
            for e in experts:
                if not self.flags[e]:
                    w = read(e)
                    self.gate_up_t[e].copy_(w.gate_up.t())
                    self.down_t[e].copy_(w.down.t())
                    self.flags[e] = 1

    def _locked(self):
        return _Flock(self.fd)


class _Flock:
    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)


def open_layer_file(model_path, layer: int, num_experts: int, hidden: int, inter: int, dtype) -> LayerFile:
    path = cache_dir() / f"{checkpoint_key(model_path, dtype)}-layer{layer}.bin"
    return LayerFile(path, num_experts, hidden, inter, dtype)
