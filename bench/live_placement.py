"""Placement in the running cluster: `raymoe replay` on OLMoE traces, each policy beside the
placement-blind baselines in the same run and on the same local Ray cluster.

    python bench/live_placement.py [--traces ../shared/traces/olmoe-1b-7b] [--nodes 4]
        [--slots-per-node 20] [--requests 64] [--max-tokens 24]
        [--policies contiguous,eplb_global,placement] [--replan step,async]
        [--out bench/out/live_placement.json]

Calibrated on one domain, replayed on the other (both directions). Per run: the local activation
rate and rows crossing processes / nodes per token measured in the live dispatch, the plan
evaluator's prediction for the same requests and the re-plan steps the live run had
(`plan_local_activation_rate`; both per re-plan window too), per-step node load
max/mean, decode tokens/s, and whether every output equals the one-process engine's. Prints and
writes one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray starts: loopback only

from raymoe.policies.registry import get_policy  # noqa: E402
from raymoe.replay_run import _node_args, build_parser, run  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--traces", type=Path, default=REPO.parent / "shared" / "traces" / "olmoe-1b-7b")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--slots-per-node", type=int, default=20)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--policies", default="contiguous,eplb_global,placement")
    p.add_argument("--pairs", default="general:coding,coding:general", help="calibration:replayed domain pairs")
    p.add_argument("--replan", default="step", help="re-planning policies' modes to run, comma separated: "
                   "step (workers hold at the re-plan's step), async (decode on meanwhile)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "live_placement.json")
    a = p.parse_args()
    pairs = [pair.split(":") for pair in a.pairs.split(",")]
    for domain in {d for pair in pairs for d in pair}:
        if not (a.traces / domain).is_dir():
            p.error(f"{a.traces / domain} is not a folder: point --traces at the folder of domain folders")
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=_node_args(1.0))
    for _ in range(a.nodes - 1):
        cluster.add_node(**_node_args(1.0))
    cluster.wait_for_nodes()
    runs = []
    try:
        for calib, domain in pairs:
            for policy in a.policies.split(","):
                modes = a.replan.split(",") if get_policy(policy).replan == "regroup" else ["step"]
                for mode in modes:
                    args = build_parser().parse_args([
                        "--trace", str(a.traces / domain), "--calibration", str(a.traces / calib),
                        "--nodes", str(a.nodes), "--slots-per-node", str(a.slots_per_node), "--policy", policy,
                        "--requests", str(a.requests), "--max-tokens", str(a.max_tokens), "--replan", mode,
                        "--address", cluster.address, "--json"])  # fmt: skip
                    result = run(args)
                    print(json.dumps(result), file=sys.stderr)
                    runs.append(result)
    finally:
        ray.shutdown()
        cluster.shutdown()
    out = {"bench": "live_placement", "nodes": a.nodes, "slots_per_node": a.slots_per_node,
           "requests": a.requests, "max_tokens": a.max_tokens, "runs": runs}  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
