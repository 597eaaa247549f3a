"""`raymoe replay`: serve a routing trace's sequences through the live cluster and measure placement.

    raymoe replay --trace DIR [--calibration DIR] --nodes N --slots-per-node S [--speeds 1,1,2,2]
                  [--policy NAME] [--requests R] [--max-tokens T] [--replan step|async]
                  [--address ADDR] [--json]

Starts a local Ray cluster of N nodes (or joins --address), a model of the trace's shape whose
routers replay the trace (`raymoe.model.replay`), one expert shard and one decode worker per node,
and applies the policy's plan (from --calibration, default the trace). Request r replays trace
sequence r mod S: its prompt is the sequence's first tokens (their routing seats it), then it
decodes T tokens; all R arrive at once. A re-planning policy (regrouping) re-plans before every
`REPLAN_EVERY_TOKENS`-th decode step from the requests' routing since its last re-plan and re-seats
the running requests; with `--replan step` (default) the decode workers hold at that step until the
new placement and the seats are in place, so it applies where the policy decided it; `async` lets
decoding run on meanwhile. Prints (one JSON object with --json) what the live dispatch measured,
what `raymoe.policies.evaluate` predicts for the same requests, plan, topology and re-plan steps
(also per re-plan window), and whether every output equals the one-process engine's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from raymoe.errors import ConfigError, RaymoeError
from raymoe.replay_measure import (
    PROMPT_TOKENS,
    dispatch_counts,
    measure,
    minus,
    minus_rows,
    node_rows,
    predicted_figures,
    window_rates,
)

REPLAN_EVERY_TOKENS = 6  # re-planning policies re-plan from live requests every this many tokens
LOAD_REPORT_S = 1.0  # as raymoe.actors.decode.LOAD_REPORT_S


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as `raymoe plan` errors
        print(f"raymoe replay: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from raymoe.policies.registry import REGISTRY

    p = _Parser(prog="raymoe replay", description=__doc__.splitlines()[0])
    p.add_argument("--trace", required=True, type=Path, help="folder of sequence_*.npz (one domain)")
    p.add_argument("--calibration", type=Path, default=None, help="trace to plan from (default: --trace)")
    p.add_argument("--nodes", required=True, type=int, help="Ray nodes (each runs a shard and a decode worker)")
    p.add_argument("--slots-per-node", required=True, type=int, help="physical experts per node per MoE layer")
    p.add_argument("--speeds", default=None, help="relative node speeds, comma separated (default all 1)")
    p.add_argument("--policy", default="placement", choices=sorted(REGISTRY), help="placement policy")
    p.add_argument("--requests", type=int, default=32, help="concurrent requests (default 32)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens each request generates (default 32)")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    p.add_argument("--replan", choices=("step", "async"), default="step",
                   help="re-planning policies: the decode workers hold at the re-plan's step until it "
                        "and the re-seating are done (step, the default), or decode on meanwhile (async)")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a readable summary)")
    return p


def replay_main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray starts: loopback only
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except RaymoeError as e:
        print(f"raymoe replay: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:<{width}}  {json.dumps(value)}")
    return 0


def _check(args) -> tuple:
    """Everything that can be wrong with the arguments, before any Ray starts."""
    from raymoe.policies.cli import parse_speeds, read_trace
    from raymoe.policies.registry import get_policy
    from raymoe.policies.stats import Calibration
    from raymoe.policies.topology import Topology

    if args.requests < 1 or args.max_tokens < 2:
        raise ConfigError(f"--requests {args.requests}, --max-tokens {args.max_tokens}: give >= 1 and >= 2")
    topology = Topology(args.nodes, args.slots_per_node, parse_speeds(args.speeds))
    trace = read_trace(args.trace)
    calibration = read_trace(args.calibration) if args.calibration else trace
    spec = get_policy(args.policy)
    spec.build(Calibration.from_trace(calibration), topology)  # a topology no plan fits fails here
    return topology, trace, calibration, spec


def run(args) -> dict:
    topology, trace, calibration, spec = _check(args)
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        from raymoe.model.replay import replay_prompt, write_replay_checkpoint

        model = write_replay_checkpoint(Path(tmp) / "model", args.trace)
        prompts = [replay_prompt(trace, r, PROMPT_TOKENS, 512) for r in range(args.requests)]
        with _ray(args, topology) as _:
            log(f"cluster of {args.nodes} nodes up; serving {args.requests} requests")
            live = serve(model, args, topology, calibration, spec, prompts)
        expected = one_process(model, prompts, args.max_tokens)
    sequences = np.arange(args.requests) % len(trace.sequences)
    predicted = predicted_figures(trace, args, topology, live.pop("plan"), spec, sequences, live["replans_at_steps"])
    outputs = live.pop("outputs")
    return {
        "policy": args.policy, "trace": trace.name, "calibration": calibration.name,
        "nodes": topology.num_nodes, "slots_per_node": topology.slots_per_node,
        "requests": args.requests, "max_tokens": args.max_tokens, **live,
        **predicted,
        "identical_to_one_process": outputs == expected,
    }  # fmt: skip


class _ray:
    """A local Ray cluster of `topology.num_nodes` nodes (speeds as custom resources), or `--address`."""

    def __init__(self, args, topology):
        self.args, self.topology, self.cluster = args, topology, None

    def __enter__(self):
        import ray

        if self.args.address:
            ray.init(address=self.args.address)
            return self
        from ray.cluster_utils import Cluster

        speeds = self.topology.speed_array
        self.cluster = Cluster(initialize_head=True, head_node_args=_node_args(speeds[0]))
        for speed in speeds[1:]:
            self.cluster.add_node(**_node_args(speed))
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
                 log_to_driver=False)  # fmt: skip
        return self

    def __exit__(self, *exc):
        import ray

        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()


def _node_args(speed: float) -> dict:
    return {"num_cpus": 4, "resources": {"raymoe_speed": float(speed)}}


def serve(model: Path, args, topology, calibration, spec, prompts: list[list[int]]) -> dict:
    """Run the requests through a live cluster under the policy's plan; the measured figures."""
    import ray

    from raymoe.actors.cluster import MoECluster
    from raymoe.cluster.cluster import ClusterConfig
    from raymoe.cluster.policy_bridge import placement_from_plan
    from raymoe.cluster.topology import SPEED_RESOURCE
    from raymoe.engine.llm_engine import EngineConfig
    from raymoe.policies.stats import Calibration
    from raymoe.policies.topology import Topology

    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) < topology.num_nodes:
        raise ConfigError(f"the Ray cluster has {len(alive)} nodes; --nodes asks for {topology.num_nodes}")
    nodes = [n["NodeID"] for n in alive][: topology.num_nodes]
    engine = EngineConfig(max_num_seqs=max(8, len(prompts)), block_size=16, kv_cache_bytes=64 << 20,
                          max_num_batched_tokens=max(512, 2 * PROMPT_TOKENS * len(prompts)))  # fmt: skip
    config = ClusterConfig(engine=engine, namespace=f"replay-{uuid.uuid4().hex[:8]}", decode_nodes=tuple(nodes),
                           token_placement=spec.is_token_placement, node_watch_s=None, worker_num_cpus=0.1)  # fmt: skip
    cluster = MoECluster(str(model), config)
    try:
        placement, _ = ray.get(cluster.controller.placement.remote())
        shard_nodes = list(dict.fromkeys(placement.shard_nodes))
        speed = {n["NodeID"]: float(n["Resources"].get(SPEED_RESOURCE, 1.0)) for n in alive}
        plan_topology = Topology(len(shard_nodes), topology.slots_per_node, tuple(speed[n] for n in shard_nodes))
        plan = spec.build(Calibration.from_trace(calibration), plan_topology)
        ray.get(cluster.controller.apply.remote(placement_from_plan(plan, cluster.spec.moe_layer_ids, placement,
                                                                    shard_nodes)))  # fmt: skip
        measured, outputs = decode(cluster, args, spec, topology, prompts)
    finally:
        cluster.shutdown()
    return {**measured, "plan": plan, "plan_nodes": len(shard_nodes), "outputs": outputs}


