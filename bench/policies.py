"""Placement policies on real routing traces, each next to its baselines in the same run.

    python bench/policies.py [--traces ../shared/traces] [--batch-sizes 64,128,256]
                             [--out bench/out/policies.json] [--plot docs/img]

Judged the way production meets them: plans are calibrated on one domain and evaluated on
the other; decode batches take one token from each of B concurrent sequences per step.
Prints one JSON object per line: per section, trace, calibration -> evaluation domain.
Sections: locality frontier (OLMoE, 4 nodes, 16/20/24 slots), replication (16 devices x 5
slots, equal and half twice as fast), predictor recall, simulator step time (OLMoE on 4
nodes; DeepSeek-V3 scale on 64 GPUs with lifted routing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from raymoe.logs import progress  # noqa: E402
from raymoe.policies import Topology, evaluate, load_domains  # noqa: E402
from raymoe.policies.prediction import predictor_recall  # noqa: E402
from raymoe.sim import CLUSTERS, DEEPSEEK_V3, OLMOE_1B_7B, lift_trace, simulate  # noqa: E402

# The controller re-plans after seeing this many decode tokens (per-step count = this / B).
REPLAN_TOKENS = 2560
# (label, policy, re-plans?) for the 4-node locality frontier; baselines first.
FRONTIER = [("contiguous", "contiguous", False), ("eplb_global", "eplb_global", False),
            ("eplb_global+replan", "eplb_global", True),
            ("replication+replan", "replication", True), ("grouping", "grouping", False),
            ("placement+replan", "placement", True), ("regrouping+replan", "regrouping", True)]
REPLICATION = [("eplb_global", "eplb_global", False),
               ("eplb_hierarchical", "eplb_hierarchical", False),
               ("eplb_global+replan", "eplb_global", True), ("replication", "replication", False),
               ("replication+replan", "replication", True)]
KEYS = ("local_activation_rate", "max_over_mean", "max_over_mean_p95", "makespan",
        "requests_max_over_mean", "num_plans", "experts_moved", "requests_migrated")


def run(trace, calibration, topology, policy, replan, batch_size, **kwargs):
    replan_every = max(1, REPLAN_TOKENS // batch_size) if replan else None
    out = evaluate(trace, policy, topology, calibration=calibration, batch_size=batch_size,
                   replan_every=replan_every, **kwargs)
    return {k: out[k] for k in KEYS} | {"replan_every_steps": replan_every}


def locality_frontier(domains, pairs, batch_sizes):
    for calib, domain in pairs:
        for batch_size in batch_sizes:
            for slots in (16, 20, 24):
                topology = Topology(4, slots)
                results = {label: run(domains[domain], domains[calib], topology, policy, replan,
                                      batch_size) for label, policy, replan in FRONTIER}
                yield {"section": "locality_frontier", "calibration": calib, "domain": domain,
                       "batch_size": batch_size, "nodes": 4, "slots_per_node": slots,
                       "results": results}


def replication(domains, pairs, batch_sizes):
    for speeds, name in ((None, "equal"), ((1.0,) * 8 + (2.0,) * 8, "half_2x")):
        topology = Topology(16, 5, speeds)
        for calib, domain in pairs:
            for batch_size in batch_sizes:
                results = {label: run(domains[domain], domains[calib], topology, policy, replan,
                                      batch_size) for label, policy, replan in REPLICATION}
                eplb = results["eplb_global"]["makespan"]
                for r in results.values():
                    r["makespan_vs_eplb_global"] = round(r["makespan"] / eplb - 1.0, 4)
                yield {"section": "replication", "devices": name, "calibration": calib,
                       "domain": domain, "batch_size": batch_size, "nodes": 16,
                       "slots_per_node": 5, "results": results}


def recall(domains, pairs):
    for calib, domain in pairs:
        yield {"section": "predictor_recall", "calibration": calib, "domain": domain,
               "top_k": {str(m): predictor_recall(domains[calib], domains[domain], m)
                         for m in (8, 16)}}


def simulator(domains, pairs):
    policies = [("contiguous", False), ("eplb_global", False), ("eplb_global", True),
                ("replication", True), ("placement", True), ("regrouping", True)]
    for calib, domain in pairs:
        for cluster in ("h100-ib", "cpu"):
            rows = {}
            for policy, replan in policies:
                rows[policy + ("+replan" if replan else "")] = simulate(
                    domains[domain], policy, Topology(4, 20), OLMOE_1B_7B, CLUSTERS[cluster],
                    calibration=domains[calib], batch_size=128,
                    replan_every=REPLAN_TOKENS // 128 if replan else None,
                    microbatches="auto")
            yield {"section": "simulator", "model": "olmoe-1b-7b", "cluster": cluster,
                   "calibration": calib, "domain": domain, "nodes": 4, "slots_per_node": 20,
                   "results": rows}
    calib, domain = pairs[0]
    big = {name: lift_trace(domains[name], DEEPSEEK_V3.num_moe_layers, DEEPSEEK_V3.num_experts)
           for name in (calib, domain)}
    rows = {}
    for policy, replan in (("eplb_global", False), ("eplb_hierarchical", False),
                           ("replication", False), ("replication", True), ("placement", True)):
        rows[policy + ("+replan" if replan else "")] = simulate(
            big[domain], policy, Topology(64, 5), DEEPSEEK_V3, CLUSTERS["h100-ib"],
            calibration=big[calib], batch_size=1024, num_steps=16,
            replan_every=4 if replan else None, microbatches="auto")
    yield {"section": "simulator", "model": "deepseek-v3", "cluster": "h100-ib",
           "routing": "OLMoE routing lifted to 58 layers x 256 experts (synthetic)",
           "calibration": calib, "domain": domain, "nodes": 64, "slots_per_node": 5,
           "batch_size": 1024, "results": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path, default=REPO.parent / "shared" / "traces")
    parser.add_argument("--batch-sizes", default="64,128,256")
    parser.add_argument("--sections", default="locality_frontier,replication,recall,simulator")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "policies.json")
    parser.add_argument("--plot", type=Path, default=None, help="write PNG plots here")
    parser.add_argument("--replot", type=Path, default=None,
                        help="only plot the records of an earlier run's --out file")
    args = parser.parse_args(argv)
    if args.replot:
        return plot_all(json.loads(args.replot.read_text()), args.plot or Path("."))
    domains = load_domains(args.traces / "olmoe-1b-7b")
    names = sorted(domains)
    pairs = [(a, b) for a in names for b in names if a != b]  # calibrate on one, judge other
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    sections = {"locality_frontier": lambda: locality_frontier(domains, pairs, batch_sizes),
                "replication": lambda: replication(domains, pairs, batch_sizes),
                "recall": lambda: recall(domains, pairs),
                "simulator": lambda: simulator(domains, pairs)}
    records, start = [], time.time()
    for name in progress(args.sections.split(","), "bench/policies.py sections", unit="section"):
        for record in sections[name]():
            record["trace"] = "olmoe-1b-7b"
            print(json.dumps(record), flush=True)
            records.append(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1))
    print(json.dumps({"section": "done", "seconds": round(time.time() - start, 1),
                      "out": str(args.out)}))
    if args.plot:
        plot_all(records, args.plot)


def plot_all(records, folder: Path):
    """PNG plots: the locality frontier, and replication max/mean and makespan vs EPLB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    frontier = [r for r in records if r["section"] == "locality_frontier"]
    for batch_size in sorted({r["batch_size"] for r in frontier}):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
        for ax, domain in zip(axes, sorted({r["domain"] for r in frontier})):
            for r in (r for r in frontier if r["domain"] == domain
                      and r["batch_size"] == batch_size):
                for i, (label, m) in enumerate(r["results"].items()):
                    ax.scatter(m["max_over_mean"], m["local_activation_rate"], color=f"C{i}",
                               marker="os^"[(r["slots_per_node"] - 16) // 4],
                               label=label if r["slots_per_node"] == 20 else None)
            ax.axhline(0.45, color="grey", lw=0.5)
            ax.axvline(1.25, color="grey", lw=0.5)
            ax.set(title=f"evaluated on {domain} (calibrated on the other), B={batch_size}",
                   xlabel="per-batch max/mean node load", ylabel="local activation rate")
        axes[0].legend(fontsize=7, title="o 16 / s 20 / ^ 24 slots", title_fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"policies_frontier_b{batch_size}.png", dpi=110)
        plt.close(fig)
    _plot_replication(plt, [r for r in records if r["section"] == "replication"], folder)


def _plot_replication(plt, rows, folder):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (devices, metric) in zip(axes, (("equal", "max_over_mean"),
                                            ("half_2x", "makespan_vs_eplb_global"))):
        picked = [r for r in rows if r["devices"] == devices]
        labels = list(picked[0]["results"])
        for i, label in enumerate(labels):
            xs = [f"{r['domain']}\nB={r['batch_size']}" for r in picked]
            ys = [r["results"][label][metric] for r in picked]
            ax.bar([x + i * 0.15 for x in range(len(xs))], ys, width=0.15, label=label)
        ax.set_xticks([x + 0.3 for x in range(len(xs))], xs, fontsize=7)
        ax.set(title=f"16 devices x 5 slots, {devices}: {metric}", ylabel=metric)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "policies_replication.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
