"""A stand-in accelerator for CPU-only CI: tensors that say they live on the `meta` device but
carry real values (a CPU tensor behind each), under `DeviceMode`.

Any op that meets such a tensor and a plain CPU tensor (more than a 0-dim scalar) raises
`WrongDevice`, as CUDA raises "Expected all tensors to be on the same device"; `.cpu()`,
`.tolist()` and `.item()` are host copies, as on CUDA; `.numpy()` refuses. So a model or engine run
under the mode with its weights on `meta` proves every tensor it creates follows the weights'
device, and its outputs can be compared with a plain CPU run (same arithmetic underneath)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

aten = torch.ops.aten
DEVICE = torch.device("meta")
MOVES = (aten.to, aten._to_copy, aten.copy_)  # the ops that legitimately cross devices
INDEXING = (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_)  # CUDA takes host indices


class WrongDevice(RuntimeError):
    """An op mixed tensors of the stand-in device and the host."""


class OnDevice(torch.Tensor):
    """Says `meta`; `inner` holds the values."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, device=DEVICE, requires_grad=False,
        )  # fmt: skip

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a stand-in device tensor outside DeviceMode")

    def tolist(self):  # a host copy, as on CUDA
        return self.inner.tolist()

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert a device tensor to numpy: copy it to the host first")

    def __repr__(self):
        return f"OnDevice({self.inner!r})"


def _target(func, args, kwargs) -> str | None:
    device = kwargs.get("device")
    if device is None and func is aten.to.device:
        device = args[1]
    return None if device is None else torch.device(device).type


def _unwrap(a):
    return a.inner if isinstance(a, OnDevice) else a


def _wrap(a):
    return OnDevice(a) if isinstance(a, torch.Tensor) and not isinstance(a, OnDevice) else a


class DeviceMode(TorchDispatchMode):
    """Runs every op on the values behind the stand-in tensors; see the module doc."""

    def __init__(self):
        super().__init__()
        self.ops = 0  # ops that touched the stand-in device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_device = any(isinstance(a, OnDevice) for a in tensors)
        target = _target(func, args, kwargs)
        checked = tensors
        if func.overloadpacket in INDEXING:  # x[host_index] works on CUDA: check all but the indices
            checked = [a for a in tree_leaves((args[:1], args[2:], kwargs)) if isinstance(a, torch.Tensor)]
        host = [tuple(a.shape) for a in checked if not isinstance(a, OnDevice) and a.dim() > 0]
        if on_device and host and func.overloadpacket not in MOVES:
            raise WrongDevice(f"{func}: device tensors meet host tensors of shapes {host}")
        if any(a.device.type == "meta" and not isinstance(a, OnDevice) for a in tensors):
            # made on the device by torch itself (e.g. a Python list used as an index): real meta
            # tensors hold no values; index with a tensor moved there explicitly instead
            raise WrongDevice(f"{func}: a tensor made on the device without values (a list index?)")
        if target is not None:  # compute on the host; the result is wrapped below when it is 'meta'
            if func is aten.to.device:
                args = (args[0], torch.device("cpu"), *args[2:])
            else:
                kwargs = {**kwargs, "device": torch.device("cpu")}
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func is aten._local_scalar_dense.default or target == "cpu" or not (on_device or target == "meta"):
            return out
        self.ops += 1
        if isinstance(out, torch.Tensor) and args and isinstance(args[0], OnDevice) and out is args[0].inner:
            return args[0]  # in place
        return tree_map(_wrap, out)
