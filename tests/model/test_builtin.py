"""The random-weight test model: deterministic, cached, and a real Qwen3-MoE checkpoint that transformers
loads; the SHA-256 check that guards the shipped built-in model."""

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from raymoe.errors import CheckpointError
from raymoe.model import builtin
from raymoe.model.builtin import RANDOM_VERSION, check_sha256, model_config, random_model_path, train_tokenizer, weight_shapes
from raymoe.model.spec import load_spec
from raymoe.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYMOE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return random_model_path()


def test_built_under_the_cache_dir_and_reused(monkeypatch, tmp_path, builtin_dir):
    monkeypatch.setenv("RAYMOE_CACHE_DIR", str(tmp_path))
    path = random_model_path()
    assert path == tmp_path / f"random-{RANDOM_VERSION}"
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert random_model_path() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp folder left behind
    for name in builtin.FILES:  # two builds in two cache dirs: the same bytes
        assert (path / name).read_bytes() == (builtin_dir / name).read_bytes(), name


def test_tokenizer_training_is_deterministic_across_processes():
    code = "from raymoe.model.builtin import train_tokenizer; import sys; sys.stdout.write(train_tokenizer().to_str())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other == train_tokenizer().to_str()


def test_losing_a_build_race_returns_the_winners_folder(monkeypatch, tmp_path, builtin_dir):
    monkeypatch.setenv("RAYMOE_CACHE_DIR", str(tmp_path))
    real_build = builtin.build_builtin_model
    final = tmp_path / f"random-{RANDOM_VERSION}"

    def build_after_another_process(out_dir):
        final.mkdir()
        real_build(final)  # the other process finishes first
        real_build(out_dir)

    monkeypatch.setattr(builtin, "build_builtin_model", build_after_another_process)
    assert random_model_path() == final
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_incomplete_folder_says_to_delete_it(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYMOE_CACHE_DIR", str(tmp_path))
    (tmp_path / f"random-{RANDOM_VERSION}").mkdir()
    (tmp_path / f"random-{RANDOM_VERSION}" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="delete it"):
        random_model_path()


def test_config_reads_as_a_qwen3_moe_spec(builtin_dir):
    spec = load_spec(builtin_dir)
    tok = Tokenizer.from_dir(builtin_dir)
    assert (spec.family, spec.num_experts, spec.top_k, spec.num_layers) == ("qwen3_moe", 16, 4, 4)
    assert spec.vocab_size == tok.vocab_size == 4096
    assert spec.eos_token_ids[0] in tok.eos_token_ids
    assert spec.moe_layers == (True,) * 4 and spec.norm_topk_prob and spec.qk_norm == "head"


def test_weight_names_and_shapes_match_transformers_save(tmp_path):
    small = {**model_config(64, 0, 0), "hidden_size": 32, "num_hidden_layers": 2, "head_dim": 8, "num_experts": 3}
    small["moe_intermediate_size"] = 16
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**small)).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert saved == weight_shapes(small)


def test_parameter_count(builtin_dir):
    with safe_open(str(builtin_dir / "model.safetensors"), "pt") as f:
        num_params = sum(torch.Size(f.get_slice(n).get_shape()).numel() for n in f.keys())
    assert 10_000_000 < num_params < 50_000_000


def test_transformers_loads_it_and_gives_finite_logits(builtin_dir):
    model, info = AutoModelForCausalLM.from_pretrained(builtin_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    ids = torch.tensor([Tokenizer.from_dir(builtin_dir).encode("The garden in four seasons")])
    with torch.no_grad():
        logits = model(ids).logits  # [1, T, V]
    assert logits.shape == (1, ids.shape[1], 4096)
    assert torch.isfinite(logits).all()


def test_sha256_check_names_the_damaged_or_missing_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    good = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256(b"abc")
    check_sha256(tmp_path, {"a.bin": good})
    with pytest.raises(CheckpointError, match="a.bin has SHA-256 .* reinstall raymoe"):
        check_sha256(tmp_path, {"a.bin": "0" * 64})
    with pytest.raises(CheckpointError, match="b.bin is missing"):
        check_sha256(tmp_path, {"b.bin": good})
