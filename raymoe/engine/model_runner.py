"""ModelRunner: owns the model and its paged KV cache, and runs one scheduled step.

A step flattens the scheduled sequences' new tokens into one batch of T tokens (`AttentionBatch`
order = schedule order), runs the model once, and computes logits only for the sequences whose
chunk reaches their last token (a decode, or the final chunk of a prompt); those get a token.
"""

from __future__ import annotations

import torch

from raymoe.engine.logits_process import adjust_logits
from raymoe.engine.logprobs import entries
from raymoe.engine.sampler import make_generator, sample
from raymoe.engine.scheduler import Scheduled
from raymoe.engine.sequence import Sequence
from raymoe.errors import ConfigError
from raymoe.model.paged import AttentionBatch, allocate_kv_cache, kv_bytes_per_block


def num_kv_blocks(
    kv_layout: list[tuple[int, int, int]],
    block_size: int,
    dtype: torch.dtype,
    kv_cache_bytes: int,
    max_num_seqs: int,
    max_position_embeddings: int,
) -> int:
    """Blocks that fit the byte budget, capped at what max_num_seqs full-context sequences use."""
    block_bytes = kv_bytes_per_block(kv_layout, block_size, dtype)
    fit = kv_cache_bytes // block_bytes
    if fit < 1:
        raise ConfigError(
            f"kv_cache_bytes={kv_cache_bytes} holds no KV block ({block_bytes} bytes for block_size="
            f"{block_size}); raise kv_cache_bytes or lower block_size"
        )
    blocks_per_seq = -(-max_position_embeddings // block_size)
    return min(fit, max_num_seqs * blocks_per_seq)


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int):
        """model: a `raymoe.model.model.MoEModel` (or anything with its forward/compute_logits)."""
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = getattr(model, "device", torch.device("cpu"))
        self.kv_cache = allocate_kv_cache(model.kv_layout(), num_blocks, block_size, model.dtype, self.device)
        self.num_computed_tokens = 0  # tokens run through the model (prefill and decode)
        self.eos_token_ids: tuple[int, ...] = ()  # barred by min_tokens; the engine sets them

    @torch.inference_mode()
    def run(self, scheduled: Scheduled) -> list[int | None]:
        """One forward step. Returns per scheduled sequence its next token, or None (mid-prompt)."""
        if not scheduled:
            return []
        input_ids, batch = self.prepare(scheduled)
        tally = getattr(self.model, "tally", None)  # a RoutingTally, on workers that report routing
        if tally is not None:
            tally.begin_step()
        hidden = self.model.forward(input_ids, batch, self.kv_cache)  # [T, H]
        if tally is not None:
            tally.end_step([seq.request_id for seq, _ in scheduled], batch.query_lens)
        self.num_computed_tokens += batch.num_tokens
        ends = torch.tensor(batch.query_lens).cumsum(0) - 1  # [B] index of each sequence's last token
        self._score_prompts(hidden, scheduled, ends)
        rows = [b for b, (seq, n) in enumerate(scheduled) if seq.num_cached_tokens + n == len(seq)]
        if not rows:
            return [None] * len(scheduled)
        logits = self.model.compute_logits(hidden[ends[rows].to(hidden.device)])  # [N, V]
        seqs = [scheduled[b][0] for b in rows]
        adjusted = adjust_logits(logits, seqs, self.eos_token_ids)
        next_ids = sample(adjusted, [s.params for s in seqs], [self._generator(s) for s in seqs]).tolist()
        self._score_samples(logits, seqs, next_ids)
        out: list[int | None] = [None] * len(scheduled)
        for b, token_id in zip(rows, next_ids):
            out[b] = token_id
        return out

    def _score_samples(self, logits: torch.Tensor, seqs: list[Sequence], next_ids: list[int]) -> None:
        """logits: [N, V] raw, row i for seqs[i] -> seq.new_logprob of those that asked."""
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        for i in want:
            seqs[i].new_logprob = entries(logits[i : i + 1], [next_ids[i]], seqs[i].params.logprobs)[0]

    def _score_prompts(self, hidden: torch.Tensor, scheduled: Scheduled, ends: torch.Tensor) -> None:
        """hidden: [T, H]; ends: [B] each sequence's last row. Each sequence that asked for prompt
        logprobs gets, for the prompt positions computed now, the logprob of the token after each."""
        for b, (seq, n) in enumerate(scheduled):
            if not seq.needs_prompt_logprobs:
                continue
            first, start = int(ends[b]) - n + 1, max(seq.num_cached_tokens, len(seq.prompt_logprobs))
            stop = min(seq.num_cached_tokens + n, seq.num_prompt_tokens - 1)  # position p scores token p + 1
            if start >= stop:
                continue
            rows = torch.arange(start, stop) - seq.num_cached_tokens + first
            logits = self.model.compute_logits(hidden[rows])  # [stop - start, V]
            seq.prompt_logprobs += entries(logits, seq.token_ids[start + 1 : stop + 1], seq.params.prompt_logprobs)

    def prepare(self, scheduled: Scheduled) -> tuple[torch.Tensor, AttentionBatch]:
        """-> input_ids [T], the batch metadata. Each sequence computes tokens
        num_cached .. num_cached + n - 1; their KV lands at those positions."""
        input_ids: list[int] = []
        for seq, n in scheduled:
            input_ids.extend(seq.token_ids[seq.num_cached_tokens : seq.num_cached_tokens + n])
        batch = AttentionBatch.build(
            query_lens=[n for _, n in scheduled],
            context_lens=[seq.num_cached_tokens + n for seq, n in scheduled],
            block_tables=[seq.block_table for seq, _ in scheduled],
            block_size=self.block_size,
            tags=[seq.prompt_token_ids[0] for seq, _ in scheduled],
            device=self.device,
        )
        return torch.tensor(input_ids, dtype=torch.long).to(self.device), batch

    @staticmethod
    def _generator(seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is not None and seq.generator is None:
            seq.generator = make_generator(seq.params.seed)
        return seq.generator
