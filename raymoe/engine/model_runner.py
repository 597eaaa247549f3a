"""ModelRunner: owns the model and its paged KV cache, and runs one scheduled step.

A step flattens the scheduled sequences' new tokens into one batch of T tokens (`AttentionBatch`
order = schedule order), runs the model once, and computes logits only for the sequences whose
chunk reaches their last token (a decode, or the final chunk of a prompt); those get a token.
"""

from __future__ import annotations

import torch

from raymoe.engine.logits_process import adjust_logits
from raymoe.engine.logprobs import entries
from raymoe.engine.sampler import argmax_rows, make_generator, sample
from raymoe.engine.scheduler import Scheduled
from raymoe.engine.sequence import Sequence
from raymoe.engine.spec.verify import verify
from raymoe.errors import ConfigError
from raymoe.model.host import inference, ints
from raymoe.model.paged import AttentionBatch, allocate_kv_cache, kv_bytes_per_block, move_kv


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


def logit_rows(scheduled: Scheduled, ends: list[int]) -> dict[int, list[int]]:
    """Rows of the step's hidden states that need logits, by index into scheduled: every row of a
    verified draft, the last row of a sequence whose chunk reaches its end, none mid-prompt or for
    a KV-only sequence (a chunk computed for chunk reuse)."""
    rows = {}
    for b, ((seq, n), end) in enumerate(zip(scheduled, ends)):
        if seq.draft is not None:
            rows[b] = list(range(end - n + 1, end + 1))
        elif seq.num_cached_tokens + n == len(seq) and not seq.kv_only:
            rows[b] = [end]
    return rows


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
        self.speculator = None  # a spec.Speculator when drafts are verified: it sees every logits row

    @inference
    def run(self, scheduled: Scheduled) -> list[list[int]]:
        """One forward step. Returns per scheduled sequence its new tokens: none mid-prompt, one
        for a decode or a prompt's end, the kept draft tokens and one more for a verified draft."""
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
        out: list[list[int]] = [[] for _ in scheduled]
        if _plain_decodes(scheduled):  # a row and a sampled token per sequence, in order
            logits = self.model.compute_logits(hidden)  # [B, V]
            self._sample(logits, list(range(len(scheduled))), scheduled, out)
            if self.speculator is not None:
                self.speculator.observe(input_ids, logits)
            return out
        ends = ints(batch.query_lens).cumsum(0) - 1  # [B] index of each sequence's last token
        self._score_prompts(hidden, scheduled, ends)
        rows = logit_rows(scheduled, ends.tolist())  # sequence -> its rows, in schedule order
        if not rows:
            return out
        flat = ints([r for rs in rows.values() for r in rs])
        logits = self.model.compute_logits(_take(hidden, flat))  # [R, V]
        spans = dict(zip(rows, _spans([len(rs) for rs in rows.values()])))  # sequence -> its slice of logits
        plain = [b for b in rows if scheduled[b][0].draft is None]
        starts = ints([spans[b].start for b in plain])  # host index, moved once
        self._sample(_take(logits, starts), plain, scheduled, out)
        drafted = [b for b in rows if b not in plain]
        argmax = argmax_rows(logits).tolist() if drafted else []  # [R] for greedy drafts, in one transfer
        moves = [self._verify(logits[spans[b]], argmax[spans[b]], b, scheduled, batch, out) for b in drafted]
        src, dst = (torch.cat(m) for m in zip(*moves)) if moves else (None, None)
        if src is not None and src.numel():  # a chain's kept path is already in place
            move_kv(self.kv_cache, src, dst)
        if self.speculator is not None:
            self.speculator.observe(input_ids[flat.to(input_ids.device)], logits)
        return out

    def _sample(self, logits: torch.Tensor, plain: list[int], scheduled: Scheduled, out: list[list[int]]) -> None:
        """logits: [P, V] raw, the last row of each sequence in `plain` (indices into scheduled) ->
        one token each into out."""
        if not plain:
            return
        seqs = [scheduled[b][0] for b in plain]
        adjusted = adjust_logits(logits, seqs, self.eos_token_ids)
        next_ids = sample(adjusted, [s.params for s in seqs], [self._generator(s) for s in seqs]).tolist()
        self._score_samples(logits, seqs, next_ids)
        for b, token_id in zip(plain, next_ids):
            out[b] = [token_id]

    def _verify(self, logits: torch.Tensor, argmax: list[int], b: int, scheduled: Scheduled, batch,
                out: list[list[int]]):  # fmt: skip
        """logits: [N + 1, V] raw (argmax: their argmax), every node of sequence b's draft -> its tokens
        into out[b]; returns (source slots, destination slots) [A] that move the accepted path's KV
        right behind the root."""
        seq, n = scheduled[b]
        draft = seq.draft
        assert n == draft.size + 1, "a draft is verified whole"
        path, tokens = verify(logits, seq, draft, self.eos_token_ids, self._generator(seq), argmax)
        self.speculator.record(seq, draft, path)
        out[b] = tokens
        if seq.params.logprobs is not None:
            seq.new_logprobs = entries(logits[[0, *path]], tokens, seq.params.logprobs)
        first = int(batch.query_index[b, 0])  # the root and its draft took the next slots, in node order
        moved = [(first + node, first + k) for k, node in enumerate(path, start=1) if node != k]
        return batch.slot_mapping[[s for s, _ in moved]], batch.slot_mapping[[d for _, d in moved]]

    def _score_samples(self, logits: torch.Tensor, seqs: list[Sequence], next_ids: list[int]) -> None:
        """logits: [N, V] raw, row i for seqs[i] -> seq.new_logprobs of those that asked."""
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        for i in want:
            seqs[i].new_logprobs = entries(logits[i : i + 1], [next_ids[i]], seqs[i].params.logprobs)

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
            input_ids.extend(seq.token_ids[seq.num_cached_tokens : seq.num_cached_tokens + n - seq.num_draft_tokens])
            input_ids.extend(seq.draft.tokens if seq.draft is not None else ())
        # a chain is verified with the plain causal mask at its own slots: no tree to lay out
        trees = [None if seq.draft is None or seq.draft.is_chain else seq.draft.tree_parents() for seq, _ in scheduled]
        batch = AttentionBatch.build(
            query_lens=[n for _, n in scheduled],
            context_lens=[seq.num_cached_tokens + n for seq, n in scheduled],
            block_tables=[seq.block_table for seq, _ in scheduled],
            block_size=self.block_size,
            tags=[seq.prompt_token_ids[0] for seq, _ in scheduled],
            device=self.device,
            trees=trees,
        )
        return ints(input_ids).to(self.device), batch

    @staticmethod
    def _generator(seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is not None and seq.generator is None:
            seq.generator = make_generator(seq.params.seed)
        return seq.generator


def _plain_decodes(scheduled: Scheduled) -> bool:
    """Every sequence computes its one last token, without a draft, and wants its logits: the rows
    are the sequences (no prompt positions to score: a decode's prompt is done)."""
    return all(n == 1 and seq.draft is None and seq.num_cached_tokens + 1 == len(seq) and not seq.kv_only
               and not seq.needs_prompt_logprobs for seq, n in scheduled)  # fmt: skip


def _take(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [N, ...] at rows [R] (host, ascending and distinct): x itself where they are all of its rows
    (a step of decodes only), else the gathered rows."""
    return x if rows.shape[0] == x.shape[0] else x[rows.to(x.device)]


def _spans(lengths: list[int]) -> list[slice]:
    """Consecutive slices of the given lengths."""
    out, start = [], 0
    for n in lengths:
        out.append(slice(start, start + n))
        start += n
    return out
