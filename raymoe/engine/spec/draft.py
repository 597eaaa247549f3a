"""Draft: the tokens a drafter guesses for one sequence, as a tree rooted at its last token.

Node 0 is the root: the sequence's last token, not yet run through the model (a decode's input).
Nodes 1..N are draft tokens; `parents[i - 1] < i` is node i's parent, so every node comes after
its parent (the order the verification step lays them out in the KV). A chain (prompt lookup) is
the tree whose every node's parent is the node before it. Siblings carry distinct tokens.

Node i's row of logits predicts the token after the path root -> i; verification walks from the
root to the deepest node whose token each row on the way agrees with, then adds one more token of
its own (the bonus), so a step always yields at least one token.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Draft:
    tokens: tuple[int, ...]  # [N] token of nodes 1..N
    parents: tuple[int, ...]  # [N] parent node of nodes 1..N (0 = the root)
    _children: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        assert len(self.tokens) == len(self.parents) and all(p < i + 1 for i, p in enumerate(self.parents))

    @classmethod
    def chain(cls, tokens: list[int]) -> "Draft":
        return cls(tuple(tokens), tuple(range(len(tokens))))

    @property
    def size(self) -> int:
        """Draft tokens (nodes besides the root)."""
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        """Every node's parent is the node before it: causal attention lays it out already."""
        return all(p == i for i, p in enumerate(self.parents))

    def tree_parents(self) -> list[int]:
        """[N + 1] parent of every node, the root's -1 (`AttentionBatch.build`'s trees)."""
        return [-1, *self.parents]

    def token(self, node: int) -> int:
        return self.tokens[node - 1]

    def children(self, node: int) -> list[int]:
        """Child nodes of `node`, in order (the order a sampled verification tries them in)."""
        if not self._children:
            for i, p in enumerate(self.parents, start=1):
                self._children.setdefault(p, []).append(i)
        return self._children.get(node, [])

    def path(self, node: int) -> list[int]:
        """Nodes from the root's child down to `node` (empty for the root)."""
        out = []
        while node > 0:
            out.append(node)
            node = self.parents[node - 1]
        return out[::-1]

    def depths(self) -> list[int]:
        """[N + 1] depth of every node (the root's 0)."""
        depth = [0]
        for p in self.parents:
            depth.append(depth[p] + 1)
        return depth
