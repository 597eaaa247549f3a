"""A decode step from token ids to final hidden states in one C call, where every layer would take
both of its blocks.

A decode step's layer already runs in two C calls (`GQAAttention.decode_block`, `MoEBlock.residual`);
at the built-in model's sizes their Python (checks, allocations, ~25 ctypes arguments a call) with
the embedding, rotary tables and final norm around them is a large part of a batch-32 step
(docs/benchmarks.md, "A decode step in one C call"). `FusedDecode`
builds each layer's weights and pools into a `DecodeLayer` table once, and a step passes only what
changes (`native.layer.decode_step`). The C function runs the embedding rows, the same two blocks
layer after layer and the final norm's kernel, so a token's bits are those of the per-layer path;
any step it does not take runs that path as before.
"""

from __future__ import annotations

import ctypes

import torch

from raymoe.model import ragged
from raymoe.model.experts import LocalExperts
from raymoe.model.native import experts as native_experts
from raymoe.model.native import layer as native_layer
from raymoe.model.native.build import library


class FusedDecode:
    """A model that qualifies (`of`), its decode steps run through `decode_step`."""

    def __init__(self, model):
        self.layers, self.embed, self.rotary = model.layers, model.embed, model.rotary
        self.norm = (model.norm.weight, model.norm.eps)
        first = self.layers[0].ffn.spec
        self.experts, self.top_k, self.normalize = first.num_experts, first.top_k, first.norm_topk_prob
        self._table = None  # (key, ctypes array of DecodeLayer, what it points into)
        self._scratch, self._scratch_key = torch.empty(0), None  # grown as steps need, reused

    @classmethod
    def of(cls, model) -> FusedDecode | None:
        """For a float32 model whose every layer is GQA attention that fuses and a MoE block with a
        softmax router in C, no shared expert and no routing replay; else None."""
        if model.dtype != torch.float32 or library("layer") is None or not model.layers:
            return None
        for layer in model.layers:
            ffn = layer.ffn
            if not (layer.is_moe and layer.fuses_attention and layer.input_norm.eps == layer.post_norm.eps):
                return None
            if ffn.shared is not None or ffn.replay is not None or ffn.gate.weight_strips is None or ffn.gate.bias is not None:
                return None
        if not (model.embed.is_contiguous() and model.norm.weight.is_contiguous()):
            return None
        return cls(model)

    def run(self, input_ids: torch.Tensor, batch, kv_cache, experts) -> torch.Tensor | None:
        """input_ids [T] -> the final hidden states [T, H] (after the final norm), for a step of
        decodes only with every expert in this process; else None (nothing written)."""
        plan = ragged.plan_for(batch)
        if plan is None or plan.prefills or plan.native is None or not isinstance(experts, LocalExperts):
            return None
        if input_ids.dtype != torch.long or not (input_ids.is_contiguous() and batch.slot_mapping.is_contiguous()):
            return None
        table = self._layer_table(kv_cache, experts)
        if table is None:
            return None
        layers, inter = table
        tokens, hidden = input_ids.shape[0], self.embed.shape[1]
        if not native_experts.takes(tokens, hidden, inter):
            return None
        rope = self.rotary.tables(max(batch.context_lens), torch.float32, input_ids.device)  # decodes sit last
        if rope[0].shape[1] != self.layers[0].attn.head_dim:
            return None
        scratch = self._scratch_for(tokens, hidden, inter, plan.native.tables.shape[1] * batch.block_size)
        done = native_layer.decode_step(layers, self.embed, input_ids, rope, batch.positions, batch.slot_mapping,
                                        plan.native, batch.block_size, self.norm, self.top_k, scratch)  # fmt: skip
        if done is None:
            return None
        out, ids = done
        for i in [i for i, layer in enumerate(self.layers) if layer.ffn.tally is not None]:
            self.layers[i].ffn.tally.add(self.layers[i].ffn.moe_index, ids[i])
        return out

    def _layer_table(self, kv_cache, experts: LocalExperts):
        """(ctypes array of DecodeLayer, the experts' intermediate size), built once for these pools and
        expert stacks; None where a layer's experts are not all here or a pool does not suit."""
        wholes = [experts.whole(layer.ffn.layer) for layer in self.layers]
        if any(w is None for w in wholes):
            return None
        key = (id(kv_cache), id(experts), *(id(w) for w in wholes))
        if self._table is None or self._table[0] != key:
            table = _build(self.layers, kv_cache, wholes, self)
            self._table = (key, table, (kv_cache, experts, wholes))  # kept alive while the pointers are used
        return self._table[1]

    def _scratch_for(self, tokens: int, hidden: int, inter: int, max_ctx: int) -> torch.Tensor:
        if self._scratch_key == (tokens, hidden, inter, max_ctx):
            return self._scratch
        self._scratch_key = (tokens, hidden, inter, max_ctx)
        need = max(max(native_layer.attention_scratch(layer.attn, tokens, hidden, max_ctx) for layer in self.layers),
                   native_layer.moe_scratch(hidden, inter, self.experts))  # fmt: skip
        if self._scratch.numel() < need:
            self._scratch = torch.empty(2 * need)
        return self._scratch


def _build(layers: list, kv_cache, wholes: list, fused: FusedDecode):
    """The DecodeLayer table for these pools and experts; None where a pool or stack does not suit."""
    table = (native_layer.DecodeLayer * len(layers))()
    inters = {w.down_t.shape[1] for w in wholes}
    if len(inters) != 1:
        return None
    for entry, layer, (k_cache, v_cache), whole in zip(table, layers, kv_cache, wholes):
        attn, ffn = layer.attn, layer.ffn
        gate_up, down, strips = whole.kernel_weights()
        tensors = (k_cache, v_cache, gate_up, down)
        if any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors) or v_cache.shape[-1] != attn.head_dim:
            return None
        qk_w = attn.qk_head_weight
        entry.w_in, entry.w_post = layer.input_norm.weight.data_ptr(), layer.post_norm.weight.data_ptr()
        entry.qkv_w, entry.qkv_bias = attn.qkv.weight_strips.data_ptr(), native_layer._ptr(attn.qkv.bias)
        entry.qk_w, entry.o_w = native_layer._ptr(qk_w), attn.o_proj.weight_strips.data_ptr()
        entry.gate, entry.gate_up, entry.down, entry.strips = ffn.gate.weight_strips.data_ptr(), gate_up.data_ptr(), down.data_ptr(), strips
        entry.kp, entry.vp = k_cache.data_ptr(), v_cache.data_ptr()
        entry.heads, entry.kv_heads, entry.d, entry.window = attn.heads, attn.kv_heads, attn.head_dim, attn.sliding_window or 0
        entry.experts, entry.top_k, entry.normalize, entry.inter = fused.experts, fused.top_k, int(fused.normalize), whole.down_t.shape[1]
        entry.eps, entry.qk_eps, entry.scale = layer.input_norm.eps, attn.q_norm.eps if qk_w is not None else 0.0, attn.scale
    return table, inters.pop()
