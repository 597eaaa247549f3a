"""Routing replay: every MoE layer's router picks the experts and weights a recorded trace holds.

A model whose `config.json` names a trace folder (`"raymoe_routing_replay": DIR`, a folder of
`sequence_*.npz` in the format of traces/olmoe-1b-7b/<domain>) routes each token by the trace
instead of its gate. The token at position p of a request whose prompt starts with token id s
takes, at MoE layer l, the recorded experts and weights of trace sequence `s mod S`, token
`p mod len(sequence)`. Attention, expert FFNs, dispatch and KV all run for real, so a live
cluster meets the routing of a real model; and since the choice depends only on (s, p), greedy
outputs stay identical across arrangements.

`write_replay_checkpoint` makes a model of a trace's shape (OLMoE layout, random weights, small
hidden size) that replays it; `replay_prompt` makes the prompt of a request that replays one
sequence: its first `length` recorded tokens (their routing is replayed in prefill).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raymoe.errors import CheckpointError

CONFIG_KEY = "raymoe_routing_replay"


class RoutingReplay:
    """The recorded routing of every sequence of a trace, padded to the longest.

    ids: `[S, T_max, L, K]` int64; weights: `[S, T_max, L, K]` float32; lengths: `[S]`.
    """

    def __init__(self, trace):
        """trace: a `raymoe.policies.traces.Trace` whose sequences carry router weights."""
        seqs = trace.sequences
        if any(s.weights is None for s in seqs):
            raise CheckpointError(f"trace {trace.name!r} has no router_weights: it cannot be replayed")
        self.name, self.num_experts = trace.name, trace.num_experts
        self.lengths = torch.tensor([s.num_tokens for s in seqs])
        shape = (len(seqs), int(self.lengths.max()), trace.num_layers, trace.top_k)
        self.ids = torch.zeros(shape, dtype=torch.long)
        self.weights = torch.zeros(shape, dtype=torch.float32)
        for i, s in enumerate(seqs):
            self.ids[i, : s.num_tokens] = torch.from_numpy(s.experts)
            self.weights[i, : s.num_tokens] = torch.from_numpy(s.weights)

    @classmethod
    def from_dir(cls, path: str | Path) -> "RoutingReplay":
        from raymoe.policies.traces import TraceError, load_trace

        try:
            return cls(load_trace(path))
        except TraceError as e:
            raise CheckpointError(f"routing replay: {e}") from e

    @property
    def num_sequences(self) -> int:
        return self.ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.ids.shape[2]

    @property
    def top_k(self) -> int:
        return self.ids.shape[3]

    def check_model(self, num_moe_layers: int, num_experts: int, top_k: int) -> None:
        """Raise a CheckpointError unless a model of this shape can replay the trace."""
        want = (self.num_layers, self.num_experts, self.top_k)
        if (num_moe_layers, num_experts, top_k) != want:
            raise CheckpointError(
                f"trace {self.name!r} has {want[0]} MoE layers, {want[1]} experts, top-{want[2]}; the model "
                f"has {num_moe_layers}, {num_experts}, top-{top_k}: replay it on a model of the trace's shape"
            )

    def to(self, device: str | torch.device) -> "RoutingReplay":
        """Move the recorded routing to `device` (where the model's batches live)."""
        self.lengths, self.ids, self.weights = (t.to(device) for t in (self.lengths, self.ids, self.weights))
        return self

    def route(self, moe_layer: int, tags: torch.Tensor | None, positions: torch.Tensor):
        """tags, positions: `[T]` -> recorded (ids `[T, K]` int64, weights `[T, K]` float32).

        tags: each token's sequence tag (its prompt's first token id); see the module doc."""
        if tags is None:
            raise CheckpointError("routing replay needs each token's sequence tag (the batch carries none)")
        seq = tags % self.num_sequences
        token = positions % self.lengths[seq]
        return self.ids[seq, token, moe_layer], self.weights[seq, token, moe_layer]


def replay_prompt(trace, sequence: int, length: int, vocab_size: int) -> list[int]:
    """Prompt token ids of a request replaying trace sequence `sequence`: its tag first, then its
    recorded tokens 1.. (folded into the vocabulary), `length` tokens in all."""
    tokens = trace.sequences[sequence % len(trace.sequences)].token_ids
    rest = [int(tokens[i % len(tokens)]) % vocab_size for i in range(1, length)]
    return [sequence % vocab_size] + rest


def replay_config(trace_dir: str | Path, num_layers: int, num_experts: int, top_k: int,
                  hidden_size: int = 64, intermediate_size: int = 32, vocab_size: int = 512,
                  num_heads: int = 4, num_kv_heads: int = 2, max_positions: int = 1024) -> dict:
    """config.json of an OLMoE-layout model of the trace's shape that replays it (no EOS: every
    request decodes to its max_tokens)."""
    return {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
        "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads, "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "num_experts": num_experts, "num_experts_per_tok": top_k, "norm_topk_prob": False,
        "clip_qkv": None, "eos_token_id": None, "bos_token_id": None, "torch_dtype": "float32",
        CONFIG_KEY: str(Path(trace_dir).resolve()),
    }  # fmt: skip


def replay_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights named as transformers saves OlmoeForCausalLM (norms near one)."""
    hidden, vocab, inter = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": (hidden,), f"{p}.post_attention_layernorm.weight": (hidden,),
                   f"{p}.self_attn.q_proj.weight": (hidden, hidden), f"{p}.self_attn.k_proj.weight": (kv, hidden),
                   f"{p}.self_attn.v_proj.weight": (kv, hidden), f"{p}.self_attn.o_proj.weight": (hidden, hidden),
                   f"{p}.self_attn.q_norm.weight": (hidden,), f"{p}.self_attn.k_norm.weight": (kv,),
                   f"{p}.mlp.gate.weight": (config["num_experts"], hidden)}  # fmt: skip
        for e in range(config["num_experts"]):
            q = f"{p}.mlp.experts.{e}"
            shapes |= {f"{q}.gate_proj.weight": (inter, hidden), f"{q}.up_proj.weight": (inter, hidden),
                       f"{q}.down_proj.weight": (hidden, inter)}  # fmt: skip
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    gen = torch.Generator().manual_seed(seed)
    return {name: (1.0 + 0.1 * torch.randn(shape, generator=gen)) if len(shape) == 1
            else torch.randn(shape, generator=gen) / shape[-1] ** 0.5
            for name, shape in shapes.items()}  # fmt: skip


def write_replay_checkpoint(folder: str | Path, trace_dir: str | Path, hidden_size: int = 64,
                            seed: int = 0) -> Path:
    """A model folder of `trace_dir`'s shape that replays its routing; returns the folder."""
    from safetensors.torch import save_file

    from raymoe.policies.traces import load_trace

    trace = load_trace(trace_dir)
    config = replay_config(trace_dir, trace.num_layers, trace.num_experts, trace.top_k, hidden_size)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(replay_weights(config, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return folder
