"""Speculative token placement: run each request on the node that holds most of its experts.

A request runs its first decode tokens (`warmup_tokens` of them) on the least-loaded node;
then its experts are predicted from its own routing so far and it moves to the node with
the highest predicted share of its token-expert pairs that still has room under a per-node
cap. Two predictors of a request's experts:
  history: every token the request has decoded so far (what a router has seen of it);
      when running requests are re-seated after a re-plan, the longer history is used.
  warmup: its first `warmup_tokens` tokens only, frozen.
Lossless: a wrong guess only costs a remote dispatch.
"""

from __future__ import annotations

from typing import Callable, Literal

import numpy as np

from raymoe.policies.stats import expert_load
from raymoe.policies.traces import DecodeBatches, Trace

# (request ids `[n]`, step) -> share of each request's predicted pairs held per node `[n, nodes]`
AffinityFn = Callable[[np.ndarray, int], np.ndarray]
# (request ids `[n]`, step) -> predicted expert counts `[n, layers, experts]`
ProfileFn = Callable[[np.ndarray, int], np.ndarray]
RequestProfile = Literal["history", "warmup"]


def warmup_profiles(trace: Trace, batches: DecodeBatches, warmup_tokens: int) -> np.ndarray:
    """`[requests, layers, experts]` expert counts of each request's first decode tokens."""
    by_sequence = np.stack(
        [expert_load(s.experts[:warmup_tokens], trace.num_experts) for s in trace.sequences]
    )
    return by_sequence[batches.request_sequence]


def history_profiles(trace: Trace, batches: DecodeBatches) -> ProfileFn:
    """Each request's expert counts `[n, layers, experts]` over the tokens it decoded
    before `step` (positions `0 .. position - 1`; a request that joined the replay part-way
    decoded those earlier, so a router has seen them too). Requests must run at `step`."""
    sequences = [s.experts for s in trace.sequences]

    def profiles(requests: np.ndarray, step: int) -> np.ndarray:
        position = np.full(len(batches.request_sequence), -1, dtype=np.int64)
        position[batches.request[step]] = batches.position[step]
        seen = position[requests]
        if (seen < 0).any():
            raise ValueError(f"requests {requests[seen < 0].tolist()} do not run at step {step}")
        out = np.zeros((len(requests), trace.num_layers, trace.num_experts))
        for i, (s, p) in enumerate(zip(batches.request_sequence[requests], seen)):
            out[i] = expert_load(sequences[s][:p], trace.num_experts)
        return out

    return profiles


def request_profiles(trace: Trace, batches: DecodeBatches, kind: RequestProfile,
                     warmup_tokens: int) -> ProfileFn:
    """The predictor of each request's experts that token placement uses (module doc)."""
    if kind == "history":
        return history_profiles(trace, batches)
    if kind == "warmup":
        table = warmup_profiles(trace, batches, warmup_tokens)
        return lambda requests, _step: table[requests]
    raise ValueError(f"unknown request profile {kind!r}: choose history or warmup")


def node_affinity(profiles: np.ndarray, replicas: np.ndarray) -> np.ndarray:
    """`[requests, nodes]` share of each request's predicted pairs held on each node.

    profiles: `[requests, layers, experts]`; replicas: `[layers, experts, nodes]`.
    """
    held = (replicas > 0).astype(np.float64)
    hits = np.einsum("rle,len->rn", profiles, held)
    return hits / np.maximum(profiles.sum((1, 2))[:, None], 1e-12)


def node_caps(batch_size: int, speeds: np.ndarray, slack: float) -> np.ndarray:
    """`[nodes]` most requests a node may run: its speed share of the batch, plus slack."""
    return np.ceil(batch_size * speeds / speeds.sum() * (1.0 + slack)).astype(np.int64)


class RequestPlacer:
    """Places requests step by step, as a decode router does as requests come and go.

    affinity None: routing-blind, each request goes to the least-loaded node (the baseline).
    Requests already past their warm-up when the replay starts were placed before it, so
    they are placed from their prediction at once.
    """

    def __init__(self, batches: DecodeBatches, speeds: np.ndarray, warmup_tokens: int = 8,
                 cap_slack: float = 0.1):
        caps = node_caps(batches.request.shape[1], speeds, cap_slack)
        self.state = _Placement(len(batches.request_sequence), caps, speeds)
        self.batches, self.warmup_tokens = batches, warmup_tokens

    def step(self, step: int, affinity: AffinityFn | None) -> np.ndarray:
        """`[batch]` node of each running request at `step`; steps must come in order."""
        _leave(self.state, self.batches, step)
        _admit(self.state, self.batches, step, affinity, self.warmup_tokens)
        return self.state.node[self.batches.request[step]]


    def reseat(self, step: int, affinity: AffinityFn, min_gain: float = 0.0) -> int:
        """Re-place the requests running at `step` after a new plan; returns how many moved.
        min_gain > 0: a request keeps its seat unless the new one raises its predicted local
        share by more than that (`reseat_requests`, as the live front does).

        A moved request's KV follows it through the KV pool; the count is the cost.
        """
        state, requests = self.state, self.batches.request[step]
        placed = requests[state.is_final[requests]]
        before = state.node[placed].copy()
        scores = affinity(placed, step)
        if min_gain > 0:
            new = reseat_requests(scores, before, state.caps, min_gain, state.speeds)
            for request, node in zip(placed, new):
                state.put(int(request), int(node), is_final=True)
            return int((new != before).sum())
        np.subtract.at(state.count, before, 1)
        state.node[placed] = -1
        for i in _decided_first(scores):
            state.put(int(placed[i]), _best_node(state, scores[i], placed[i]), is_final=True)
        return int((state.node[placed] != before).sum())


