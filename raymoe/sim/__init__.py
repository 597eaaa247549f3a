"""Trace-driven cluster simulator: replay routing traces over a modelled cluster.

`simulate(trace, policy, topology, model, node)` replays a trace under a placement policy
(`raymoe.policies`) and models each decode step's time from per-node FLOP/s, memory and
network bandwidth and the model's layer sizes; `step_time_error` compares a modelled step
breakdown with one measured on a real cluster. Presets: `MODELS` (OLMoE-1B-7B,
Mixtral-8x7B, DeepSeek-V3, raymoe's built-in model) and `CLUSTERS`; `disaggregated` prices
raymoe's own layout (workers without experts, experts on shards) for checks against the real
cluster (`bench/sim_check.py`). No ray, no torch.
"""

from raymoe.sim.cluster import CLUSTERS, CPU_NODE, H100_IB, NodeSpec
from raymoe.sim.lift import lift_trace
from raymoe.sim.models import BUILTIN, DEEPSEEK_V3, MIXTRAL_8X7B, MODELS, OLMOE_1B_7B, ModelSpec, from_model_spec
from raymoe.sim.simulate import SimulationError, simulate, step_breakdown, step_time_error

__all__ = [
    "BUILTIN",
    "CLUSTERS",
    "CPU_NODE",
    "DEEPSEEK_V3",
    "H100_IB",
    "MIXTRAL_8X7B",
    "MODELS",
    "OLMOE_1B_7B",
    "ModelSpec",
    "NodeSpec",
    "SimulationError",
    "from_model_spec",
    "lift_trace",
    "simulate",
    "step_breakdown",
    "step_time_error",
]
