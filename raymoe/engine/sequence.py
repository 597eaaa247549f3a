"""Sequence: one request's tokens and its place in the paged KV cache.

`token_ids` holds the prompt followed by the generated tokens. `num_cached_tokens` counts the
leading tokens whose KV is already in the cache (computed, or shared from another sequence's
identical prefix); the rest are computed by the next steps. A sequence needs logits exactly when a
step brings `num_cached_tokens` up to `len(token_ids)`: the end of its prompt, or one decode token.
Preemption (by recompute) drops the KV and sets `num_cached_tokens` back to 0, keeping the tokens.
"""

from __future__ import annotations

from enum import Enum, auto
from itertools import count

from raymoe.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()  # never scheduled yet
    RUNNING = auto()  # holds KV blocks; computes prompt chunks or decodes
    PREEMPTED = auto()  # back in the waiting queue, KV dropped; recomputed on readmission
    FINISHED = auto()


class Sequence:
    _next_id = count()

    def __init__(self, token_ids: list[int], params: SamplingParams, request_id: str | None = None):
        self.seq_id = next(Sequence._next_id)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.prompt_token_ids = list(token_ids)  # shared with every output of this request: read only
        self.num_prompt_tokens = len(token_ids)
        self.num_cached_tokens = 0
        self.block_table: list[int] = []  # KV block ids, in token order; owned by the BlockManager
        self.num_hashed_blocks = 0  # leading blocks registered for prefix sharing; BlockManager's
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.generator = None  # the sampler's RNG for a seeded request, created on first use
        self.cache_salt = None  # a CacheSalt when chunk-cache reuse makes its KV differ from plain prefill
        self.blend_plan = None  # a chunks.BlendPlan: cached chunks to place before the normal prefill
        self.kv_tail = None  # (tokens, exported block): its partial block's KV, adopted when admitted (kv_tail.py)
        self.kv_only = False  # a chunk computed for its KV alone (chunk reuse): no logits, no token
        self.index = 0  # which of the request's samples (SamplingParams.n) this is
        self.new_logprobs: list = []  # logprobs.Entry of each token of the last step, when params.logprobs asks
        self.draft = None  # a spec.Draft verified in this step (speculative decoding), else None
        self.draft_state = None  # the drafter's own state for this sequence (e.g. an n-gram index)
        self.draft_record = None  # the Speculator's (accepted, rejected) draft tokens, decayed (None: none yet)
        self.prompt_logprobs: list = []  # logprobs.Entry of prompt tokens 1.. (params.prompt_logprobs)

    @classmethod
    def resumed(
        cls, prompt: list[int], outputs: list[int], params: SamplingParams, request_id: str | None = None
    ) -> "Sequence":
        """A request that already produced `outputs` elsewhere (a prefill worker, or a decode worker
        that died): those tokens count as generated; their KV is recomputed or taken from a pool."""
        seq = cls(list(prompt) + list(outputs), params, request_id)
        seq.prompt_token_ids, seq.num_prompt_tokens = list(prompt), len(prompt)
        return seq

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV is still to compute: 1 for a decode, more for a (re)prefill."""
        return len(self.token_ids) - self.num_cached_tokens

    @property
    def num_draft_tokens(self) -> int:
        """Draft tokens this step verifies besides the decode token (their KV takes slots too)."""
        return 0 if self.draft is None else self.draft.size

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked and not all computed: its prompt may not come from the prefix cache."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_blocks(self, block_size: int) -> int:
        """Blocks needed to hold the KV of every token (and of this step's draft)."""
        return (len(self.token_ids) + self.num_draft_tokens + block_size - 1) // block_size

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        """Token ids of block i (the last block may be partial)."""
        return self.token_ids[i * block_size : (i + 1) * block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, {self.status.name}, tokens={len(self)}, "
            f"cached={self.num_cached_tokens}, blocks={self.block_table})"
        )
