"""Scheduler: continuous batching with chunked prefill and preemption by recompute.

Each step has a budget of `max_num_batched_tokens` new tokens and at most `max_num_seqs` running
sequences. Running sequences go first, decodes before unfinished prefills, so a long prompt never
stalls the decodes; then waiting sequences are admitted in order while blocks and budget last. A
prompt longer than the remaining budget is prefilled in chunks over several steps; with
`long_prefill_token_threshold` a prefill takes at most that many tokens a step (vLLM's option of the
same name), so decodes beside a long prompt run in short steps.

Blocks for all of a sequence's tokens are taken at admission; a decode that crosses a block boundary
needs one more. When none is free, the newest running sequence not yet scheduled this step is
preempted: its blocks are freed and it goes back to the front of the waiting queue, to be
recomputed (prompt and generated tokens) on readmission. No admissions happen in a step that
preempted, so the freed blocks serve the running sequences first.

With speculative decoding (a `spec.Speculator`), each decode also gets a draft to verify in the same
step: its tokens take budget and KV slots after the decode token. A draft is dropped rather than
preempting anyone for its blocks; after the step the blocks past the kept tokens go back (`trim`).
"""

from __future__ import annotations

from collections import deque

from raymoe.engine.block_manager import BlockManager
from raymoe.engine.sequence import Sequence, SequenceStatus

Scheduled = list[tuple[Sequence, int]]  # (sequence, number of new tokens computed this step)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 speculator=None, long_prefill_token_threshold: int | None = None):  # fmt: skip
        self.block_manager = block_manager
        self.speculator = speculator  # a spec.Speculator, or None: no drafts
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold  # a prefill's tokens a step at most
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Scheduled:
        """Pick this step's sequences and how many new tokens each computes."""
        budget = self.max_num_batched_tokens
        num_preemptions = self.num_preemptions
        scheduled = self._schedule_running(budget)
        budget -= sum(n for _, n in scheduled)
        if self.num_preemptions == num_preemptions:
            scheduled += self._schedule_waiting(budget)
        return scheduled

    def postprocess(self, scheduled: Scheduled, token_ids: list[list[int]]) -> list[tuple[Sequence, int]]:
        """Record a step's work: advance the cached counts, append sampled tokens.

        token_ids: per scheduled sequence its new tokens: none where its chunk did not reach its end,
        one for a decode, 1 + accepted drafts for a verified draft (whose KV is kept for the decode
        token and the accepted drafts only). Returns (sequence, number of new tokens) of those that
        got any, for the stop checks.
        """
        sampled = []
        for (seq, n), new in zip(scheduled, token_ids, strict=True):
            seq.num_cached_tokens += n if seq.draft is None else len(new)
            seq.token_ids.extend(new)
            if seq.draft is not None:
                seq.draft = None
                self.block_manager.trim(seq)
            self.block_manager.cache_blocks(seq)
            if new:
                sampled.append((seq, len(new)))
        return sampled

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished (or aborted) and release its blocks; works in any queue."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    # ----- internals -------------------------------------------------------------------------
    def _schedule_running(self, budget: int) -> Scheduled:
        scheduled: Scheduled = []
        decodes_first = sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1)  # stable
        draft_size = self._draft_size(budget)
        for seq in decodes_first:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted for an earlier sequence
            if draft_size and seq.num_uncomputed_tokens == 1:
                self._draft(seq, draft_size)
            if not self._reserve_blocks(seq, scheduled):
                continue  # had to preempt itself
            n = self._num_new_tokens(seq, budget)
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def _num_new_tokens(self, seq: Sequence, budget: int) -> int:
        """Its tokens to compute (and draft to verify) within the budget; a prefill's at most
        `long_prefill_token_threshold`, so a long prompt never fills the steps of the decodes beside it."""
        n = seq.num_uncomputed_tokens + seq.num_draft_tokens
        if self.long_prefill_token_threshold is not None and seq.num_uncomputed_tokens > 1:
            n = min(n, self.long_prefill_token_threshold)
        return min(n, budget)

    def _draft_size(self, budget: int) -> int:
        if self.speculator is None:
            return 0
        num_decodes = sum(1 for s in self.running if s.num_uncomputed_tokens == 1)
        return self.speculator.draft_size(num_decodes, budget)

    def _draft(self, seq: Sequence, size: int) -> None:
        """Give a decode its draft, unless the draft's KV would need blocks that are not free."""
        seq.draft = self.speculator.propose(seq, size)
        if seq.draft is not None and not self.block_manager.can_append(seq):
            seq.draft = None

    def _reserve_blocks(self, seq: Sequence, scheduled: Scheduled) -> bool:
        """Make sure seq's table covers its tokens, preempting newer sequences if needed."""
        if not self.block_manager.num_missing_blocks(seq):  # most decodes: their last block has room
            return True
        while not self.block_manager.can_append(seq):
            victim = self._newest_unscheduled(seq, scheduled)
            if victim is None:
                self._preempt(seq)
                return False
            self._preempt(victim)
        self.block_manager.may_append(seq)
        return True

    def _newest_unscheduled(self, seq: Sequence, scheduled: Scheduled) -> Sequence | None:
        taken = {id(s) for s, _ in scheduled} | {id(seq)}
        return next((s for s in reversed(self.running) if id(s) not in taken), None)

    def _preempt(self, seq: Sequence) -> None:
        seq.draft = None
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.num_cached_tokens = SequenceStatus.PREEMPTED, 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _schedule_waiting(self, budget: int) -> Scheduled:
        scheduled: Scheduled = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            seq.num_cached_tokens = self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = self._num_new_tokens(seq, budget)
            scheduled.append((seq, n))
            budget -= n
        return scheduled
