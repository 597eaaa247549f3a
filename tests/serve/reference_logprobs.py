"""transformers' log_softmax over the built-in model: the reference the HTTP logprobs tests use."""

from __future__ import annotations

import functools

import torch

TOL = 1e-4


@functools.lru_cache(maxsize=1)
def reference():
    import transformers

    from raymoe.model.builtin import builtin_model_path

    return transformers.AutoModelForCausalLM.from_pretrained(builtin_model_path(), dtype=torch.float32).eval()


def greedy_ids(prompt_ids: list[int], num_tokens: int) -> list[int]:
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(num_tokens):
            ids.append(int(reference()(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


def logprob_rows(ids: list[int]) -> torch.Tensor:
    """[L, V]: row i is log_softmax of the logits after ids[: i + 1]."""
    with torch.no_grad():
        return torch.log_softmax(reference()(torch.tensor([ids])).logits[0].float(), dim=-1)


def tokenizer():
    from raymoe.model.builtin import builtin_model_path
    from raymoe.model.tokenizer import Tokenizer

    return Tokenizer.from_dir(builtin_model_path())
