"""The LM head: raymoe's C linear for small hidden sizes (each row's bits its own, within float32
rounding of F.linear); else the packed path, F.linear's logits bit for bit at every row count."""

import torch
import torch.nn.functional as F

from raymoe.model.head import PACK_ROWS, HeadLinear
from raymoe.model.native import layer as native_layer
from tests.model.native_kernels import need_kernel

WIDE = native_layer.MAX_IN + 64  # a hidden size the C linear leaves to MKL


def test_head_equals_linear_at_every_row_count():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4096, WIDE, generator=gen) * 0.05  # [V, H]: 5 MiB, packed where MKL is
    head = HeadLinear(weight)
    assert head.weight_strips is None
    for n in range(1, PACK_ROWS + 3):
        x = torch.randn(n, WIDE, generator=gen)
        assert torch.equal(head(x), F.linear(x, weight)), f"{n} rows"


def test_small_head_runs_the_c_linear():
    need_kernel()
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(1024, 128, generator=gen) * 0.05
    head, x = HeadLinear(weight), torch.randn(32, 128, generator=gen)
    assert head.weight_strips is not None and head.packed is None
    got = head(x)
    torch.testing.assert_close(got, F.linear(x, weight), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(head(x[i : i + 1].clone())[0], got[i]) for i in (0, 9, 31))


def test_other_dtypes_are_not_packed():
    head = HeadLinear(torch.randn(128, 16).bfloat16())
    assert head.packed is None and not head.exact_rows
    x = torch.randn(8, 16).bfloat16()  # few multiply-adds: computed in float32 (raymoe.model.matmul)
    assert torch.equal(head(x), F.linear(x.float(), head.weight.float()).bfloat16())
