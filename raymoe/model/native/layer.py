"""A decoder layer's float32 pieces in C (`layer.c`), and a decode step's layer in two calls.

At the built-in model's sizes a decode step's layer is ~30 small torch ops and their Python
(~5-40 us each), more than its arithmetic. Here:
- `linear`: rows @ a float32 weight packed by strips of output columns (`pack`; `Linear` and the LM
  head keep the packed copy where in_features <= MAX_IN);
- `route`: a softmax router's top k;
- `attention_block` / `moe_block`: the attention half (norm through post-attention norm, KV write
  included) and the MoE half (router, experts, residual) of a layer, for steps of decodes only;
- `decode_step`: a decode step from embedding to final norm in one call, both halves of every layer
  (`DecodeLayer` holds a layer's weights and pools, built once).
Each piece gives a token the same bits in a block as alone (the blocks call the same code), so
which steps take the blocks never changes a result.
"""

from __future__ import annotations

import ctypes

import torch

from raymoe.model.native import experts as native_experts
from raymoe.model.native.build import bind, library
from raymoe.model.native.decode import Decodes

MAX_IN = 256  # in_features up to which `gemm.h` (no blocking over K) runs a linear at MKL's rate or above
_I, _P, _F = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_SIGNATURES = {
    "linear_f32": [_P, _I, _I, _P, _I, _P, _P],
    "route_f32": [_P, _I, _I, _P, _I, _I, _I, _P, _P, _P],
    "attention_block_f32": [_P, _I, _I, _P, _F, _P, _P, _I, _I, _I, _P, _F, _P, _P, _P, _P, _P, _P, _I, _P, _P,
                            _I, _I, _F, _I, _P, _P, _P, _P, _P],  # fmt: skip
    "moe_block_f32": [_P, _P, _I, _I, _P, _I, _I, _I, _P, _P, _I, _I, _I, _P, _P, _P, _P, _P],
    "decode_step_f32": [_P, _I, _P, _I, _P, _I, _I, _P, _P, _I, _I, _P, _P, _P, _I, _P, _P, _I, _I, _I, _P, _F, _P, _P,
                        _P, _P, _P, _P, _P, _P, _P, _I],  # fmt: skip
}


