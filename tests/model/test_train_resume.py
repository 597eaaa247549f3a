"""tools/train_builtin.py continuing from a checkpoint: the saved folder loads back to the same
weights (raymoe's per-expert tensors <-> transformers' fused ones) and the resumed text stream is
fixed by its seed and start step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from tokenizers import Tokenizer

from raymoe.model import builtin

TOOL = Path(__file__).resolve().parents[2] / "tools" / "train_builtin.py"


def _tool():
    spec = importlib.util.spec_from_file_location("train_builtin", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checkpoint_round_trip_and_resumed_stream(tmp_path):
    tb = _tool()
    tok = Tokenizer.from_file(str(builtin.builtin_model_path() / "tokenizer.json"))
    shape = dict(tb.ARCHITECTURE, hidden_size=32, num_hidden_layers=1, head_dim=8, moe_intermediate_size=16)
    config = builtin.model_config(tok.get_vocab_size(), bos_token_id=0, eos_token_id=0, architecture=shape)
    torch.manual_seed(0)
    model = tb.make_model(config)
    tb.save(model, tok, config, tmp_path)
    loaded, tok2, _ = tb.load_checkpoint(tmp_path)
    assert tok2.to_str() == tok.to_str()
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    seed = tb.data_seed(0, 12000)
    assert seed != tb.data_seed(0, 0) == 0
    pieces = tb.word_pieces(tok)
    a, b = (tb.Batches(tok, seed, pieces, 0.9, 0.5, 0.4) for _ in range(2))
    for batches in (a, b):
        batches.stage(128, 2, (2, 3))
    ids_a, w_a = next(a)
    ids_b, w_b = next(b)
    assert ids_a.shape == (2, 128) and torch.equal(ids_a, ids_b) and torch.equal(w_a, w_b)
