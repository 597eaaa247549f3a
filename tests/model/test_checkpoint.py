"""Checkpoint loading: sharded files, lazy per-tensor reads, and clear errors for bad folders."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import build_checkpoint, load_reference
from raymoe.errors import CheckpointError, UnsupportedArchitectureError
from raymoe.model.checkpoint import Checkpoint
from raymoe.model.experts import ExpertStore
from raymoe.model.model import load_model
from raymoe.model.paged import AttentionBatch, allocate_kv_cache
from raymoe.model.spec import load_spec


def _logits(model, ids):
    cache = allocate_kv_cache(model.kv_layout(), 8, 16, torch.float32)
    batch = AttentionBatch.build([len(ids)], [len(ids)], [list(range(len(ids) // 16 + 1))], 16)
    return model.compute_logits(model.forward(torch.tensor(ids), batch, cache))


def test_sharded_checkpoint_loads_same_model(checkpoint_dir, tmp_path):
    src = checkpoint_dir("mixtral")
    ckpt = Checkpoint(src)
    names = sorted(ckpt.names())
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for filename, part in halves.items():
        save_file({n: ckpt.get(n).contiguous() for n in part}, str(tmp_path / filename))
    weight_map = {n: f for f, part in halves.items() for n in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(src / "config.json", tmp_path / "config.json")
    ids = [5, 9, 17, 33, 65]
    a, b = _logits(load_model(tmp_path), ids), _logits(load_model(src), ids)
    assert (a - b).abs().max().item() <= 1e-5  # equal up to kernel alignment effects


class CountingCheckpoint(Checkpoint):
    def __init__(self, path):
        super().__init__(path)
        self.read = []

    def get(self, name, dtype=None):
        self.read.append(name)
        return super().get(name, dtype)


def test_expert_store_reads_only_its_experts(checkpoint_dir):
    path = checkpoint_dir("qwen3_moe")
    ckpt = CountingCheckpoint(path)
    store = ExpertStore.load(ckpt, load_spec(path), torch.float32, which=[(0, 3), (2, 5)])
    assert sorted(store.experts) == [(0, 3), (2, 5)]
    assert all(".experts.3." in n or ".experts.5." in n for n in ckpt.read)
    assert len(ckpt.read) == 6


def test_model_without_experts_reads_no_expert_tensor(checkpoint_dir, monkeypatch):
    path = checkpoint_dir("olmoe")
    read = []
    original = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, n, d=None: read.append(n) or original(self, n, d))
    model = load_model(path, load_experts=False)
    assert model.experts is None
    assert read and not [n for n in read if ".experts." in n]


def test_yarn_rope_matches_transformers(tmp_path):
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
            "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
    path = build_checkpoint("deepseek_v3", tmp_path, rope_parameters=rope)
    ids = list(range(3, 40))
    with torch.no_grad():
        expected = load_reference(path)(torch.tensor([ids])).logits[0]
    assert (_logits(load_model(path), ids) - expected).abs().max().item() <= 1e-4


def _corrupt(tmp_path, src, what):
    shutil.copytree(src, tmp_path / "m")
    d = tmp_path / "m"
    if what == "no_config":
        (d / "config.json").unlink()
    elif what == "bad_json":
        (d / "config.json").write_text("{not json")
    elif what == "no_weights":
        (d / "model.safetensors").unlink()
    elif what == "truncated_weights":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[:100])
    elif what == "missing_tensor":
        ckpt = Checkpoint(src)
        save_file({n: ckpt.get(n) for n in ckpt.names() if n != "model.norm.weight"}, str(d / "model.safetensors"))
    elif what == "missing_shard":
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    elif what == "missing_field":
        cfg = json.loads((d / "config.json").read_text())
        del cfg["num_experts_per_tok"]
        (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "what, message",
    [
        ("no_config", "config.json"),
        ("bad_json", "not valid JSON"),
        ("no_weights", "model.safetensors"),
        ("truncated_weights", "not a readable safetensors"),
        ("missing_tensor", "model.norm.weight"),
        ("missing_shard", "gone.safetensors"),
        ("missing_field", "num_experts_per_tok"),
    ],
)
def test_bad_checkpoint_raises_clear_error(checkpoint_dir, tmp_path, what, message):
    d = _corrupt(tmp_path, checkpoint_dir("mixtral"), what)
    with pytest.raises(CheckpointError, match=message):
        load_model(d)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist|config.json"):
        load_model(tmp_path / "nowhere")


def test_unsupported_architecture_names_supported_ones(checkpoint_dir, tmp_path):
    d = _corrupt(tmp_path, checkpoint_dir("mixtral"), "none")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="MixtralForCausalLM.*Qwen3MoeForCausalLM"):
        load_model(d)
