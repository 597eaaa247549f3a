"""Per-shape cost of every matmul of a bfloat16 engine step on this CPU, one path per column.

    python bench/bf16_shapes.py [--rows 1,8,32,64,128,512] [--out bench/out/bf16_shapes.json]

One thread, median of `--iters` calls (µs), the built-in model's shapes (hidden 128, fused qkv
256, o_proj 128, router 8, head 1024; 8 experts, top-2, gate_up 384, down 192). Dense paths: bf16
`F.linear`; oneDNN with the weight prepacked once (`torch.ops.mkldnn._linear_pointwise`); the bf16
weight widened to float32 per call; a float32 copy of the weight kept beside it. Expert paths, per
step of M tokens (2M rows over 8 experts, routed at random): `torch._grouped_mm` in bf16 (one oneDNN
call per expert); two padded `bmm`s in bf16; a per-expert loop of prepacked oneDNN linears; the
per-expert chain with each matmul on its per-shape path (float32 widened while rows are few); grouped
float32 over float32 copies. "policy" / the key's "policy": what raymoe runs for that shape
(`raymoe.model.matmul`). Prints one JSON object; every path's error against float32 beside its time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from raymoe.model.experts import ExpertStore, LayerExperts, TokenGroups
from raymoe.model.layers import Linear
from raymoe.model.matmul import pad_pays

DENSE = {"qkv": (128, 256), "o_proj": (128, 128), "router": (128, 8), "head": (128, 1024)}
EXPERTS, TOP_K, HIDDEN, INTER = 8, 2, 128, 192


def median_us(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w)


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def dense_paths(w: torch.Tensor) -> dict:
    """w [N, K] bf16 -> name -> fn(x [M, K] bf16) -> [M, N] bf16."""
    packed, w32 = pack(w), w.float()
    return {
        "bf16": lambda x: F.linear(x, w),
        "prepacked": lambda x: packed_linear(x, packed),
        "widen": lambda x: F.linear(x.float(), w.float()).to(x.dtype),
        "f32_copy": lambda x: F.linear(x.float(), w32).to(x.dtype),
    }


def expert_paths(gate_up_t: torch.Tensor, down_t: torch.Tensor) -> dict:
    """gate_up_t [G, H, 2I], down_t [G, I, H] bf16 -> name -> fn(rows [P, H], counts) -> [P, H]."""
    held = LayerExperts(list(range(gate_up_t.shape[0])), gate_up_t, down_t)
    held32 = LayerExperts(held.expert_ids, gate_up_t.float(), down_t.float())
    gu_p = [pack(w.t().contiguous()) for w in gate_up_t]
    d_p = [pack(w.t().contiguous()) for w in down_t]

    def loop(rows, counts):
        out, start = torch.empty_like(rows), 0
        for j, n in enumerate(counts):
            if n:
                x = packed_linear(rows[start : start + n], gu_p[j])
                gate, up = x.chunk(2, dim=-1)
                out[start : start + n] = packed_linear(F.silu(gate) * up, d_p[j])
            start += n
        return out

    def policy(rows, counts):  # what the engine runs (`ExpertStore.run_groups`)
        groups = TokenGroups(torch.arange(rows.shape[0]), torch.ones(rows.shape[0]), counts)
        return ExpertStore({0: held}).run_groups(0, rows, groups)

    def chain(rows, counts):  # one matmul chain per expert, each matmul on its per-shape path
        groups = TokenGroups(torch.arange(rows.shape[0]), torch.ones(rows.shape[0]), counts)
        return torch.cat([held.run_one(e, rows[a:b]) for e, a, b in groups.expert_ranges()])

    return {
        "grouped_bf16": held.run_grouped,
        "padded_bmm_bf16": held.run_padded,
        "prepacked_loop": loop,
        "chain_per_shape": chain,
        "grouped_f32_copy": lambda rows, counts: held32.run_grouped(rows.float(), counts).to(rows.dtype),
        "policy": policy,
    }


def route(tokens: int, gen: torch.Generator) -> list[int]:
    ids = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(tokens)])
    return torch.bincount(ids.reshape(-1), minlength=EXPERTS).tolist()


def measure(paths: dict, args: tuple, want: torch.Tensor, iters: int) -> dict:
    """name -> {us: median µs of fn(*args), err: max |fn - want| / max |want|}."""
    rel = lambda got: ((got.float() - want).abs().max() / want.abs().max()).item()  # noqa: E731
    return {p: {"us": round(median_us(lambda: fn(*args), iters), 1), "err": round(rel(fn(*args)), 4)} for p, fn in paths.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="1,8,32,64,128,512")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    result = {"torch": torch.__version__, "unit": "us, median, 1 thread", "dense": {}, "experts": {}}
    for name, (k, n) in DENSE.items():
        w = (torch.randn(n, k, generator=gen) / k**0.5).bfloat16()
        paths = dense_paths(w)
        layer = Linear(w)
        paths["policy"] = layer  # raymoe's choice for this shape (raymoe.model.matmul)
        for m in rows:
            x = torch.randn(m, k, generator=gen).bfloat16()
            key = f"{name} {m}x{k}x{n}"
            result["dense"][key] = measure(paths, (x,), F.linear(x.float(), w.float()), args.iters)
            print(key, {p: v["us"] for p, v in result["dense"][key].items()}, flush=True)
    gu = (torch.randn(EXPERTS, HIDDEN, 2 * INTER, generator=gen) / HIDDEN**0.5).bfloat16()
    dn = (torch.randn(EXPERTS, INTER, HIDDEN, generator=gen) / INTER**0.5).bfloat16()
    paths = expert_paths(gu, dn)
    reference = LayerExperts(list(range(EXPERTS)), gu.float(), dn.float())
    for m in rows:
        counts = route(m, gen)
        x = torch.randn(sum(counts), HIDDEN, generator=gen).bfloat16()
        key = f"{m} tokens, counts {counts}, policy {'padded' if pad_pays(x, counts) else 'chain'}"
        result["experts"][key] = measure(paths, (x, counts), reference.run_grouped(x.float(), counts), args.iters // 2)
        print(key, {p: v["us"] for p, v in result["experts"][key].items()}, flush=True)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text if not args.out else f"wrote {args.out}")


if __name__ == "__main__":
    main()
