"""The engine's chunk-reuse work, paid from the scheduler's token budget.

A sequence with a `BlendPlan` (`raymoe.engine.chunks`) gets its blend region [cached prefix,
plan.end) filled before the rest of its prompt prefills as usual. The tokens the scheduler gives it
in a step (`max_num_batched_tokens` is shared with every other sequence) pay for, in order:

1. gathering: each chunk's KV is read from the store; a missing chunk is computed on its own
   (positions 0.., no context) as a KV-only sequence in the step's forward, beside the other
   sequences' tokens, and stored after the step. Chunks are computed whole: at least one a step,
   more while the tokens last.
2. blending: a `BlendJob` (`raymoe.engine.blend`) in pieces; a token costs `FIRST_PASS_LAYERS`
   layers in pass 1 and the other layers in pass 2, and a step runs at most its tokens times the
   layers (one piece at least).
3. what is left: the prompt's remaining tokens, in the same step.

A sequence still gathering or blending sits the model run out, so one request's chunk work spreads
over steps and no step does much more than a budget's worth of tokens (a chunk longer than the
budget is still computed in one step). Without a chunk store (a decode worker) a plan is ignored:
the prompt computes in full, or comes from imported blocks.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from raymoe.engine.blend import BlendJob, PlacedChunks, gather_rows, place_chunk, run_active, run_first, start_job
from raymoe.engine.chunks import pack_chunk_kv, unpack_chunk_kv
from raymoe.engine.sampling_params import SamplingParams
from raymoe.engine.sequence import Sequence


# Pass 1 runs layer 0, then layer 1's KV projection and the deviations: timed on the built-in
# model at about two layers' worth (its long-context attention costs more than a plain step's).
FIRST_PASS_LAYERS = 2


@dataclass
class _Work:
    """A sequence's chunk work in progress."""

    kvs: dict = field(default_factory=dict)  # index in its plan -> ChunkKV; None: compute its tokens as usual
    job: BlendJob | None = None
    table: list | None = None  # the block table the job writes into (a new one: preempted, start again)
    used: list = field(default_factory=list)  # plan indices placed by the job
    offsets: list = field(default_factory=list)  # per used chunk, its region offsets [n] long


