"""The LM head's packed path gives F.linear's logits bit for bit, at every row count."""

import torch
import torch.nn.functional as F

from raymoe.model.head import PACK_ROWS, HeadLinear


def test_head_equals_linear_at_every_row_count():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4096, 64, generator=gen) * 0.05  # [V, H]: 1 MiB, packed where MKL is
    head = HeadLinear(weight)
    for n in range(1, PACK_ROWS + 3):
        x = torch.randn(n, 64, generator=gen)
        assert torch.equal(head(x), F.linear(x, weight)), f"{n} rows"


def test_other_dtypes_are_not_packed():
    head = HeadLinear(torch.randn(128, 16).bfloat16())
    assert head.packed is None and not head.exact_rows
    x = torch.randn(8, 16).bfloat16()  # few multiply-adds: computed in float32 (raymoe.model.matmul)
    assert torch.equal(head(x), F.linear(x.float(), head.weight.float()).bfloat16())
