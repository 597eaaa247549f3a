"""Token Recycling (Luo et al., 2024): draft trees from the candidates the model already produced.

Every logits row the engine computes names the top-k tokens likely to follow its input token. They
are kept in an adjacency matrix, `successors[token] = [top-k next tokens]` (the latest row for that
token wins), shared by every sequence of the engine and kept across requests (its "hot start").
A draft is a static tree template laid over the matrix breadth first: the root is the sequence's
last token, and a node of the template that is the r-th child of its parent takes the r-th
successor of its parent's token. Nodes whose token has no successors yet are left out.

The template holds the `num_nodes` nodes most likely to be accepted, if the candidate of rank r
is accepted with probability `rank_accept[r]` independently along a path: a node's value is the
product over its path, so the template is wide near the root and deep along rank 0. Nodes worth
less than a draft token's cost (`min_value`, the engine's draft cost) are left out. `rank_accept` is measured as the engine
runs (how often the model's argmax is its input token's rank-r successor, `RANK_ACCEPT` as a prior)
and the template rebuilt from it now and then: a model that follows its candidates closely gets a
wider, deeper tree.
"""

from __future__ import annotations

import heapq

from raymoe.engine.spec.draft import Draft
from raymoe.engine.spec.speculator import DRAFT_COST

TOP_K = 8  # successors kept per token (the paper's k)
# How often the model's next token is the rank-r successor of its input token (measured on a trained
# built-in model, prose and document QA: docs/benchmarks.md); about a third of the time it is none.
RANK_ACCEPT = (0.5, 0.085, 0.04, 0.025, 0.018, 0.012, 0.011, 0.012)
PRIOR_ROWS = 200  # weight of RANK_ACCEPT against measured rows
REBUILD_ROWS = 2048  # measured rows between template rebuilds


def tree_template(num_nodes: int, rank_accept=RANK_ACCEPT, min_value: float = 0.0) -> list[tuple[int, int]]:
    """The `num_nodes` most valuable nodes worth at least `min_value`, as (parent node, rank) for
    nodes 1.., every node after its parent (node 0 is the root); best first, so any prefix is a tree."""
    nodes: list[tuple[int, int]] = []
    heap = [(-rank_accept[r], 0, r) for r in range(len(rank_accept))]  # (-value, parent, rank)
    heapq.heapify(heap)
    while heap and len(nodes) < num_nodes and -heap[0][0] >= min_value:
        neg_value, parent, rank = heapq.heappop(heap)
        nodes.append((parent, rank))
        node = len(nodes)
        for r, p in enumerate(rank_accept):
            heapq.heappush(heap, (neg_value * p, node, r))
    return nodes


class TokenRecycling:
    name = "token_recycling"
    default_num_tokens = 8

    def __init__(self, vocab_size: int, num_nodes: int, top_k: int = TOP_K, min_value: float = DRAFT_COST):
        self.top_k, self.num_nodes, self.min_value = top_k, num_nodes, min_value
        self.successors: list[list[int] | None] = [None] * vocab_size  # token -> top-k next tokens
        self.rank_hits = [PRIOR_ROWS * p for p in RANK_ACCEPT[:top_k]]  # rows whose argmax had rank r
        self.num_rows = float(PRIOR_ROWS)  # rows whose input token had successors
        self.num_rows_at_build = self.num_rows
        self.template = self._template()

    def rank_accept(self) -> list[float]:
        """Share of rows whose argmax was the rank-r successor of their input token."""
        return [h / self.num_rows for h in self.rank_hits]

    def _template(self) -> list[tuple[int, int]]:
        return tree_template(self.num_nodes, self.rank_accept(), self.min_value)

    def propose(self, seq, max_nodes: int, max_depth: int) -> Draft | None:
        """seq: a `Sequence`. A tree of at most max_nodes draft tokens, none deeper than max_depth."""
        node_token, node_depth, node_of = [seq.last_token], [0], {0: 0}  # template node -> draft node
        tokens: list[int] = []
        parents: list[int] = []
        for i, (parent, rank) in enumerate(self.template, start=1):
            if len(tokens) == max_nodes:
                break
            at = node_of.get(parent)
            if at is None or node_depth[at] >= max_depth:
                continue
            row = self.successors[node_token[at]]
            if row is None or rank >= len(row):
                continue
            node_of[i] = len(node_token)
            node_token.append(row[rank])
            node_depth.append(node_depth[at] + 1)
            tokens.append(row[rank])
            parents.append(at)
        return Draft(tuple(tokens), tuple(parents)) if tokens else None

    def observe(self, token_ids, logits) -> None:
        """token_ids: [R] input token of each row; logits: [R, V] the rows computed this step (tensors)."""
        top = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).indices.tolist()  # [R, k], argmax first
        for token, row in zip(token_ids.tolist(), top):
            old = self.successors[token]
            if old is not None:
                self.num_rows += 1
                if row[0] in old:
                    self.rank_hits[old.index(row[0])] += 1
            self.successors[token] = row
        if self.num_rows - self.num_rows_at_build >= REBUILD_ROWS:
            self.template, self.num_rows_at_build = self._template(), self.num_rows
