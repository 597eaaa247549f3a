import numpy as np
import pytest

from raymoe.policies import TraceError, decode_batches, load_domains, load_trace
from tests.policies.tiny import OLMOE, needs_traces, tiny_trace, write_npz


def test_load_trace_sorts_rows_into_tokens_layers_k(tmp_path):
    experts = np.arange(3 * 2 * 2).reshape(3, 2, 2) % 8
    write_npz(tmp_path, 0, experts, np.array([7, 8, 9]))
    trace = load_trace(tmp_path, num_experts=8)
    np.testing.assert_array_equal(trace.sequences[0].experts, experts)
    np.testing.assert_array_equal(trace.sequences[0].token_ids, [7, 8, 9])
    assert (trace.num_layers, trace.top_k, trace.num_experts) == (2, 2, 8)


def test_empty_folder_says_where_to_point(tmp_path):
    with pytest.raises(TraceError, match="point at a domain folder"):
        load_trace(tmp_path)


@pytest.mark.parametrize("batch_size", [2, 6, 20], ids=["fewer", "equal", "more-than-sequences"])
def test_decode_batches_one_token_per_running_request(batch_size):
    trace = tiny_trace(num_sequences=6, num_tokens=10)
    b = decode_batches(trace, batch_size, num_steps=15, seed=1)
    assert b.experts.shape == (15, batch_size, 2, 2)
    for step in range(1, 15):
        same = b.request[step] == b.request[step - 1]
        # a running request advances one token; a new one starts at token 0
        assert (b.position[step][same] == b.position[step - 1][same] + 1).all()
        assert (b.position[step][~same] == 0).all()
    # no request runs in two slots at once
    for step in range(15):
        assert len(set(b.request[step])) == batch_size
    seq = b.request_sequence[b.request]
    for step, slot in [(0, 0), (7, 1), (14, batch_size - 1)]:
        expected = trace.sequences[seq[step, slot]].experts[b.position[step, slot]]
        np.testing.assert_array_equal(b.experts[step, slot], expected)


@needs_traces
def test_real_olmoe_traces_load():
    domains = load_domains(OLMOE)
    assert {"general", "coding"} <= set(domains)
    trace = domains["general"]
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (16, 64, 8)
    assert trace.sequences[0].experts.shape == (128, 16, 8)
