"""The engine alone on bench/serve.py's random workload: the same-run baseline of `raymoe serve`'s TPOT.

    python bench/offline_step.py --input-len 128 --max-tokens 64 --num-requests 128 --max-num-seqs 32

`LLMEngine` in this process with `raymoe serve`'s engine settings (as bench/serve.py starts it),
every request added at once, stepped to the end; prints JSON: ms per step over all steps (as the
server's own counter reports it) and the median over the steps that return a token for a full batch.
"""

from __future__ import annotations

import argparse
import json
import random
import time


def run(input_len: int, max_tokens: int, num_requests: int, max_num_seqs: int, dtype: str, threads: int) -> dict:
    from raymoe.config import EngineSettings
    from raymoe.engine.llm_engine import LLMEngine
    from raymoe.engine.sampling_params import SamplingParams
    from raymoe.model.builtin import builtin_model_path

    settings = EngineSettings(max_num_seqs=max_num_seqs, dtype=dtype, threads=threads)  # `raymoe serve`'s defaults
    engine = LLMEngine.from_path(builtin_model_path(), settings.to_engine_config())
    rng = random.Random(0)
    vocab = engine.model.spec.vocab_size
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(2):  # warm-up
        engine.add_request([rng.randrange(10, vocab) for _ in range(input_len)], params, f"warm{i}")
    while engine.has_unfinished():
        engine.step()
    for i in range(num_requests):
        engine.add_request([rng.randrange(10, vocab) for _ in range(input_len)], params, str(i))
    times, full = [], []
    while engine.has_unfinished():
        start = time.perf_counter()
        deltas = engine.step()
        times.append(time.perf_counter() - start)
        if len(deltas) == max_num_seqs and all(len(d.token_ids) == 1 for d in deltas):
            full.append(times[-1])
    full.sort()
    return {"num_steps": len(times), "ms_per_step": round(1000 * sum(times) / len(times), 2),
            "full_decode_steps": len(full), "full_decode_ms_p50": round(1000 * full[len(full) // 2], 2) if full else None,
            "output_tokens_per_s": round(num_requests * max_tokens / sum(times), 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(run(args.input_len, args.max_tokens, args.num_requests, args.max_num_seqs, args.dtype, args.threads)))


if __name__ == "__main__":
    main()
