"""Routing replay: a model of a trace's shape whose routers pick the recorded experts and weights."""

import numpy as np
import pytest
import torch

from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.engine.sampling_params import SamplingParams
from raymoe.errors import CheckpointError
from raymoe.model.model import load_model
from raymoe.model.paged import AttentionBatch
from raymoe.model.replay import RoutingReplay, replay_prompt, write_replay_checkpoint
from raymoe.policies.stats import expert_load
from raymoe.policies.traces import load_trace
from tests.policies.tiny import write_tiny_trace

SHAPE = dict(num_sequences=4, num_tokens=24, num_layers=3, num_experts=8, top_k=2)
PROMPT, NEW = 5, 12


@pytest.fixture(scope="module")
def replay_model(tmp_path_factory):
    """(trace, model folder) of a tiny replay model; tokens past a sequence's end wrap."""
    root = tmp_path_factory.mktemp("replay")
    write_tiny_trace(root / "trace", **SHAPE)
    return load_trace(root / "trace"), write_replay_checkpoint(root / "model", root / "trace", hidden_size=32)


def test_router_picks_the_recorded_experts_and_weights(replay_model):
    trace, path = replay_model
    model = load_model(path)
    block = model.layers[1].ffn
    batch = AttentionBatch.build([3, 1], [3, 30], [[0], [1, 2, 3, 4]], 8, tags=[2, 5])
    ids, weights = block.route(torch.zeros(4, 32), batch)
    seqs = trace.sequences
    want = [(2, 0), (2, 1), (2, 2), (5 % 4, 29 % 24)]  # (sequence, token): tag mod S, position mod length
    assert ids.tolist() == [seqs[s].experts[t, 1].tolist() for s, t in want]
    assert torch.equal(weights, torch.tensor(np.stack([seqs[s].weights[t, 1] for s, t in want])))


def test_engine_routes_every_token_as_recorded(replay_model):
    """The engine's tally of each request's routing (prefill + decode) equals the trace's."""
    trace, path = replay_model
    model = load_model(path)
    tally = model.record_routing()
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=4, block_size=4, kv_cache_bytes=4 << 20))
    for s in range(3):
        prompt = replay_prompt(trace, s, PROMPT, model.spec.vocab_size)
        engine.add_request(prompt, SamplingParams(max_tokens=NEW, ignore_eos=True), request_id=str(s))
    while engine.has_unfinished():
        engine.step()
    for s in range(3):  # prompt tokens 0..4 then the fed-back tokens 5..15 (the last is not fed)
        want = expert_load(trace.sequences[s].experts[: PROMPT + NEW - 1], trace.num_experts)
        assert np.array_equal(tally.counts[str(s)], want)


def test_shape_mismatch_and_missing_weights_are_clear(tmp_path, replay_model):
    trace, _ = replay_model
    replay = RoutingReplay(trace)
    with pytest.raises(CheckpointError, match="3 MoE layers, 8 experts, top-2"):
        replay.check_model(16, 64, 8)
    from dataclasses import replace

    bare = replace(trace, sequences=tuple(replace(s, weights=None) for s in trace.sequences))
    with pytest.raises(CheckpointError, match="no router_weights"):
        RoutingReplay(bare)
