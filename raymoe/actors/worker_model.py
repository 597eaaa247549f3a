"""Building a worker's engine: the model without its routed experts (they live on expert shards),
an experts backend, optional microbatch pipelining, and a KV pool to share prompt KV through."""

from __future__ import annotations

import torch

from raymoe.cluster.pipeline import PipelinedModel
from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.model.model import load_model


def build_engine(model_path: str, config: EngineConfig, experts, num_microbatches: int = 1) -> LLMEngine:
    """A token-ids-only engine (text is made by the front) whose experts run through `experts`."""
    torch.set_num_threads(1)  # many actors share few cores
    model = load_model(model_path, dtype=config.torch_dtype, load_experts=False)
    model.experts = experts
    runner_model = PipelinedModel(model, num_microbatches) if num_microbatches > 1 else model
    return LLMEngine(runner_model, None, config)


class WorkerShell:
    """What every worker actor answers besides its own work: readiness, node, placement epoch.
    Subclasses set `self.experts` (an experts backend with `.epoch`)."""

    def epoch(self) -> int:
        """The placement epoch this worker's experts backend routes with (after its next step)."""
        return self.experts.epoch

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        import os

        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()
