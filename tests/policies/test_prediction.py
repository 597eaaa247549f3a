import numpy as np

from raymoe.policies.prediction import (
    by_token_id,
    predictor_recall,
    previous_layer,
    previous_token,
    recall,
    token_table,
    top_m,
    transition_table,
)
from tests.policies.tiny import tiny_trace


def test_top_m_breaks_ties_by_lower_id():
    assert top_m(np.array([1.0, 3.0, 3.0, 0.0]), 2).tolist() == [1, 2]


def test_recall_counts_actual_experts_found():
    predicted = np.array([[0, 1, 2], [5, 6, 7]])
    actual = np.array([[2, 3], [5, 7]])
    assert recall(predicted, actual) == 0.75


def test_previous_token_and_layer():
    experts = np.array([[[0, 1], [2, 3]], [[0, 4], [2, 5]]])  # [T=2, L=2, k=2]
    assert previous_token(experts, 2).tolist() == [[[0, 1], [2, 3]]]
    table = np.zeros((1, 6, 6))
    table[0, 0, 2], table[0, 1, 3], table[0, 4, 5] = 5, 4, 3
    assert previous_layer(table, experts, 2).tolist() == [[[2, 3]], [[2, 5]]]


def test_transition_and_token_tables_count_the_trace():
    trace = tiny_trace(num_sequences=2, num_tokens=3)
    table = transition_table(trace)
    assert table.shape == (1, 8, 8) and table.sum() == 6 * 2 * 2  # tokens x k x k
    vocab, counts = token_table(trace)
    assert counts.sum() == 6 * 2 * 2  # tokens x layers x k
    predicted = by_token_id((vocab, counts), np.zeros((2, 8)), vocab[:1], 2)
    assert predicted.shape == (1, 2, 2)


def test_predictor_recall_in_range_and_beats_nothing():
    trace = tiny_trace()
    out = predictor_recall(trace, trace)
    assert set(out) == {"popularity", "previous_token", "previous_layer", "token_table",
                        "request_profile"}
    assert all(0.0 <= v <= 1.0 for v in out.values())