def _fn(name: str):
    return bind("layer", name, _SIGNATURES[name])


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [N, K] -> its float32 copy packed by strips for `linear`: for each
    `native.experts.strip_columns()` output columns, their [K, width] block, row-major, one after the
    other ([N K] flat). None where the kernels are not built, the weight is not float32 on the CPU
    or K > MAX_IN (torch's linear runs)."""
    if weight.dtype != torch.float32 or not weight.is_cpu or weight.dim() != 2 or weight.shape[1] > MAX_IN:
        return None
    width = native_experts.strip_columns()
    if width is None or library("layer") is None:
        return None
    return torch.cat([part.t().reshape(-1) for part in weight.split(width)])


def linear(x: torch.Tensor, strips: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ the packed weight (`pack` of [N, K]) (+ bias [N]) -> [..., N], float32."""
    k = x.shape[-1]
    n = strips.shape[0] // k
    rows = x.reshape(-1, k).contiguous()
    out = rows.new_empty(rows.shape[0], n)
    _fn("linear_f32")(rows.data_ptr(), rows.shape[0], k, strips.data_ptr(), n, _ptr(bias), out.data_ptr())
    return out.view(*x.shape[:-1], n)


def route(x: torch.Tensor, gate: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] float32, gate: `pack` of the [E, H] router -> ids [T, K] int64, weights [T, K] float32
    (softmax_topk's choice)."""
    x = x.contiguous()
    experts = gate.shape[0] // x.shape[1]
    ids, weights = torch.empty(x.shape[0], top_k, dtype=torch.long), x.new_empty(x.shape[0], top_k)
    scratch = x.new_empty(experts)
    rc = _fn("route_f32")(x.data_ptr(), x.shape[0], x.shape[1], gate.data_ptr(), experts, top_k, int(normalize),
                          ids.data_ptr(), weights.data_ptr(), scratch.data_ptr())  # fmt: skip
    assert rc == 0, f"route_f32 refused top_k={top_k} of {experts} experts"
    return ids, weights


def attention_block(attn, h: torch.Tensor, w_in: torch.Tensor, w_post: torch.Tensor, eps: float, cos_sin,
                    cache, slots: torch.Tensor, decodes: Decodes) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """The attention half of a decode step's layer for `attn` (a GQAAttention whose `fusable` holds):
    h [T, H] -> (h + attention [T, H], its post-attention norm [T, H]); writes the step's keys and
    values into cache's pools at slots [T]. cos_sin: the step's (cos, signed sin), each [T, 1, d].
    None where the pools or shapes do not suit (nothing written)."""
    k_cache, v_cache = cache
    cos, ssin = cos_sin
    if not all(t.is_contiguous() for t in (h, k_cache, v_cache, cos, ssin, slots)):
        return None
    if k_cache.dtype != torch.float32 or v_cache.shape[-1] != attn.head_dim:
        return None
    tokens, hidden, d = h.shape[0], h.shape[1], attn.head_dim
    block_size = k_cache.shape[1]
    max_ctx = decodes.tables.shape[1] * block_size
    scratch = h.new_empty(attention_scratch(attn, tokens, hidden, max_ctx))
    h_out, x_out = torch.empty_like(h), torch.empty_like(h)
    qk_w = attn.qk_head_weight
    rc = _fn("attention_block_f32")(
        h.data_ptr(), tokens, hidden, w_in.data_ptr(), eps, attn.qkv.weight_strips.data_ptr(), _ptr(attn.qkv.bias),
        attn.heads, attn.kv_heads, d, _ptr(qk_w), attn.q_norm.eps if qk_w is not None else 0.0, cos.data_ptr(),
        ssin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), decodes.tables.data_ptr(),
        decodes.tables.shape[1], decodes.ctx_lens.data_ptr(), decodes.rows.data_ptr(), decodes.rows.shape[0],
        block_size, attn.scale, attn.sliding_window or 0, attn.o_proj.weight_strips.data_ptr(), w_post.data_ptr(),
        h_out.data_ptr(), x_out.data_ptr(), scratch.data_ptr(),
    )  # fmt: skip
    return (h_out, x_out) if rc == 0 else None


def moe_block(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, top_k: int, normalize: bool,
              gate_up_t: torch.Tensor, down_t: torch.Tensor, strips: bool) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """h [T, H] + the routed experts of x [T, H] (router: `pack` of [E, H], experts gate_up_t [E, H, 2I],
    down_t [E, I, H], every expert of the layer; strips: they are `native.experts.pack`'s) -> (that
    sum [T, H], the chosen ids [T, K]); None where the experts kernel does not take these sizes."""
    tokens, hidden = x.shape
    experts, inter = gate_up_t.shape[0], down_t.shape[1]
    if not native_experts.takes(tokens, hidden, inter) or not (x.is_contiguous() and h.is_contiguous()):
        return None
    h_out = torch.empty_like(h)
    ids, weights = torch.empty(tokens, top_k, dtype=torch.long), x.new_empty(tokens, top_k)
    scratch = x.new_empty(moe_scratch(hidden, inter, experts))
    order = torch.empty(experts + 1 + tokens * top_k, dtype=torch.long)
    rc = _fn("moe_block_f32")(
        x.data_ptr(), h.data_ptr(), tokens, hidden, gate.data_ptr(), experts, top_k, int(normalize),
        gate_up_t.data_ptr(), down_t.data_ptr(), int(strips), inter, native_experts.CHUNK, h_out.data_ptr(), ids.data_ptr(), weights.data_ptr(),
        scratch.data_ptr(), order.data_ptr(),
    )  # fmt: skip
    return (h_out, ids) if rc == 0 else None


class DecodeLayer(ctypes.Structure):
    """layer.c's decode_layer: one layer's weights (as `attention_block` and `moe_block` take them),
    its paged pools and sizes, for `decode_step`. Holds raw pointers: whoever builds it keeps the
    tensors alive."""

    _fields_ = [(name, _P) for name in ("w_in", "qkv_w", "qkv_bias", "qk_w", "o_w", "w_post", "gate", "gate_up", "down",
                                        "kp", "vp")] + [  # fmt: skip
        (name, _I) for name in ("heads", "kv_heads", "d", "window", "experts", "top_k", "normalize", "strips", "inter")
    ] + [(name, _F) for name in ("eps", "qk_eps", "scale")]


def attention_scratch(attn, tokens: int, hidden: int, max_ctx: int) -> int:
    """Floats of attention_block's scratch for `attn` (a GQAAttention) at `tokens` rows."""
    d, group = attn.head_dim, attn.heads // attn.kv_heads
    return tokens * (hidden + (attn.heads + 2 * attn.kv_heads) * d + (2 * attn.heads + attn.kv_heads) * d) + (group + 3) * max_ctx + 1


def moe_scratch(hidden: int, inter: int, experts: int) -> int:
    """Floats of moe_block's scratch."""
    return max(native_experts.CHUNK * (2 * hidden + 3 * inter), experts)


def decode_step(layers, embed: torch.Tensor, input_ids: torch.Tensor, rope_tables, positions: torch.Tensor,
                slots: torch.Tensor, decodes: Decodes, block_size: int, norm, top_k: int,
                scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """A step of decodes from token ids to final hidden states in one call: input_ids [T] through the
    embedding embed [V, H], every `DecodeLayer` of `layers` (a ctypes array; the attention block then
    the MoE block, as the two calls give them) and the final norm (weight [H], eps).
    rope_tables: (cos, signed sin) [L, d] by position; positions [T], slots [T] (where each token's
    K/V goes) int64, contiguous; scratch: float32, at least the larger block's scratch of any layer
    (`attention_scratch`, `moe_scratch`). -> (hidden [T, H], the chosen experts [layers, T, top_k]),
    or None where an id, a position or a layer's shapes are not taken (nothing written)."""
    tokens, hidden = input_ids.shape[0], embed.shape[1]
    cos, ssin = rope_tables
    weight, eps = norm
    out, h, a, x = (embed.new_empty(tokens, hidden) for _ in range(4))
    cs = embed.new_empty(2, tokens, cos.shape[1])
    ids, weights = torch.empty(len(layers), tokens, top_k, dtype=torch.long), embed.new_empty(len(layers), tokens, top_k)
    order = torch.empty(layers[0].experts + 1 + tokens * top_k, dtype=torch.long)
    rc = _fn("decode_step_f32")(
        ctypes.addressof(layers), len(layers), embed.data_ptr(), embed.shape[0], input_ids.data_ptr(), tokens, hidden,
        cos.data_ptr(), ssin.data_ptr(), cos.shape[0], cos.shape[1], positions.data_ptr(), slots.data_ptr(),
        decodes.tables.data_ptr(), decodes.tables.shape[1], decodes.ctx_lens.data_ptr(), decodes.rows.data_ptr(),
        decodes.rows.shape[0], block_size, native_experts.CHUNK, weight.data_ptr(), eps, out.data_ptr(), h.data_ptr(),
        a.data_ptr(), x.data_ptr(), cs.data_ptr(), scratch.data_ptr(), order.data_ptr(), ids.data_ptr(),
        weights.data_ptr(), top_k,
    )  # fmt: skip
    return (out, ids) if rc == 0 else None
