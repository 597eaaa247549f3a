"""The built-in default model, and a random-weight Qwen3-MoE checkpoint for tests.

`builtin_model_path()`: the model that `tools/train_builtin.py` trained, shipped as package data
(`raymoe/model/builtin_model/`) and checked against the SHA-256 digests below on every load:
nothing is trained or downloaded at first use, and transformers is not needed.

`random_model_path()`: a small random-weight checkpoint in Hugging Face format, built on first
use: the byte-level BPE tokenizer is trained on `builtin_corpus.txt` (package data) and the
weights are drawn from a seeded torch.Generator, so every build on a machine writes the same
bytes. It is built once under the user's cache dir (or `$RAYMOE_CACHE_DIR`) and reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import platformdirs
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from raymoe.errors import CheckpointError

logger = logging.getLogger(__name__)

BUILTIN_MODEL_NAME = "raymoe-builtin-moe"
RANDOM_VERSION = "v1"  # bump whenever a change below alters the random model's files
CACHE_DIR_ENV = "RAYMOE_CACHE_DIR"
CORPUS_FILE = "builtin_corpus.txt"
PACKAGE_FOLDER = "builtin_model"  # raymoe/model/builtin_model/: the trained model, package data
# SHA-256 of each shipped file, written by tools/ship_builtin.py; builtin_model_path() checks them
SHIPPED_SHA256 = {
    "config.json": "785f9be8761316e3d3e7958d30f091d8a8d47a19653da9fa81e0376ae300a706",
    "generation_config.json": "10bcdba174a5a89e105835bc369a794e8c1f1e3fffadcac0560747119d4db378",
    "model.safetensors": "047c7ab4de3c74400d27a6d73cc6b5dd52c393b5455023079305503eefb871a2",
    "tokenizer.json": "8a53eb69a968b1b31646532b3d04227a4502ecd2c27955653443ce5e0b023f47",
    "tokenizer_config.json": "1386e8ae1a0bad63b878dd788fc9cb5829bae68c5cd2c1a1b575375a6ec8862c",
}
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

SEED = 0
INIT_STD = 0.02
TARGET_VOCAB_SIZE = 4096  # the BPE trainer's goal; config.json records what it reached
EOS_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)  # ids 0, 1, 2

# ChatML, as Qwen models use; list-of-parts content keeps its text parts.
CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{%- set content = message.get('content') or '' %}\n"
    "{%- if content is not string %}\n"
    "{%- set content = content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}\n"
    "{%- endif %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Shape of the model: about 15M parameters, small enough for a 2-core CPU.
ARCHITECTURE = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,  # GQA: 4 query heads share each KV head
    head_dim=32,
    num_experts=16,
    num_experts_per_tok=4,
    moe_intermediate_size=256,
    intermediate_size=512,  # dense MLP width; unused since every layer is MoE
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
ROPE_THETA = 10000.0


def builtin_model_path() -> Path:
    """The built-in default model's folder: the trained one shipped in the package, its files checked
    against SHIPPED_SHA256 (the random-weight model while no weights are shipped)."""
    if not SHIPPED_SHA256:
        return random_model_path()
    folder = Path(str(resources.files("raymoe.model").joinpath(PACKAGE_FOLDER)))
    check_sha256(folder, SHIPPED_SHA256)
    return folder


def check_sha256(folder: Path, expected: dict[str, str]) -> None:
    """Raise CheckpointError unless every file named in `expected` is in `folder` with that SHA-256."""
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the raymoe package is incomplete; reinstall raymoe")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != digest:
            raise CheckpointError(
                f"{path} has SHA-256 {actual[:16]}..., the shipped file has {digest[:16]}...: "
                "the built-in model is damaged or was changed; reinstall raymoe"
            )


def cache_dir() -> Path:
    """raymoe's cache folder: `$RAYMOE_CACHE_DIR`, or the user cache dir."""
    return Path(os.environ.get(CACHE_DIR_ENV) or platformdirs.user_cache_dir("raymoe"))


