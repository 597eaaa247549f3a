"""Step time and the bits of every logits row, for changes to the eager float32 step that must keep them.

    PYTHONPATH=TREE python bench/engine_bits.py [--tasks serving,fixed_32] [--dtype float32]

One `LLMEngine` per task (1 torch thread, the bench/engine.py settings): `serving` is its serving mix
(96 requests, greedy, ignore_eos), `fixed_32` 32 copies of its 32-token prompt, 128 tokens each.
Prints one JSON line per task: wall and CPU seconds of the run, model seconds (`ModelRunner.run`),
the median step, and a sha256 of every logits row the model computed, in order. Two trees give
the same hash only if every logit is bit-identical; run them alternately (each in its own process)
on a shared machine and compare CPU seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(task: str, dtype: str) -> dict:
    import torch

    import engine as bench_engine
    from raymoe.engine.llm_engine import EngineConfig, LLMEngine
    from raymoe.engine.sampling_params import SamplingParams
    from raymoe.model.builtin import builtin_model_path

    torch.set_num_threads(1)
    engine = LLMEngine.from_path(builtin_model_path(), EngineConfig(max_num_seqs=32, max_num_batched_tokens=512,
                                                                    dtype=dtype, threads=1))  # fmt: skip
    model, runner, digest, steps = engine.model, engine.model_runner, hashlib.sha256(), []
    logits_of, run_step = model.compute_logits, runner.run

    def hashed_logits(hidden):
        out = logits_of(hidden)
        digest.update(out.float().numpy().tobytes())
        return out

    def timed_run(scheduled):
        start = time.perf_counter()
        out = run_step(scheduled)
        steps.append(time.perf_counter() - start)
        return out

    model.compute_logits, runner.run = hashed_logits, timed_run
    vocab = model.spec.vocab_size
    if task == "serving":
        requests = bench_engine.serving_requests(vocab, 96)
    else:
        requests = [(p, 128) for p in bench_engine.fixed_prompts(vocab, int(task.removeprefix("fixed_")))]
    for i, (prompt, n) in enumerate(requests):
        engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), f"r{i}")
    cpu, wall = time.process_time(), time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return {"task": task, "wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3),
            "model_s": round(sum(steps), 3), "step_ms_p50": round(1000 * statistics.median(steps), 3),
            "steps": len(steps), "logits_sha256": digest.hexdigest()[:16], "load": os.getloadavg()[0]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="serving,fixed_32")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    for task in args.tasks.split(","):
        print(json.dumps(run(task, args.dtype)), flush=True)


if __name__ == "__main__":
    main()
