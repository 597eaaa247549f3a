"""Placement policies: pure functions over numpy that decide where experts and requests go.

No ray, no torch: the controller calls these to get a plan; actors carry plans out.

Terms, used by every name in this package (as in vLLM's expert load balancer):
  logical expert: one expert FFN of the model, `0 .. experts - 1` at each MoE layer.
  physical expert: one loaded copy of a logical expert, in one slot of one node.
  replica count (`logcnt [layers, experts]`): physical experts per logical expert, >= 1.
  redundant expert: a physical expert beyond an expert's first copy.
  slot: room for one physical expert per MoE layer on a node (`slots_per_node`).
  node: a machine (Ray node, or device) holding slots, with a relative speed.
  `phy2log [layers, physical]`: the logical expert of each physical expert.
  `log2phy [layers, experts, max replicas]`: the physical experts of each logical one.
  `phy2node [layers, physical]`: the node holding each physical expert.
  token-expert pair: one token routed to one of its top-k experts at one layer; loads count
      pairs. local activation: a pair served on the node its token runs on.

Modules: topology (nodes, slots, speeds), plan (the Plan dataclass), traces (recorded
routing, decode batches), eplb (baselines), replication, grouping, token_placement,
dispatch (replica choice per batch), replan (re-planning with few moves), prediction,
microbatch, registry (policy names), evaluate (metrics), cli (`raymoe plan`).
"""

from raymoe.policies.evaluate import evaluate, replay
from raymoe.policies.plan import Plan
from raymoe.policies.registry import REGISTRY, PolicyName, get_policy
from raymoe.policies.topology import Topology, TopologyError
from raymoe.policies.traces import TraceError, decode_batches, load_domains, load_trace

__all__ = [
    "Plan",
    "PolicyName",
    "REGISTRY",
    "Topology",
    "TopologyError",
    "TraceError",
    "decode_batches",
    "evaluate",
    "get_policy",
    "load_domains",
    "load_trace",
    "replay",
]
