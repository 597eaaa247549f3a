"""EngineConfig: the one-process engine's settings, validated once, then frozen.

`raymoe.config.EngineSettings` mirrors it field for field (the YAML / serve side)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.engine.device import check_device_name, resolve_device, resolve_dtype
from raymoe.engine.spec import check_speculative
from raymoe.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 32  # running sequences at most (the decode batch size)
    max_num_batched_tokens: int = 512  # new tokens per step: bounds a step's time; prompts chunk to fit
    # a prefill's new tokens per step at most (chunk-reuse work included): short steps for the decodes
    # beside a long prompt, at the price of more steps for it; None = the whole step budget
    long_prefill_token_threshold: int | None = None
    block_size: int = 16  # tokens per KV block: the unit of allocation and of prefix sharing
    kv_cache_bytes: int = 256 << 20  # KV pool size; capped at what max_num_seqs full contexts need
    dtype: str = "auto"  # weights and KV: auto = float32 on CPU (identical to transformers), bfloat16 on CUDA
    threads: int | None = None  # torch intra-op threads (process-wide); None = leave torch's setting
    device: str = "auto"  # cpu | cuda | cuda:N | auto (CUDA when available), resolved where weights load
    # Speculative decoding (raymoe.engine.spec): drafts from the request itself, verified losslessly.
    speculative: str = "none"  # none | token_recycling | prompt_lookup
    num_speculative_tokens: int | None = None  # draft tokens per sequence at most; None = the drafter's default
    speculative_token_budget: int = 32  # tokens a step verifies (decodes + drafts); past it drafts shrink (measured)
    # a draft token's cost as a share of a decode step: 0.1 measured in one process on the CPU; lower
    # where a step mostly waits (expert round trips in the cluster, weight reads on a GPU): deeper drafts
    speculative_draft_cost: float = 0.1

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_bytes", "threads",
                     "num_speculative_tokens", "speculative_token_budget", "long_prefill_token_threshold"):
            value = getattr(self, name)
            if name in ("threads", "num_speculative_tokens", "long_prefill_token_threshold") and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        check_device_name(self.device)
        check_speculative(self.speculative)
        cost = self.speculative_draft_cost
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not 0 < cost <= 1:
            raise ConfigError(f"speculative_draft_cost must be a number in (0, 1], got {cost!r}")
        if self.dtype not in DTYPES and self.dtype != "auto":
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)} or auto, got {self.dtype!r}")

    @property
    def torch_device(self) -> str:
        """The device this process computes on (`auto` resolved here; ConfigError if unusable)."""
        return resolve_device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        """`auto`: bfloat16 on CUDA, float32 on the CPU."""
        return DTYPES[resolve_dtype(self.dtype, self.torch_device)]
