"""Samples: the bookkeeping of requests with n > 1 (several samples of one prompt).

Sample 0 runs under the request's id; sample i under `"{request id}#{i}"` (`fork`).
The others wait (pending) until sample 0 has its first token, then join the batch; a request is
done when all its samples are.
"""

from __future__ import annotations

from dataclasses import replace

from raymoe.engine.sequence import Sequence


class Samples:
    def __init__(self):
        self.pending: dict[str, list] = {}  # request id -> Sequences of samples 1.. not started yet
        self.live: dict[str, set[str]] = {}  # request id -> sample ids (all n) not finished

    def add(self, request_id: str, others: list) -> None:
        self.pending[request_id] = others
        self.live[request_id] = {request_id, *(s.request_id for s in others)}

    def take_pending(self, sample_id: str) -> list:
        return self.pending.pop(sample_id, [])

    def parent(self, sample_id: str) -> str:
        """The request id of a sample id."""
        return sample_id.rsplit("#", 1)[0] if "#" in sample_id and self.has(sample_id.rsplit("#", 1)[0]) else sample_id

    def has(self, request_id: str) -> bool:
        return request_id in self.live

    def finished(self, sample_id: str) -> None:
        request_id = self.parent(sample_id)
        live = self.live.get(request_id)
        if live is not None:
            live.discard(sample_id)
            if not live and request_id not in self.pending:
                del self.live[request_id]

    def pop(self, request_id: str) -> list[str]:
        """Forget the request; the ids of its samples other than 0 (to abort them)."""
        self.pending.pop(request_id, None)
        return sorted(self.live.pop(request_id, set()) - {request_id})


def fork(seq: Sequence, index: int) -> Sequence:
    """Sample `index` of seq's request: its own sample id and RNG seed (seed + index, as vLLM)."""
    p = seq.params
    params = replace(p, n=1, seed=None if p.seed is None else (p.seed + index) % 2**64, prompt_logprobs=None)
    other = Sequence(seq.prompt_token_ids, params, f"{seq.request_id}#{index}")
    other.index = index
    other.cache_salt = seq.cache_salt  # chunk reuse: share sample 0's blended prompt blocks
    return other