def random_model_path() -> Path:
    """The random-weight model's folder, built on first use (safe when several processes race)."""
    base = cache_dir()
    final = base / f"random-{RANDOM_VERSION}"
    if _is_complete(final):
        return final
    if final.exists():
        raise CheckpointError(f"{final} is incomplete (a file of {FILES} is missing); delete it and raymoe rebuilds it")
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=base))
    try:
        logger.info("building the built-in model %s in %s", BUILTIN_MODEL_NAME, final)
        build_builtin_model(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache folder is an ordinary one
        try:
            os.replace(tmp, final)  # atomic: readers see no folder or a whole one
        except OSError:
            if not _is_complete(final):  # not a lost race with another process: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_builtin_model(out_dir: str | Path) -> None:
    """Write the tokenizer, config and weights into the existing folder `out_dir`."""
    out = Path(out_dir)
    tokenizer = train_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    config = model_config(tokenizer.get_vocab_size(), bos_token_id=ids[EOS_TOKEN], eos_token_id=ids[EOS_TOKEN])
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(ids))
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    save_file(random_weights(config), str(out / "model.safetensors"), metadata={"format": "pt"})


def train_tokenizer() -> Tokenizer:
    """Byte-level BPE trained on the packaged corpus; training is deterministic (checked by the tests)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE,
        min_frequency=1,  # the corpus is small; frequency 2 stops well short of the target
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte has a token: any text encodes
        show_progress=False,
    )
    corpus = resources.files("raymoe.model").joinpath(CORPUS_FILE).read_text(encoding="utf-8")
    tokenizer.train_from_iterator(corpus.splitlines(keepends=True), trainer)
    return tokenizer


def model_config(vocab_size: int, bos_token_id: int, eos_token_id: int, architecture: dict = ARCHITECTURE) -> dict:
    """config.json, with the fields transformers writes for Qwen3-MoE; `architecture` gives the shape."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        **architecture,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_theta": ROPE_THETA,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "sliding_window": None,
        "use_sliding_window": False,
        "initializer_range": INIT_STD,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, named as transformers saves Qwen3MoeForCausalLM."""
    hidden, vocab, head_dim = config["hidden_size"], config["vocab_size"], config["head_dim"]
    q_size = config["num_attention_heads"] * head_dim
    kv_size = config["num_key_value_heads"] * head_dim
    inter = config["moe_intermediate_size"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (q_size, hidden),
            f"{p}.self_attn.k_proj.weight": (kv_size, hidden),
            f"{p}.self_attn.v_proj.weight": (kv_size, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, q_size),
            f"{p}.self_attn.q_norm.weight": (head_dim,),
            f"{p}.self_attn.k_norm.weight": (head_dim,),
            f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.mlp.gate.weight": (config["num_experts"], hidden),
        }
        for e in range(config["num_experts"]):
            shapes |= {
                f"{p}.mlp.experts.{e}.gate_proj.weight": (inter, hidden),
                f"{p}.mlp.experts.{e}.up_proj.weight": (inter, hidden),
                f"{p}.mlp.experts.{e}.down_proj.weight": (hidden, inter),
            }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return shapes


def random_weights(config: dict) -> dict[str, torch.Tensor]:
    """Norms are ones; every matrix is N(0, INIT_STD²), drawn in weight_shapes' order from one seed."""
    generator = torch.Generator().manual_seed(SEED)
    weights = {}
    for name, shape in weight_shapes(config).items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape, dtype=torch.float32)
        else:
            weights[name] = torch.randn(shape, generator=generator, dtype=torch.float32) * INIT_STD
    return weights


def _generation_config(ids: dict[str, int]) -> dict:
    # a chat reply ends with <|im_end|>, a plain completion with <|endoftext|>
    eot = ids[EOS_TOKEN]
    return {"bos_token_id": eot, "eos_token_id": [eot, ids[IM_END]], "pad_token_id": eot}


def _tokenizer_config() -> dict:
    return {
        # the generic fast tokenizer: it runs tokenizer.json as written (Qwen2Tokenizer would swap the pre-tokenizer)
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": ARCHITECTURE["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILES)
