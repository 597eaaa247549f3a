"""Rotary.apply (half-split layout) gives the reference formula's bits, x * cos + rotate_half(x) * sin,
on contiguous and strided inputs, with the signed sin reused across calls and rebuilt for a new one."""

import torch

from raymoe.model.rope import Rotary


def test_apply_equals_rotate_half_formula_bit_for_bit():
    rotary, gen = Rotary(32, 10000.0, {}, 512), torch.Generator().manual_seed(0)
    for step in range(3):  # a new table each step, like the engine's
        positions = torch.randint(0, 500, (37,), generator=gen)
        cos, sin = rotary.cos_sin(positions, torch.float32)
        for x in (torch.randn(37, 6, 32, generator=gen), torch.randn(37, 8, 32, generator=gen)[:, :6]):
            x1, x2 = x[..., :16], x[..., 16:]
            want = x * cos + torch.cat((-x2, x1), dim=-1) * sin
            assert torch.equal(rotary.apply(x, cos, sin), want)
