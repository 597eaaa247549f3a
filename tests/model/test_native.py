"""raymoe's C kernels (`raymoe.model.native`).

Decode attention: every decode of a step read straight from the paged pool in one call. It equals
torch's SDPA path within float32 rounding (bfloat16: within its own rounding), over GQA groups, head
sizes with and without a specialised copy, sliding windows and steps that mix decodes with prompt
chunks; a decode's result does not depend on the rest of the step.

Experts: a layer's groups in one call (any size, a chunk at a time, for narrow experts; wide ones
keep torch's GEMMs for groups above SMALL), equal to torch's matmuls within float32 rounding; a
row's bits do not depend on the other rows of its group, and one expert run alone equals it run
among the others.

RMSNorm: rows (or the packed heads of a fused projection, per-head weights) in one call, equal to
torch's within float32 rounding, each row's bits its own.

The kernels are built once into the cache folder; where they cannot be built, or are switched off,
the torch paths run."""

import logging

import pytest
import torch

from raymoe.model import paged, ragged
from raymoe.model.experts import ExpertStore, LayerExperts, LocalExperts, combine, group_tokens
from raymoe.model.layers import RMSNorm, SwiGLU
from raymoe.model.native import build, decode
from raymoe.model.native import experts as native_experts
from raymoe.model.native import norm as native_norm
from tests.model.native_kernels import need_kernel
from tests.model.paged_steps import filled_step

BS = 4


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """`build.library` forgets what it loaded, builds into tmp_path; restored after the test."""
    monkeypatch.setenv("RAYMOE_CACHE_DIR", str(tmp_path))
    build.library.cache_clear()
    yield tmp_path
    build.library.cache_clear()


def _step(query_lens, context_lens, heads, kv_heads, d, dtype):
    return filled_step(query_lens, context_lens, heads, kv_heads, d, BS, dtype)


def _both_paths(cache, batch, q, k, v, window):
    """(the kernel's output, torch's) for the step."""
    plan = ragged.build_plan(batch.query_lens, batch.context_lens, batch.block_tables, BS)
    assert plan.native is not None
    got = ragged.attend_ragged(q, k, v, cache, plan, 0.3, window)
    plan.native = None
    want = ragged.attend_ragged(q, k, v, cache, plan, 0.3, window)
    return got, want


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize(
    "heads,kv_heads,d", [(4, 2, 32), (8, 2, 64), (3, 3, 16), (8, 1, 128)], ids=["gqa2-d32", "gqa4-d64", "mha-d16", "mqa-d128"]
)
@pytest.mark.parametrize(
    "query_lens,context_lens",
    [
        pytest.param([1] * 7, [1, 4, 9, 16, 33, 2, 40], id="decodes"),
        pytest.param([1, 6, 1, 9, 1], [30, 6, 8, 17, 5], id="mixed"),  # one chunk with a cached prefix
    ],
)
def test_kernel_equals_sdpa_float32(query_lens, context_lens, heads, kv_heads, d, window):
    need_kernel()
    got, want = _both_paths(*_step(query_lens, context_lens, heads, kv_heads, d, torch.float32), window)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 6])
