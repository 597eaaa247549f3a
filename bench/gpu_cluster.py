"""A 2-shard raymoe cluster on one CUDA GPU (fractional num_gpus): lossless against the one-process
engine on the same GPU, and decode tokens/s of each arrangement.

    python bench/gpu_cluster.py [--out $OUT/gpu_cluster.json]

One local Ray node (loopback) with the machine's GPU; prefill and decode workers and 2 expert
shards each reserve 0.2 of it. Arrangements: co-located (the decode worker runs every expert on
its device), co-location off with rows staged through the host to the shards (the actor-call
transport), co-location off with rows over NCCL (`transport: nccl`, cupy), prompt KV from the
prefill to the decode worker over NCCL by Ray Direct Transport (`kv_transport: nccl`; the others
hand it over through the host's KV pool), and rows and KV both over NCCL (the two groups in the same
actors). float32, greedy, built-in model. Each cluster arrangement reports where its decode worker's
prompt blocks came from (`kv_direct_blocks`, `kv_pool_blocks`). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only, before Ray starts

import ray

from raymoe.actors.cluster import MoECluster
from raymoe.cluster.cluster import ClusterConfig
from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.engine.sampling_params import SamplingParams
from raymoe.model.builtin import builtin_model_path
from raymoe.model.model import load_model

ENGINE = EngineConfig(max_num_seqs=16, max_num_batched_tokens=512, dtype="float32", device="cuda")
PROMPTS = [[(17 * i + 5 * j) % 1000 + 10 for j in range(32)] for i in range(16)]
PARAMS = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


def one_process(path: str) -> tuple[list[list[int]], float]:
    engine = LLMEngine(load_model(path, device="cuda"), None, ENGINE)
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, PARAMS, request_id=str(i))
    out, start = {str(i): [] for i in range(len(PROMPTS))}, time.perf_counter()
    while engine.has_unfinished():
        for d in engine.step():
            out[d.request_id].extend(d.token_ids)
    return [out[str(i)] for i in range(len(PROMPTS))], time.perf_counter() - start


ARRANGEMENTS = {  # name -> (colocate_experts, transport, kv_transport)
    "colocated": (True, "actor_call", "pool"),
    "shards_over_host": (False, "actor_call", "pool"),
    "shards_over_nccl": (False, "nccl", "pool"),
    "kv_over_nccl": (True, "actor_call", "nccl"),
    "rows_and_kv_over_nccl": (False, "nccl", "nccl"),
}


def on_cluster(path: str, name: str) -> tuple[list[list[int]], float, dict]:
    colocate, transport, kv_transport = ARRANGEMENTS[name]
    config = ClusterConfig(engine=ENGINE, num_shards=2, shard_num_gpus=0.2, worker_num_gpus=0.2,
                           colocate_experts=colocate, transport=transport, kv_transport=kv_transport,
                           namespace=f"gpu-{name}")  # fmt: skip
    cluster = MoECluster(path, config)
    try:
        cluster.generate(PROMPTS[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        start = time.perf_counter()
        outs = cluster.generate(PROMPTS, PARAMS)
        seconds = time.perf_counter() - start
        decode = cluster.stats()["decode"][0]
        blocks = {k: decode[k] for k in ("kv_direct_blocks", "kv_pool_blocks")}
        return [o.token_ids for o in outs], seconds, blocks
    finally:
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    path = str(builtin_model_path())
    expected, base_s = one_process(path)
    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False)
    tokens = len(PROMPTS) * PARAMS.max_tokens
    report = {"one_process": {"tokens_per_s": round(tokens / base_s, 1)}}
    for name in ARRANGEMENTS:
        try:
            got, seconds, blocks = on_cluster(path, name)
        except Exception as e:  # one arrangement failing (e.g. cupy missing) still reports the others
            report[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            continue
        report[name] = {"tokens_per_s": round(tokens / seconds, 1), "identical_to_one_process": got == expected,
                        **blocks}  # fmt: skip
    ray.shutdown()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
