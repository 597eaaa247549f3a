"""Costs of single kernels at the built-in model's shapes, 1 thread (issue 15; docs/benchmarks.md).

    python bench/kernel_costs.py [--out bench/out/kernel_costs.json]

Each figure against its baseline in the same run:
- `new_shape`: a bfloat16 and a float32 `[M, 128] x [128, 392]` over 160 row counts M never seen
  before, then the same row counts again (oneDNN builds a kernel per new bf16 shape; MKL does not),
  and bf16 with the rows padded by `raymoe.model.matmul.bucket` (`x 384`, no kernel built yet);
- `experts_bmm`: the padded experts' bf16 `bmm` (8 x `[cap, 128] x [128, 384]`) against the same
  work as one `mm` over one weight (the bmm re-lays out its 8 weights each call);
- `f32_gemm`: float32 `[407, 128] x [128, 384]`, GFLOP/s;
- `sdpa_causal`: causal SDPA over a 200-token prompt (4 query heads, 2 kv heads of 32), GMAC/s.
Median µs per call of several passes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def per_call_us(fn, calls) -> float:
    """Mean µs of fn(arg) over `calls` (a list of arguments), one pass."""
    start = time.perf_counter()
    for arg in calls:
        fn(arg)
    return (time.perf_counter() - start) / len(calls) * 1e6


def median_us(fn, repeats: int = 200, passes: int = 5) -> float:
    fn()
    return statistics.median(per_call_us(lambda _: fn(), [None] * repeats) for _ in range(passes))


def new_shape(torch, bucket) -> dict:
    """Per call over rows 300..459: as they come, again, and (bfloat16, over a weight of other width
    so no kernel of the first pass serves) padded to buckets."""
    pad, out = torch.nn.functional.pad, {}
    for dtype in ("bfloat16", "float32"):
        dt = getattr(torch, dtype)
        w = torch.randn(128, 392).to(dt)
        xs = [torch.randn(m, 128).to(dt) for m in range(300, 460)]
        out[dtype] = {"new_rows_us": round(per_call_us(lambda x: x @ w, xs)),
                      "same_rows_again_us": round(per_call_us(lambda x: x @ w, xs))}  # fmt: skip
    w = torch.randn(128, 384).bfloat16()
    xs = [torch.randn(m, 128).bfloat16() for m in range(300, 460)]
    padded = lambda x: pad(x, (0, 0, 0, bucket(len(x)) - len(x))) @ w  # noqa: E731
    out["bfloat16"]["bucketed_new_rows_us"] = round(per_call_us(padded, xs))
    return out


def experts_bmm(torch) -> dict:
    x, e = torch.randn(8, 224, 128).bfloat16(), torch.randn(8, 128, 384).bfloat16()
    flat = x.view(-1, 128)
    return {"bmm_8x224_us": round(median_us(lambda: torch.bmm(x, e))),
            "one_mm_1792_rows_us": round(median_us(lambda: flat @ e[0]))}  # fmt: skip


def f32_gemm(torch) -> dict:
    x, w = torch.randn(407, 128), torch.randn(128, 384)
    us = median_us(lambda: x @ w)
    return {"us": round(us), "gflops": round(2 * 407 * 128 * 384 / us / 1e3, 1)}


def sdpa_causal(torch) -> dict:
    F = torch.nn.functional
    q, k, v = torch.randn(1, 4, 200, 32), torch.randn(1, 2, 200, 32), torch.randn(1, 2, 200, 32)
    us = median_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), repeats=50)
    macs = 4 * 200 * 201 / 2 * 32 * 2  # heads x causal pairs x head dim x (QK and PV)
    return {"us": round(us), "gmacs": round(macs / us / 1e3, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    from raymoe.model.matmul import bucket

    torch.set_num_threads(1)
    report = {"new_shape": new_shape(torch, bucket), "experts_bmm": experts_bmm(torch),
              "f32_gemm": f32_gemm(torch), "sdpa_causal": sdpa_causal(torch)}  # fmt: skip
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