def place_requests(batches: DecodeBatches, speeds: np.ndarray, affinity: AffinityFn | None,
                   warmup_tokens: int = 8, cap_slack: float = 0.1) -> np.ndarray:
    """`[steps, batch]` node of each running request's token at each step."""
    placer = RequestPlacer(batches, speeds, warmup_tokens, cap_slack)
    return np.stack([placer.step(t, affinity) for t in range(batches.num_steps)])


class _Placement:
    def __init__(self, num_requests: int, caps: np.ndarray, speeds: np.ndarray):
        self.node = np.full(num_requests, -1, dtype=np.int64)
        self.is_final = np.zeros(num_requests, dtype=bool)
        self.count = np.zeros(len(caps), dtype=np.int64)
        self.caps, self.speeds = caps, speeds

    def least_loaded(self) -> int:
        return int(np.argmin(self.count / self.speeds))

    def put(self, request: int, node: int, is_final: bool) -> None:
        if self.node[request] >= 0:
            self.count[self.node[request]] -= 1
        self.node[request], self.is_final[request] = node, is_final
        self.count[node] += 1


def _leave(state: _Placement, batches: DecodeBatches, step: int) -> None:
    if step == 0:
        return
    gone = np.setdiff1d(batches.request[step - 1], batches.request[step])
    np.subtract.at(state.count, state.node[gone], 1)


def _admit(state, batches, step, affinity, warmup_tokens) -> None:
    requests, positions = batches.request[step], batches.position[step]
    is_new = state.node[requests] < 0
    is_ready = ~state.is_final[requests] & (positions >= warmup_tokens)
    for request in requests[is_new & ~is_ready]:
        state.put(int(request), state.least_loaded(), is_final=affinity is None)
    ready = requests[is_ready]
    if len(ready) == 0:
        return
    if affinity is None:
        for request in ready:
            state.put(int(request), state.least_loaded(), is_final=True)
        return
    scores = affinity(ready, step)  # [n, nodes]
    for i in _decided_first(scores):
        state.put(int(ready[i]), _best_node(state, scores[i], ready[i]), is_final=True)


def _decided_first(scores: np.ndarray) -> np.ndarray:
    """Order in which requests choose: most decided first, so a near-tie does not take a
    contested seat. scores: `[requests, nodes]`."""
    ranked = np.sort(scores, axis=1)
    margin = ranked[:, -1] - (ranked[:, -2] if scores.shape[1] > 1 else 0.0)
    return np.argsort(-margin, kind="stable")


def _best_node(state: _Placement, scores: np.ndarray, request: int) -> int:
    count = state.count.copy()
    if state.node[request] >= 0:
        count[state.node[request]] -= 1  # its own seat frees when it moves
    has_room = count < state.caps
    if not has_room.any():
        return state.least_loaded()
    return int(np.argmax(np.where(has_room, scores, -np.inf)))


def seat_requests(affinity: np.ndarray, count: np.ndarray, caps: np.ndarray,
                  speeds: np.ndarray | None = None) -> np.ndarray:
    """Seats for new requests, as a live router places them: each on the worker with the highest
    affinity that is under its cap; the most decided request chooses first; when every worker is
    full, the least loaded (by speed). affinity: `[requests, workers]` (`node_affinity` through
    each worker's node); count: `[workers]` requests already seated (updated in place);
    caps: `[workers]`. Returns `[requests]` worker indices."""
    speeds = np.ones(len(count)) if speeds is None else np.asarray(speeds, dtype=np.float64)
    state = _Placement(len(affinity), np.asarray(caps), speeds)
    state.count = count
    for i in _decided_first(affinity):
        state.put(int(i), _best_node(state, affinity[i], int(i)), is_final=True)
    return state.node.copy()


def reseat_requests(affinity: np.ndarray, seats: np.ndarray, caps: np.ndarray,
                    min_gain: float, speeds: np.ndarray | None = None) -> np.ndarray:
    """New seats for running requests after a new plan, as `RequestPlacer.reseat` does: all choose
    afresh under the caps, most decided first; a request keeps its seat unless the new one raises
    its predicted local share by more than `min_gain` (a move costs a KV transfer).
    affinity: `[requests, workers]`; seats: `[requests]`; caps: `[workers]`; speeds: `[workers]`
    (default equal). Returns `[requests]`."""
    seats = np.asarray(seats, dtype=np.int64)
    fresh = seat_requests(affinity, np.zeros(affinity.shape[1], dtype=np.int64), caps, speeds)
    rows = np.arange(len(seats))
    gain = affinity[rows, fresh] - affinity[rows, seats]
    return np.where(gain > min_gain, fresh, seats)
