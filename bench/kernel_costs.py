"""Costs of single kernels at the built-in model's shapes, 1 thread (issue 15; docs/benchmarks.md).

    python bench/kernel_costs.py [--sections decode_attention,experts] [--out bench/out/kernel_costs.json]

Each figure against its baseline in the same run:
- `new_shape`: a bfloat16 and a float32 `[M, 128] x [128, 392]` over 160 row counts M never seen
  before, then the same row counts again (oneDNN builds a kernel per new bf16 shape; MKL does not),
  and bf16 with the rows padded by `raymoe.model.matmul.bucket` (`x 384`, no kernel built yet);
- `experts_bmm`: the padded experts' bf16 `bmm` (8 x `[cap, 128] x [128, 384]`) against the same
  work as one `mm` over one weight (the bmm re-lays out its 8 weights each call);
- `f32_gemm`: float32 `[407, 128] x [128, 384]`, GFLOP/s;
- `sdpa_causal`: causal SDPA over a 200-token prompt (4 query heads, 2 kv heads of 32), GMAC/s;
- `decode_attention`: one layer's attention for 32 decodes with contexts of 50-450 tokens in random
  blocks of a pool, raymoe's C kernel (`raymoe.model.native.decode`) against torch's SDPA over
  gathered groups (the same plan with the kernel off), float32 and bfloat16;
- `prompt_attention`: one layer's attention for a prompt chunk of q new tokens at the end of a ctx
  long context, its rows in raymoe's C kernel up to `ragged.PREFILL_KERNEL_BYTES` against torch's
  SDPA for every row (the same plan with the kernel off), float32;
- `experts`: one layer's `ExpertStore.run_groups` for T tokens routed top-2 of 8 experts, with
  raymoe's C kernel for small groups (`raymoe.model.native.experts`) against torch's matmuls, at
  the built-in model's widths (128 / 192; float32 and bfloat16) and wider ones (256 / 512).
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


def new_shape(torch) -> dict:
    from raymoe.model.matmul import bucket

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


def decode_attention(torch) -> dict:
    import random

    from raymoe.model import paged, ragged

    rnd, out = random.Random(0), {}
    ctxs = [rnd.randint(50, 450) for _ in range(32)]
    order = list(range(sum(-(-c // 16) for c in ctxs)))
    rnd.shuffle(order)
    tables, at = [], 0
    for c in ctxs:
        tables.append(order[at : at + -(-c // 16)])
        at += len(tables[-1])
    batch = paged.AttentionBatch.build([1] * 32, ctxs, tables, 16)
    for dtype in ("float32", "bfloat16"):
        dt = getattr(torch, dtype)
        cache = tuple(torch.randn(len(order), 16, 2, 32).to(dt) for _ in range(2))
        qk, v = torch.randn(32, 6, 32).to(dt), torch.randn(32, 2, 32).to(dt)
        q, k = qk[:, :4], qk[:, 4:]
        plan = ragged.build_plan(batch.query_lens, batch.context_lens, batch.block_tables, 16)
        if plan.native is None:
            return {"skipped": "raymoe's kernel is not built here (no C compiler, or RAYMOE_NATIVE=0)"}
        kernel = median_us(lambda: ragged.attend_ragged(q, k, v, cache, plan, 0.18), repeats=50)
        plan.native = None
        sdpa = median_us(lambda: ragged.attend_ragged(q, k, v, cache, plan, 0.18), repeats=50)
        out[dtype] = {"kernel_us": round(kernel), "torch_sdpa_us": round(sdpa), "speedup": round(sdpa / kernel, 2)}
    return out


def prompt_attention(torch) -> dict:
    from raymoe.model import paged, ragged

    out = {}
    for q_len, ctx in ((128, 128), (500, 500), (512, 1024), (512, 2048)):
        blocks = -(-ctx // 16)
        batch = paged.AttentionBatch.build([q_len], [ctx], [list(range(blocks))], 16)
        cache = tuple(torch.randn(blocks, 16, 2, 32) for _ in range(2))
        qk, v = torch.randn(q_len, 6, 32), torch.randn(q_len, 2, 32)
        q, k = qk[:, :4], qk[:, 4:]
        plan = ragged.build_plan(batch.query_lens, batch.context_lens, batch.block_tables, 16)
        if not plan.prefill_kernel:
            return {"skipped": "raymoe's kernel is not built here (no C compiler, or RAYMOE_NATIVE=0)"}
        kernel = median_us(lambda: ragged.attend_ragged(q, k, v, cache, plan, 0.18), repeats=20)
        rows_in_kernel = plan.prefill_rows(ragged.PREFILL_KERNEL_BYTES // (2 * 64 * 4))[1][0]
        plan.prefill_kernel = False
        sdpa = median_us(lambda: ragged.attend_ragged(q, k, v, cache, plan, 0.18), repeats=20)
        out[f"q{q_len}_ctx{ctx}"] = {"kernel_us": round(kernel), "torch_sdpa_us": round(sdpa),
                                     "speedup": round(sdpa / kernel, 2), "rows_in_kernel": rows_in_kernel}  # fmt: skip
    return out


def experts(torch) -> dict:
    from raymoe.model import experts as ex
    from raymoe.model.layers import SwiGLU
    from raymoe.model.native import experts as native

    out, found = {}, native.kernel_for
    for hidden, inter, dtype in ((128, 192, "float32"), (128, 192, "bfloat16"), (256, 512, "float32")):
        dt = getattr(torch, dtype)
        held = ex.LayerExperts.stack({e: SwiGLU((torch.randn(2 * inter, hidden) * 0.05).to(dt),
                                                (torch.randn(hidden, inter) * 0.05).to(dt)) for e in range(8)})  # fmt: skip
        store = ex.ExpertStore({0: held})
        for tokens in (1, 4, 32, 64, 128, 512):
            ids = torch.stack([torch.randperm(8)[:2] for _ in range(tokens)])
            groups = ex.group_tokens(ids, torch.full((tokens, 2), 0.5), 8)
            rows = torch.randn(tokens, hidden).to(dt)[groups.token_of_row]
            if found(rows, held.gate_up_t, held.down_t) is None:
                return {"skipped": "raymoe's kernel is not built here (no C compiler, or RAYMOE_NATIVE=0)"}
            kernel = median_us(lambda: store.run_groups(0, rows, groups), repeats=50)
            native.kernel_for = lambda *a: None
            try:
                torch_us = median_us(lambda: store.run_groups(0, rows, groups), repeats=50)
            finally:
                native.kernel_for = found
            out[f"{dtype}_h{hidden}_i{inter}_t{tokens}"] = {
                "largest_group": max(groups.counts), "kernel_us": round(kernel), "torch_us": round(torch_us),
                "speedup": round(torch_us / kernel, 2)}  # fmt: skip
    return out


SECTIONS = {"new_shape": new_shape, "experts_bmm": experts_bmm, "f32_gemm": f32_gemm, "sdpa_causal": sdpa_causal,
            "prompt_attention": prompt_attention,
            "decode_attention": decode_attention, "experts": experts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, of: " + ", ".join(SECTIONS))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    report = {name: SECTIONS[name](torch) for name in args.sections.split(",")}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
