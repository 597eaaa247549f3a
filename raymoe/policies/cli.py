"""`raymoe plan`: build a placement plan from a routing trace and print it with its metrics.

    raymoe plan [--trace DIR] --nodes N --slots-per-node S [--speeds 1,1,2,2] [--policy NAME] [--json]

Also runnable as `python -m raymoe.policies.cli ...`. Prints a summary a person reads, or with
`--json` one JSON object: {"topology", "metrics", "plan"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from raymoe.cli_format import DefaultsHelpFormatter
from raymoe.data import SAMPLE_TRACE
from raymoe.errors import RaymoeError
from raymoe.policies.evaluate import evaluate
from raymoe.policies.registry import REGISTRY, get_policy
from raymoe.policies.stats import Calibration
from raymoe.policies.summary import format_summary
from raymoe.policies.topology import Topology, TopologyError
from raymoe.policies.traces import Trace, TraceError, load_domains, load_trace


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymoe plan", description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--trace", default=SAMPLE_TRACE, type=Path,
                        help="folder of sequence_*.npz, or of domain folders holding them "
                             "(default: the sample trace shipped with raymoe, see docs/traces.md)")
    parser.add_argument("--nodes", required=True, type=int, help="number of nodes")
    parser.add_argument("--slots-per-node", required=True, type=int,
                        help="physical experts per node per MoE layer")
    parser.add_argument("--speeds", default=None,
                        help="relative node speeds, comma separated, one per node (default: all 1)")
    parser.add_argument("--policy", default="replication", choices=sorted(REGISTRY), metavar="NAME",
                        help="placement policy, one of: " + "; ".join(
                            f"{name} ({spec.summary})" for name, spec in sorted(REGISTRY.items())))
    parser.add_argument("--calibration", type=Path, default=None,
                        help="trace to plan from (default: --trace itself)")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="concurrent sequences per decode step when measuring")
    parser.add_argument("--replan-every", type=int, default=None,
                        help="re-plan every this many steps while measuring")
    parser.add_argument("--no-plan", action="store_true", help="with --json: leave out the plan's arrays")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON object {"topology", "metrics", "plan"} instead of the summary')
    return parser


def parse_speeds(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise TopologyError(
            f"--speeds {text!r}: give numbers separated by commas, e.g. 1,1,2,2") from None


def read_trace(path: Path) -> Trace:
    """A domain folder, or a folder of domain folders read as one trace."""
    if any(path.glob("sequence_*.npz")):
        return load_trace(path)
    if not path.is_dir():
        raise TraceError(f"{path} is not a folder: point --trace at a folder of sequence_*.npz")
    path, domains = _find_domains(path)
    first = next(iter(domains.values()))
    sequences = tuple(s for t in domains.values() for s in t.sequences)
    return replace(first, name=path.name, sequences=sequences)


def _find_domains(path: Path) -> tuple[Path, dict[str, Trace]]:
    """(folder, its domains): `path`'s domain folders; a parent of one folder of domains (e.g.
    traces/) is followed, saying so on stderr."""
    try:
        return path, load_domains(path)
    except TraceError:
        children = [d for d in sorted(path.iterdir()) if d.is_dir()]
        nested = [d for d in children if any(c.is_dir() and any(c.glob("sequence_*.npz")) for c in d.iterdir())]
        if len(nested) == 1:
            print(f"raymoe plan: reading {nested[0]}, the one trace in {path}", file=sys.stderr)
            return nested[0], load_domains(nested[0])
        if nested:
            names = ", ".join(str(d) for d in nested)
            raise TraceError(f"{path} holds several traces ({names}); pass one of them as --trace") from None
        raise TraceError(f"{path} holds no sequence_*.npz files, nor folders of them: point --trace at a "
                         "domain folder (e.g. olmoe-1b-7b/coding) or a folder of domains (olmoe-1b-7b)") from None


def plan_main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        topology = Topology(args.nodes, args.slots_per_node, parse_speeds(args.speeds))
        trace = read_trace(args.trace)
        calibration = read_trace(args.calibration) if args.calibration else trace
        plan = get_policy(args.policy).build(Calibration.from_trace(calibration), topology)
        metrics = evaluate(trace, args.policy, topology, calibration=calibration,
                           batch_size=args.batch_size, replan_every=args.replan_every)
    except RaymoeError as error:
        print(f"raymoe plan: {error}", file=sys.stderr)
        return 2
    if not args.json:
        print(format_summary(trace, topology, metrics, plan))
        return 0
    out = {"topology": {"num_nodes": topology.num_nodes,
                        "slots_per_node": topology.slots_per_node,
                        "speeds": list(topology.speeds)},
           "metrics": metrics}
    if not args.no_plan:
        out["plan"] = plan.to_json()
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(plan_main())
