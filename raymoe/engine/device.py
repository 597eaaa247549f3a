"""Which device a process computes on, and the dtype that goes with it.

`auto` means CUDA when this torch build sees a GPU, else the CPU; a dtype of `auto` means bfloat16
on CUDA and float32 on the CPU (float32 is the exactness reference everywhere; ask for it on CUDA
to compare with transformers)."""

from __future__ import annotations

import torch

from raymoe.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")  # "cuda:N" is accepted too


def check_device_name(name) -> str:
    """The name if it is a device raymoe knows (whether this process can use it or not)."""
    if isinstance(name, str) and (name in DEVICE_CHOICES or (name.startswith("cuda:") and name[5:].isdigit())):
        return name
    raise ConfigError(f"device must be one of {list(DEVICE_CHOICES)} (or cuda:N), got {name!r}")


def resolve_device(name: str) -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a concrete device string for this process; ConfigError
    when it cannot be used here (called where the weights load: a worker, not the driver)."""
    check_device_name(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: this torch build sees no CUDA GPU; use device 'cpu' or 'auto'")
    index = int(name[5:]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA devices are visible")
    return name


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 on CUDA, float32 on the CPU; other names pass through."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"