def decode(cluster, args, spec, topology, prompts: list[list[int]]) -> tuple[dict, list[list[int]]]:
    """Serve the requests (re-planning as the policy does); (the measured figures, the outputs)."""
    import ray

    from raymoe.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    ray.get([w.take_timings.remote() for w in cluster.decode])
    before = dispatch_counts(cluster)
    start = time.perf_counter()
    replan = REPLAN_EVERY_TOKENS if spec.replan == "regroup" else None
    extra = topology.num_nodes * topology.slots_per_node - cluster.spec.num_experts
    outputs, replans, at_decode, windows = generate(cluster, prompts, params, replan, args.policy, extra,
                                                    args.replan == "step")  # fmt: skip
    wall = time.perf_counter() - start
    node_load = minus_rows(node_rows(cluster), at_decode)
    timings = ray.get([w.take_timings.remote() for w in cluster.decode])
    after = dispatch_counts(cluster)
    counts = [minus(a, b) for a, b in zip(after, before)]
    stats = ray.get([w.stats.remote() for w in cluster.decode])
    return {
        **measure(cluster, timings, wall, counts, node_load),
        "replan": args.replan if replan else None,
        "replans_at_steps": replans,
        "window_local_activation_rate": window_rates([before, *windows, after]) if windows else None,
        "tail_blocks_moved": sum(s["tail_blocks"] for s in stats),
    }, outputs