def test_kernel_equals_sdpa_bfloat16(window):
    """bfloat16 pools: the kernel widens to float32 and rounds once at the end; torch's SDPA rounds
    on its own schedule: they agree to bfloat16's resolution."""
    need_kernel()
    got, want = _both_paths(*_step([1] * 6 + [5], [3, 12, 28, 40, 7, 19, 9], 4, 2, 32, torch.bfloat16), window)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_a_decode_gives_the_same_bits_alone_and_in_a_step():
    """Summation order is per decode, so the step around it changes nothing (the lossless rule's
    arrangements batch the same sequence differently)."""
    need_kernel()
    cache, batch, q, k, v = _step([1] * 5, [23, 7, 40, 2, 17], 4, 2, 32, torch.float32)
    together = ragged.attend_ragged(q, k, v, cache, ragged.build_plan(batch.query_lens, batch.context_lens,
                                                                      batch.block_tables, BS), 0.3)
    tables = batch.block_tables.tolist()
    alone = paged.AttentionBatch.build([1], [40], [tables[2][: -(-40 // BS)]], BS)
    got = ragged.attend_ragged(q[2:3], k[2:3], v[2:3], cache, ragged.plan_for(alone), 0.3)
    assert torch.equal(got[0], together[2])


def test_built_once_into_the_cache_folder(fresh_library, monkeypatch):
    need_kernel()
    assert build.library("decode_attention") is not None
    built = list((fresh_library / "kernels").glob("decode_attention-*.so"))
    assert len(built) == 1
    build.library.cache_clear()

    def no_compiler(*a, **k):
        raise AssertionError("compiled again although the cache holds the kernel")

    monkeypatch.setattr(build.subprocess, "run", no_compiler)
    assert build.library("decode_attention") is not None


def test_failed_build_or_switched_off_keeps_the_torch_path(fresh_library, monkeypatch, caplog):
    monkeypatch.delenv(build.ENV, raising=False)
    monkeypatch.setenv("CC", "/bin/false")  # a compiler that fails
    with caplog.at_level(logging.WARNING, logger="raymoe.model.native.build"):
        assert build.library("decode_attention") is None
    assert "did not build" in caplog.text and "torch's path runs" in caplog.text
    cache, batch, q, k, v = _step([1, 1, 5], [9, 3, 5], 4, 2, 32, torch.float32)
    plan = ragged.plan_for(batch)
    assert plan.native is None  # the plan lays nothing out for a kernel that is not there
    ctx = [paged.gather_context(part, batch) for part in cache]
    torch.testing.assert_close(ragged.attend_ragged(q, k, v, cache, plan, 0.3), paged.attend(q, *ctx, batch, 0.3))
    build.library.cache_clear()
    monkeypatch.delenv("CC")
    monkeypatch.setenv(build.ENV, "0")
    assert build.library("decode_attention") is None and not decode.available()


def _experts(num_experts: int, hidden: int, inter: int, dtype=torch.float32) -> LayerExperts:
    gen = torch.Generator().manual_seed(hidden)
    return LayerExperts.stack({
        e: SwiGLU((torch.randn(2 * inter, hidden, generator=gen) * 0.1).to(dtype),
                  (torch.randn(hidden, inter, generator=gen) * 0.1).to(dtype))
        for e in range(num_experts)
    })  # fmt: skip


def _routed(num_tokens: int, num_experts: int, top_k: int, hidden: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(num_tokens)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    groups = group_tokens(ids, torch.full((num_tokens, top_k), 1.0 / top_k), num_experts)
    return x[groups.token_of_row], groups


@pytest.mark.parametrize("num_tokens", [1, 5, 24, 64, 300], ids=["one", "few", "decode", "mixed-sizes", "chunked"])
@pytest.mark.parametrize("hidden,inter", [(128, 192), (40, 24)], ids=["builtin", "odd-widths"])
def test_experts_kernel_equals_torch_float32(monkeypatch, num_tokens, hidden, inter):
    """24 tokens x 2 of 8 experts: every group small; 64: groups of 10-21 rows; 300: groups of more
    than CHUNK rows, run a chunk at a time. The kernel runs them all (narrow experts)."""
    need_kernel()
    store = ExpertStore({0: _experts(8, hidden, inter)})
    rows, groups = _routed(num_tokens, 8, 2, hidden)
    largest = max(groups.counts)
    assert (largest > native_experts.SMALL) == (num_tokens >= 64) and (largest > native_experts.CHUNK) == (num_tokens == 300)
    calls = []
    run = native_experts.run
    monkeypatch.setattr(native_experts, "run", lambda *a: calls.append(1) or run(*a))
    got = store.run_groups(0, rows, groups)
    assert calls == [1]
    monkeypatch.setattr(native_experts, "kernel_for", lambda *a: None)
    torch.testing.assert_close(got, store.run_groups(0, rows, groups), atol=1e-5, rtol=1e-5)


def test_wide_experts_keep_large_groups_on_torch(monkeypatch):
    """Where a panel of weights would not stay in cache, groups above SMALL go to torch's GEMMs."""
    need_kernel()
    store = ExpertStore({0: _experts(8, 128, 192)})
    monkeypatch.setattr(native_experts, "PANEL_BYTES", 128 * 128 * 4)  # as if the experts were wider
    assert not native_experts.takes(native_experts.SMALL + 1, 128, 192) and native_experts.takes(native_experts.SMALL, 128, 192)
    calls = []
    monkeypatch.setattr(native_experts, "run", lambda *a: calls.append(1))
    rows, groups = _routed(90, 8, 2, 128)
    assert min(c for c in groups.counts if c) > native_experts.SMALL
    store.run_groups(0, rows, groups)
    assert calls == []
    rows, groups = _routed(24, 8, 2, 128)
    store.run_groups(0, rows, groups)
    assert calls == [1]


def test_experts_kernel_equals_torch_bfloat16(monkeypatch):
    need_kernel()
    store = ExpertStore({0: _experts(8, 128, 192, torch.bfloat16)})
    rows, groups = _routed(24, 8, 2, 128, torch.bfloat16)
    got = store.run_groups(0, rows, groups)
    assert got.dtype == torch.bfloat16
    monkeypatch.setattr(native_experts, "kernel_for", lambda *a: None)
    torch.testing.assert_close(got.float(), store.run_groups(0, rows, groups).float(), atol=3e-2, rtol=3e-2)


def test_a_row_gives_the_same_bits_alone_and_in_its_group():
    """Rows run in register tiles and in chunks, yet each output is the same chain of multiply-adds:
    a row alone (a tile of one) equals it among 6 others (tiles of six and one) and among 99 others
    (two chunks)."""
    need_kernel()
    held = _experts(4, 128, 192)
    rows = torch.randn(100, 128, generator=torch.Generator().manual_seed(1))
    together, seven = held.run_one(2, rows), held.run_one(2, rows[:7])
    for i in (0, 5, 6, 70, 99):
        alone = held.run_one(2, rows[i : i + 1])[0]
        assert torch.equal(alone, together[i]) and (i >= 7 or torch.equal(alone, seven[i]))




@pytest.mark.parametrize("hidden,inter", [(128, 192), (40, 24)], ids=["builtin", "odd-widths"])
def test_experts_packed_by_strips_give_the_bits_of_the_plain_stack(hidden, inter):
    """Small float32 experts keep a copy packed by strips, which the kernels read instead: every
    output the same chain of multiply-adds, so the same bits at any row count (a tile of 1-6 rows
    over several strips, strip after strip for more, a narrower last strip at odd widths)."""
    need_kernel()
    held = _experts(8, hidden, inter)
    assert held.strips is not None and held.strips[0].shape == held.gate_up_t.shape
    assert not torch.equal(held.strips[0], held.gate_up_t)  # another order in memory
    gen = torch.Generator().manual_seed(3)
    for num_tokens in (1, 2, 3, 5, 8, 13, 32, 70):
        x = torch.randn(num_tokens, hidden, generator=gen)
        ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(num_tokens)])
        w = torch.softmax(torch.randn(num_tokens, 2, generator=gen), -1)
        plain = native_experts.run_layer(x, ids, w, held.gate_up_t, held.down_t)
        assert torch.equal(native_experts.run_layer(x, ids, w, *held.kernel_weights()), plain)
        out = torch.empty_like(x)
        native_experts.run(native_experts.kernel_for(x, *held.strips, True), x, [num_tokens], held.strips[0][3:4],
                           held.strips[1][3:4], out)  # fmt: skip
        want = torch.empty_like(x)
        native_experts.run(native_experts.kernel_for(x, held.gate_up_t, held.down_t), x, [num_tokens],
                           held.gate_up_t[3:4], held.down_t[3:4], want)  # fmt: skip
        assert torch.equal(out, want)


def test_experts_not_packed_in_bfloat16_or_wide():
    need_kernel()
    assert _experts(2, 128, 192, torch.bfloat16).strips is None
    assert _experts(2, 128, 320).strips is None  # over 256 wide: the copy would double much memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel_equals_torch(monkeypatch, dtype):
    """Rows of a [T, H] stream and the packed q/k heads of a [T, 8, 32] projection (a strided view, one
    weight per head), against the torch path of `RMSNorm` (the kernel switched off)."""
    need_kernel()
    gen = torch.Generator().manual_seed(3)
    norm = RMSNorm(torch.randn(128, generator=gen).to(dtype), 1e-6)
    x = (torch.randn(33, 128, generator=gen) * 3).to(dtype)
    qkv = torch.randn(5, 8, 32, generator=gen).to(dtype)
    qk, head_w = qkv[:, :6], torch.randn(6, 32, generator=gen).to(dtype)
    got, got_qk = norm(x), native_norm.rms_norm(qk, head_w, 1e-6)
    assert got_qk is not None and got_qk.is_contiguous() and got.dtype == dtype
    assert torch.equal(native_norm.rms_norm(x[7:8].clone(), norm.weight, 1e-6)[0], got[7])  # a row alone
    want_qk = (torch.nn.functional.rms_norm(qk.float(), (32,), None, 1e-6).to(dtype) * head_w).float()
    monkeypatch.setattr(native_norm, "rms_norm", lambda *a: None)
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), norm(x).float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got_qk.float(), want_qk, atol=tol, rtol=tol)


def test_rms_norm_kernel_declines_what_it_does_not_take():
    need_kernel()
    w = torch.randn(32)
    assert native_norm.rms_norm(torch.randn(4, 64)[:, ::2], w, 1e-6) is None  # strided last dim
    assert native_norm.rms_norm(torch.randn(4, 32).double(), w.double(), 1e-6) is None  # float64
    assert native_norm.rms_norm(torch.randn(4, 32), torch.randn(3, 32), 1e-6) is None  # heads mismatch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 7, 32, 150])
def test_fused_layer_has_the_bits_of_group_run_combine(monkeypatch, dtype, num_tokens):
    """`LocalExperts.run` in one call of the kernel: bit for bit what grouping, `run_groups` (on the
    same kernel) and `combine` give, so a cluster's shards and workers agree with one process."""
    need_kernel()
    gen = torch.Generator().manual_seed(num_tokens)
    store = ExpertStore({0: _experts(8, 128, 192, dtype)})
    x = torch.randn(num_tokens, 128, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(num_tokens)])
    weights = torch.softmax(torch.randn(num_tokens, 2, generator=gen), -1).to(dtype)
    calls = []
    fused = native_experts.run_layer
    monkeypatch.setattr(native_experts, "run_layer", lambda *a: calls.append(1) or fused(*a))
    got = LocalExperts(store, 8).run(0, x, ids, weights)
    assert calls == [1] and got.dtype == dtype
    groups = group_tokens(ids, weights, 8)
    assert torch.equal(got, combine(store.run_groups(0, x[groups.token_of_row], groups), groups, num_tokens))


def test_fused_layer_declines_a_partial_stack_and_bad_ids(monkeypatch):
    need_kernel()
    held = _experts(8, 128, 192)
    x, w = torch.randn(3, 128), torch.full((3, 2), 0.5)
    assert native_experts.run_layer(x, torch.tensor([[0, 9], [1, 2], [3, 4]]), w, held.gate_up_t, held.down_t) is None
    part = ExpertStore({0: LayerExperts.stack({e: SwiGLU(torch.randn(384, 128), torch.randn(128, 192)) for e in (1, 2)})})
    called = []
    monkeypatch.setattr(native_experts, "run_layer", lambda *a: called.append(1))
    LocalExperts(part, 8).run(0, x, torch.tensor([[1, 2]] * 3), w)
    assert called == []  # a shard's partial stack: the grouped path
