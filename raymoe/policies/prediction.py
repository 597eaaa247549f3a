"""Expert prediction: guess a token's experts before its router runs, to prefetch or place.

Predictors, each giving `m` guesses per (token, layer); judged by top-k recall, the share of
the token's actual k experts among the guesses:
  popularity: the layer's most used experts in the calibration trace (the floor to beat);
  previous_token: the experts the same sequence's previous token used at this layer;
  previous_layer: from the experts this token used one layer earlier, through a
      layer-to-layer transition table learnt on calibration (the gate input of the next
      layer is not in the traces; the previous layer's choice stands in for it);
  token_table: a token-id to expert table learnt on calibration, popularity for unseen ids;
  request_profile: the experts the request's first decode tokens used most at this layer.
"""

from __future__ import annotations

import numpy as np

from raymoe.policies.stats import expert_load, pair_counts
from raymoe.policies.traces import Trace


def top_m(scores: np.ndarray, m: int) -> np.ndarray:
    """`[..., m]` indices of the `m` highest scores along the last axis (ties: lower id)."""
    return np.argsort(-scores, axis=-1, kind="stable")[..., :m]


def recall(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Share of actual experts that were predicted. predicted: `[..., m]`; actual: `[..., k]`."""
    hits = (predicted[..., :, None] == actual[..., None, :]).any(-2)  # [..., k]
    return float(hits.mean())


def popularity(load: np.ndarray, experts: np.ndarray, m: int) -> np.ndarray:
    """`[T, layers, m]` for tokens `experts [T, layers, k]`; load: `[layers, experts]`."""
    return np.broadcast_to(top_m(load, m), experts.shape[:2] + (m,))


def previous_token(experts: np.ndarray, m: int) -> np.ndarray:
    """`[T - 1, layers, m]` predictions for tokens 1.. of one sequence; m <= k."""
    return experts[:-1, :, :m]


def transition_table(calibration: Trace) -> np.ndarray:
    """`[layers - 1, experts, experts]` how often expert e at layer l precedes f at l + 1."""
    experts = calibration.all_tokens()  # [T, L, k]
    return pair_counts(experts[:, :-1], experts[:, 1:], calibration.num_experts)


def previous_layer(table: np.ndarray, experts: np.ndarray, m: int) -> np.ndarray:
    """`[T, layers - 1, m]` predictions for layers 1.. from each token's previous layer."""
    layer = np.arange(table.shape[0])[None, :, None]
    scores = table[layer, experts[:, :-1, :]].sum(2)  # [T, L-1, E]
    return top_m(scores, m)


def token_table(calibration: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(sorted token ids `[V]`, expert counts per id `[V, layers, experts]`) from calibration."""
    ids = np.concatenate([s.token_ids for s in calibration.sequences])
    experts = calibration.all_tokens()  # [T, L, k]
    num_layers, num_experts = experts.shape[1], calibration.num_experts
    vocab, index = np.unique(ids, return_inverse=True)
    cell = (index[:, None, None] * num_layers + np.arange(num_layers)[None, :, None]) \
        * num_experts + experts
    counts = np.bincount(cell.ravel(), minlength=len(vocab) * num_layers * num_experts)
    return vocab, counts.reshape(len(vocab), num_layers, num_experts).astype(np.float32)


def by_token_id(table, fallback: np.ndarray, token_ids: np.ndarray, m: int) -> np.ndarray:
    """`[T, layers, m]` from the token-id table; `fallback [layers, experts]` for unseen ids."""
    vocab, counts = table
    at = np.clip(np.searchsorted(vocab, token_ids), 0, len(vocab) - 1)
    is_seen = vocab[at] == token_ids
    # A seen id ranks by its own counts; the small fallback term breaks its ties.
    scores = np.where(is_seen[:, None, None], counts[at], 0.0) + 1e-6 * fallback[None]
    return top_m(scores, m)


def request_profile(experts: np.ndarray, warmup_tokens: int, m: int,
                    num_experts: int) -> np.ndarray:
    """`[T - warmup, layers, m]` for the tokens after a sequence's first `warmup_tokens`."""
    profile = expert_load(experts[:warmup_tokens], num_experts)  # [L, E]
    best = top_m(profile, m)
    return np.broadcast_to(best, (experts.shape[0] - warmup_tokens,) + best.shape)


def predictor_recall(calibration: Trace, trace: Trace, m: int | None = None,
                     warmup_tokens: int = 8) -> dict:
    """Top-m recall of every predictor on `trace`, learnt from `calibration` (m defaults to k)."""
    k = trace.top_k
    m = m or k
    table, ids = transition_table(calibration), token_table(calibration)
    popular = expert_load(calibration.all_tokens(), calibration.num_experts)
    hits = {name: [] for name in ("popularity", "previous_token", "previous_layer",
                                  "token_table", "request_profile")}
    for seq in trace.sequences:
        e = seq.experts
        hits["popularity"].append((popularity(popular, e, m), e))
        hits["previous_token"].append((previous_token(e, min(m, k)), e[1:]))
        hits["previous_layer"].append((previous_layer(table, e, m), e[:, 1:]))
        hits["token_table"].append((by_token_id(ids, popular, seq.token_ids, m), e))
        hits["request_profile"].append(
            (request_profile(e, warmup_tokens, m, trace.num_experts), e[warmup_tokens:]))
    return {name: round(recall(np.concatenate([p for p, _ in pairs]),
                               np.concatenate([a for _, a in pairs])), 4)
            for name, pairs in hits.items()}