def generate(cluster, prompts, params, replan_every: int | None, policy: str, extra_replicas: int,
             step_aligned: bool = True) -> tuple:
    """(every request's token ids, the decode step before which each re-plan took effect, the
    rows run per node when decoding began, each decode worker's dispatch counts at each re-plan).

    With `replan_every`, the policy re-plans from the live request profiles the workers reported
    (two phases) and the front re-seats the running requests whose experts moved, before decode
    step `replan_every * i` (the evaluator's schedule; step 0 decodes the prompt's first output
    token). step_aligned: the decode workers hold there (`DecodeWorker.hold`), report, and go on
    once the re-plan and the re-seating are done; else decoding runs on meanwhile and the re-plan
    lands when it lands (recorded: `landed_at`)."""
    requests = cluster._requests(prompts, params)
    got = {r.request_id: [] for r in requests}
    holds = list(range(replan_every + 1, params.max_tokens, replan_every)) if replan_every else []
    if step_aligned and holds:
        ray_get([w.hold.remote(holds[0]) for w in cluster.decode])
    replans, at_decode, windows = [], None, []
    for delta in cluster.router.run(requests):
        if at_decode is None:  # every prompt is prefilled (one batch) before any decode
            at_decode = node_rows(cluster)
        got[delta.request_id].extend(delta.token_ids)
        running = [len(t) for t in got.values() if len(t) < params.max_tokens]
        if holds and running and min(running) >= holds[0]:
            holds.pop(0)
            if step_aligned:  # every worker is held: its reports of the window reach the controller
                ray_get([w.flush_reports.remote() for w in cluster.decode])
                windows.append(dispatch_counts(cluster))
            else:
                time.sleep(1.2 * LOAD_REPORT_S)  # the workers' next routing reports reach the controller
            ray_get(cluster.controller.rebalance.remote(extra_replicas, policy, step_aligned))
            replans.append(landed_at(cluster, params.max_tokens))
            go_on = holds[0] if holds else None
            cluster.router.request_reseat(then=(lambda h=go_on: ray_get([w.hold.remote(h) for w in cluster.decode]))
                                          if step_aligned else None)  # fmt: skip
    return [got[r.request_id] for r in requests], replans, at_decode, windows


def landed_at(cluster, max_tokens: int) -> int:
    """The decode step a new plan lands before: the slowest running sequence's next one (the
    workers' own count: the front's lags while it waits on the controller)."""
    running = [p for p in ray_get([w.progress.remote() for w in cluster.decode]) if p is not None]
    return min(running, default=max_tokens) - 1


def ray_get(ref):
    import ray

    return ray.get(ref)


def one_process(model: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy token ids of the one-process engine with the same replay, all requests together."""
    from raymoe.engine.llm_engine import EngineConfig, LLMEngine
    from raymoe.engine.sampling_params import SamplingParams
    from raymoe.model.model import load_model

    engine = LLMEngine(load_model(model), None, EngineConfig(max_num_seqs=len(prompts), kv_cache_bytes=64 << 20))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=str(i))
    out = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for d in engine.step():
            out[d.request_id].extend(d.token_ids)
    return [out[str(i)] for i in range(len(prompts))]


if __name__ == "__main__":
    sys.exit(replay_main())
