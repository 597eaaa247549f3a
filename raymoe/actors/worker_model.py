"""Building a worker's engine: the model without its routed experts (they live on expert shards),
an experts backend, optional microbatch pipelining, and a KV pool to share prompt KV through."""

from __future__ import annotations

import logging
import os
import traceback

import torch

from raymoe.cluster.pipeline import PipelinedModel
from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.model.model import load_model

logger = logging.getLogger(__name__)


def build_engine(model_path: str, config: EngineConfig, experts, num_microbatches: int = 1) -> LLMEngine:
    """A token-ids-only engine (text is made by the front) whose experts run through `experts`."""
    torch.set_num_threads(1)  # many actors share few cores
    model = load_model(model_path, dtype=config.torch_dtype, load_experts=False, device=config.torch_device)
    model.experts = experts
    model.record_routing()  # each request's routing: the prompt's seats it, the rest is reported
    runner_model = PipelinedModel(model, num_microbatches) if num_microbatches > 1 else model
    return LLMEngine(runner_model, None, config)


def die(reason: str) -> None:
    """Crash-only: a worker whose engine step failed (its expert shards could not be replaced) has
    an engine in an unknown state; it exits, and its sequences resume on a fresh worker (the
    owner sees the actor die: `RequestRouter`, or the Serve replica that restarts it)."""
    logger.error("worker exiting: %s\n%s", reason, traceback.format_exc())
    os._exit(1)


class WorkerShell:
    """What every worker actor answers besides its own work: readiness, node, placement epoch.
    Subclasses set `self.experts` (an experts backend with `.epoch`)."""

    def epoch(self) -> int:
        """The placement epoch this worker's experts backend routes with (after its next step)."""
        return self.experts.epoch

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()
