"""Lazy access to a Hugging Face checkpoint's tensors, one tensor at a time.

A process that holds only some experts calls `get()` for those names only; safetensors memory-maps
the files, so the bytes of every other tensor are never read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from raymoe.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """Tensor names -> lazily opened safetensors files of one model folder."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        """device: where `get` puts tensors (read on the host, then moved once)."""
        self.path, self.device = Path(path), torch.device(device)
        if not self.path.is_dir():
            raise CheckpointError(f"model folder {self.path} does not exist; pass a Hugging Face checkpoint folder")
        self._handles: dict[str, object] = {}
        self.name_to_file = self._index()

    def _index(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is corrupt ({e}); it needs a 'weight_map' object") from e
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise CheckpointError(f"{index} names shard files that are missing: {missing}")
            return dict(weight_map)
        single = self.path / SINGLE_FILE
        if not single.is_file():
            raise CheckpointError(
                f"no weights in {self.path}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards"
            )
        return {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}

    def _open(self, filename: str):
        if filename not in self._handles:
            try:
                self._handles[filename] = safe_open(str(self.path / filename), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{self.path / filename} is not a readable safetensors file ({e})") from e
        return self._handles[filename]

    def has(self, name: str) -> bool:
        return name in self.name_to_file

    def names(self) -> list[str]:
        return list(self.name_to_file)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor (optionally cast); a missing name is a CheckpointError."""
        if name not in self.name_to_file:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.path}")
        try:
            tensor = self._open(self.name_to_file[name]).get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"tensor {name!r} in {self.path} could not be read ({e})") from e
        return tensor.to(self.device, dtype) if dtype is not None else tensor.to(self.device)

    def get_optional(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        return self.get(name, dtype) if self.has(name) else None
