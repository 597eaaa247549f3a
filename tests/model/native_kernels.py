"""For tests of raymoe's C kernels: skip where they cannot or may not be built."""

from __future__ import annotations

import pytest

from raymoe.model.native import build, decode


def need_kernel() -> None:
    """Skip without a C compiler or with RAYMOE_NATIVE=0; where a compiler is here, a failed build fails."""
    if build.compiler() is None:
        pytest.skip("no C compiler on this machine: raymoe's kernels cannot be built (torch's paths run)")
    if not build.enabled():
        pytest.skip(f"{build.ENV}=0 in the environment: raymoe's kernels are switched off")
    assert decode.available(), "a C compiler is here, yet the kernels did not build (see the log)"