class Blender:
    """Gathers chunks and blends, within each sequence's scheduled tokens (see the module docstring)."""

    def __init__(self, runner, block_manager, block_size: int, store=None):
        self.runner, self.block_manager, self.block_size, self.store = runner, block_manager, block_size, store
        self.stats = {"blended_requests": 0, "chunk_tokens_placed": 0, "chunk_tokens_recomputed": 0,
                      "blend_token_layers": 0, "chunk_prefill_tokens": 0}  # fmt: skip
        self._work: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # an aborted sequence's goes with it
        self._computing: list[tuple[Sequence, int, Sequence]] = []  # (owner, plan index, KV-only sequence)

    @property
    def model(self):
        """The MoEModel (under a microbatch pipeline wrapper, if any)."""
        m = self.runner.model
        return m if hasattr(m, "layers") else m.model

    def run_pending(self, scheduled: list) -> list:
        """The step's schedule with each chunk-reuse sequence's new-token count cut to what its
        chunk work has left (dropped at none), and the chunks computed in this step's forward
        appended (KV-only sequences; `finish_step` takes them out again)."""
        out = []
        for seq, n in scheduled:
            plan = seq.blend_plan
            if plan is not None and self.store is not None and seq.num_cached_tokens < plan.end:
                n = self._advance(seq, plan, n)
            if n > 0:
                out.append((seq, n))
        return out + [(s, s.num_uncomputed_tokens) for _, _, s in self._computing]

    def finish_step(self, scheduled: list, token_ids: list) -> tuple[list, list]:
        """After the forward: store the chunks it computed and free their blocks; returns the
        schedule and new tokens without them."""
        if not self._computing:
            return scheduled, token_ids
        computing, self._computing = self._computing, []
        keys, values, lengths = [], [], []
        tally = getattr(self.runner.model, "tally", None)
        for owner, i, scratch in computing:
            n = len(scratch)
            kv = gather_rows(self.runner.kv_cache, scratch.block_table, self.block_size, n)
            scratch.num_cached_tokens = n
            self.block_manager.cache_blocks(scratch)  # plain prefix blocks: exactly what they are
            self.block_manager.free(scratch)
            if tally is not None:
                tally.pop(scratch.request_id)
            if owner in self._work:
                self._work[owner].kvs[i] = kv
            keys.append(owner.blend_plan.keys[i])
            values.append(pack_chunk_kv(kv))
            lengths.append(n)
        self.store.put_chunks(keys, values, lengths)
        k = len(computing)
        return scheduled[:-k], token_ids[:-k]

    def _advance(self, seq, plan, budget: int) -> int:
        """Spend up to `budget` tokens on seq's chunks and blend; returns the tokens left for its prompt."""
        work = self._work_of(seq)
        if work.job is None:
            todo = [i for i, (_, e) in enumerate(plan.spans) if e > seq.num_cached_tokens]
            if self._gather(seq, plan, work, todo, budget) or any(i not in work.kvs for i in todo):
                return 0  # chunks computed in this step's forward: the blend starts next step
            if not self._start(seq, plan, work, todo):
                del self._work[seq]
                return budget  # no chunk to place: the prompt computes as usual
        num_layers = len(self.model.layers)
        left = self._run_job(work, budget * num_layers, num_layers)
        if not work.job.is_done:
            return 0
        self._finish(seq, plan, work)
        return min(left // num_layers, len(seq) - seq.num_cached_tokens)

    def _work_of(self, seq) -> _Work:
        work = self._work.get(seq)
        if work is None:
            work = self._work[seq] = _Work()
        elif work.job is not None and (work.table is not seq.block_table or work.job.start != seq.num_cached_tokens):
            work.job = None  # preempted and admitted again: its KV is gone (the gathered chunks stay)
        return work

    def _gather(self, seq, plan, work: _Work, todo: list[int], budget: int) -> int:
        """Read the chunks `todo` not gathered yet; start computing missing ones (whole chunks, at
        least one) within `budget`. Returns the tokens this step's forward computes for them."""
        missing = [i for i in todo if i not in work.kvs]
        got = self.store.get_chunks([plan.keys[i] for i in missing]) if missing else []
        spent = 0
        for i, flat in zip(missing, got):
            s = plan.spans[i][0]
            if flat is not None:
                work.kvs[i] = unpack_chunk_kv(flat.to(self.runner.device), plan.lengths[i], self.model.kv_layout())
            elif spent == 0 or spent + plan.lengths[i] <= budget:
                scratch = self._kv_only(seq.token_ids[s : s + plan.lengths[i]])
                if scratch is None:
                    work.kvs[i] = None  # no free blocks for it: its tokens compute as usual
                    continue
                spent += scratch.num_uncomputed_tokens
                self.stats["chunk_prefill_tokens"] += scratch.num_uncomputed_tokens
                self._computing.append((seq, i, scratch))
        return spent

    def _kv_only(self, tokens: list[int]) -> Sequence | None:
        """A sequence that computes a chunk's KV at positions 0.. in the step's forward (no logits,
        no token); None when no blocks are free for it. Its cached prefix blocks are reused."""
        scratch = Sequence(tokens, SamplingParams())
        scratch.kv_only = True
        if not self.block_manager.can_allocate(scratch):
            return None
        scratch.num_cached_tokens = self.block_manager.allocate(scratch)
        return scratch

    def _start(self, seq, plan, work: _Work, todo: list[int]) -> bool:
        """Place the gathered chunks and start the blend job (False: none to place)."""
        start, device = seq.num_cached_tokens, self.runner.device
        parts, work.used, work.offsets = [], [], []
        for i in todo:
            if work.kvs[i] is None:
                continue
            s, e = plan.spans[i]
            lo = max(s, start)
            parts.append(place_chunk(self.model, work.kvs[i], slice(lo - s, e - s), s))
            work.offsets.append(torch.arange(lo - start, e - start, device=device))
            work.used.append(i)
        if not work.used:
            return False
        kv = [(torch.cat([k for k, _ in layer]), None if layer[0][1] is None else torch.cat([v for _, v in layer]))
              for layer in zip(*parts)]  # fmt: skip  # per layer: the chunks' rows in region order
        tokens = torch.tensor(seq.token_ids[start : plan.end], dtype=torch.long).to(device)
        work.job = start_job(self.model, self.runner.kv_cache, seq.block_table, self.block_size, tokens, start,
                             PlacedChunks(torch.cat(work.offsets), kv), plan.share)  # fmt: skip
        work.table = seq.block_table
        return True

    def _run_job(self, work: _Work, left: int, num_layers: int) -> int:
        """Run the job's next pieces with `left` token-layers (at least one piece); returns those left."""
        job = work.job
        args = (self.model, self.runner.kv_cache, work.table, self.block_size, job)
        first_piece, done_before = True, job.token_layers
        while not job.is_done:
            cost = FIRST_PASS_LAYERS if job.active is None else num_layers - 1  # layers a token of this pass runs
            n = max(left // cost, 1 if first_piece else 0)
            if n == 0:
                break
            if job.active is None:
                n = min(n, job.tokens.shape[0] - job.num_first)
                run_first(*args, n)
            else:
                n = min(n, job.active.numel() - job.num_active_done)
                run_active(*args, n)
            left, first_piece = max(left - n * cost, 0), False
        self.stats["blend_token_layers"] += job.token_layers - done_before
        return left

    def _finish(self, seq, plan, work: _Work) -> None:
        job = work.job
        seq.num_cached_tokens = plan.end
        is_active = torch.zeros(job.tokens.shape[0], dtype=torch.bool, device=job.tokens.device)
        is_active[job.active] = True
        saved = [int((~is_active[o]).sum()) for o in work.offsets]  # per used chunk, its tokens not recomputed
        placed = sum(o.numel() for o in work.offsets)
        st = self.stats
        st["blended_requests"] += 1
        st["chunk_tokens_placed"] += placed
        st["chunk_tokens_recomputed"] += placed - sum(saved)
        self.store.credit_chunks([plan.keys[i] for i in work.used], saved)
        del self._work[seq]
