"""Host-side helpers of a step: index tensors from Python lists of ints, and inference mode.

`torch.tensor(list)` converts element by element; through numpy it is about 4x faster (a [32, 7]
block table: 7.5 against 30 us; 512 token ids: 13 against 57 us), and an engine step makes a dozen.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def ints(values, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A list of ints (or of equal-length lists) -> a CPU tensor of `dtype` (int64 or int32)."""
    return torch.from_numpy(np.array(values, dtype=np.int32 if dtype == torch.int32 else np.int64))


def inference(fn):
    """`torch.inference_mode()` around fn, entered only where it is not on already: a step's nested
    calls (forward, logits, sampling inside the runner's step) skip entering it again."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode():
            return fn(*args, **kwargs)

    return run
