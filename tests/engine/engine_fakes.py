"""Fakes for fast engine tests: a one-layer attention model over the real paged KV, and a
one-character-per-token tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from raymoe.engine.llm_engine import LLMEngine
from raymoe.model.paged import attend, gather_context, write_kv

EOS = 1


class TinyModel:
    """Embedding + one attention layer through the paged cache + LM head.

    Every logit depends on the whole context through the KV cache, so a wrong block table,
    slot or position changes the greedy tokens. Same interface as `raymoe.model.model.MoEModel`.
    """

    def __init__(self, vocab_size=96, hidden=32, heads=2, max_pos=512, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.spec = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=max_pos, eos_token_ids=(EOS,))
        self.dtype = torch.float32
        self.heads, self.head_dim = heads, hidden // heads
        self.embed = torch.randn(vocab_size, hidden, generator=g)  # [V, H]
        self.pos = torch.randn(max_pos, hidden, generator=g)  # [P, H]
        self.wqkv = torch.randn(hidden, 3 * hidden, generator=g) / hidden**0.5  # [H, 3H]
        self.wo = torch.randn(hidden, hidden, generator=g) / hidden**0.5
        self.lm_head = torch.randn(vocab_size, hidden, generator=g)  # [V, H]
        self.lm_head[EOS] -= 3.0  # keep EOS rare, so sequences run to max_tokens unless a test wants EOS
        self.num_forward_tokens = 0

    def kv_layout(self):
        return [(self.heads, self.head_dim, self.head_dim)]

    def forward(self, input_ids, batch, kv_cache):
        """input_ids: [T] -> hidden [T, H]."""
        self.num_forward_tokens += int(input_ids.shape[0])
        x = self.embed[input_ids] + self.pos[batch.positions]  # [T, H]
        q, k, v = (x @ self.wqkv).view(-1, 3, self.heads, self.head_dim).unbind(1)  # each [T, heads, d]
        write_kv(kv_cache[0], batch, k, v)
        k_ctx, v_ctx = gather_context(kv_cache[0][0], batch), gather_context(kv_cache[0][1], batch)
        out = attend(q, k_ctx, v_ctx, batch, self.head_dim**-0.5)  # [T, heads, d]
        return x + out.reshape(x.shape[0], -1) @ self.wo

    def compute_logits(self, hidden):
        return (hidden @ self.lm_head.T).float()  # [N, V]


class CharTokenizer:
    """Token i <-> character chr(32 + i); token 1 (EOS) decodes to nothing."""

    eos_token_ids = (EOS,)

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 32 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(32 + i) for i in ids if i != EOS)


class CharDetokenizer:
    def __init__(self, tokenizer, prompt_ids=()):
        self.tokenizer = tokenizer

    def push(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def run_to_end(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list[int]]:
    """Step until idle; request id -> generated token ids."""
    out: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return out
        for delta in engine.step():
            out.setdefault(delta.request_id, []).extend(delta.token_ids)
    raise AssertionError("engine did not finish")
