import numpy as np
import pytest

from raymoe.policies.dispatch import layer_loads, water_fill


@pytest.mark.parametrize("loads, speeds, amount, expected", [
    ([0, 2, 4], [1, 1, 1], 3, [2.5, 0.5, 0]),
    ([0, 0], [1, 2], 3, [1, 2]),
    ([5, 0], [1, 1], 3, [0, 3]),
    ([1, 1], [1, 1], 0, [0, 0]),
], ids=["levels", "speeds", "one-side", "nothing"])
def test_water_fill(loads, speeds, amount, expected):
    share = water_fill(np.array(loads, float), np.array(speeds, float), amount)
    np.testing.assert_allclose(share, expected)


# Expert 0 has copies on both nodes; expert 1 only on node 0; expert 2 only on node 1.
PAIRS = np.array([[2, 1], [0, 3], [4, 0]], float)  # [experts, token's node]
REPLICAS = np.array([[1, 1], [1, 0], [0, 1]])


@pytest.mark.parametrize("mode, loads, local", [
    ("round_robin", [4.5, 5.5], [1.0, 0.5]),  # expert 0 split 1.5 | 1.5
    ("balanced", [5.0, 5.0], [2.0, 1.0]),  # expert 0 fills node 0 by 2, node 1 by 1
    ("local_first", [5.0, 5.0], [2.0, 1.0]),  # expert 0's pairs stay home
], ids=["round_robin", "balanced", "local_first"])
def test_layer_loads(mode, loads, local):
    node_load, node_local = layer_loads(PAIRS, REPLICAS, np.ones(2), mode)
    np.testing.assert_allclose(node_load, loads)
    np.testing.assert_allclose(node_local, local)


def test_balanced_uses_fast_node_more():
    pairs = np.array([[6.0, 0.0]])
    node_load, _ = layer_loads(pairs, np.array([[1, 1]]), np.array([1.0, 2.0]), "balanced")
    np.testing.assert_allclose(node_load, [2.0, 4.0])
