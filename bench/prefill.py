"""Prompt throughput of the engine alone: batches of new prompts, never seen before (issue 15).

    python bench/prefill.py [--dtype bfloat16] [--prompts 10] [--prompt-len 200] [--rounds 6]
    PYTHONPATH=/tmp/before python bench/prefill.py ...   # another tree's raymoe, for a before/after

`LLMEngine` in this process (1 torch thread, `raymoe serve`'s engine defaults: 512 new tokens a
step), one warm-up batch, then `--rounds` batches of `--prompts` random prompts of `--prompt-len`
tokens, one output token each, stepped to the end. Every prompt is new (no prefix-cache hits) and
the chunk lengths differ between batches as they would between requests. Prints JSON: ms per batch
(median, all), prompt tokens/s (median over batches), and the process's CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time


def run(dtype: str, prompts: int, prompt_len: int, rounds: int, seed: int = 0) -> dict:
    import torch

    from raymoe.config import EngineSettings
    from raymoe.engine.llm_engine import LLMEngine
    from raymoe.engine.sampling_params import SamplingParams
    from raymoe.model.builtin import builtin_model_path

    torch.set_num_threads(1)
    engine = LLMEngine.from_path(builtin_model_path(), EngineSettings(dtype=dtype, threads=1).to_engine_config())
    rng, vocab = random.Random(seed), engine.model.spec.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def batch(tag: str) -> tuple[float, int]:
        """(seconds, prompt tokens) of one batch of new prompts."""
        lens = [prompt_len + rng.randrange(-prompt_len // 4, prompt_len // 4 + 1) for _ in range(prompts)]
        for i, n in enumerate(lens):
            engine.add_request([rng.randrange(10, vocab) for _ in range(n)], params, f"{tag}{i}")
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        return time.perf_counter() - start, sum(lens)

    batch("warm")
    cpu0 = time.process_time()
    runs = [batch(f"r{r}-") for r in range(rounds)]
    return {"dtype": dtype, "prompts": prompts, "prompt_len": prompt_len,
            "ms_per_batch": round(statistics.median(t for t, _ in runs) * 1000, 2),
            "all_ms": [round(t * 1000, 2) for t, _ in runs],
            "prompt_tokens_per_s": round(statistics.median(n / t for t, n in runs)),
            "cpu_seconds": round(time.process_time() - cpu0, 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--prompt-len", type=int, default=200, help="mean prompt length (+-25 %%, uniform)")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    print(json.dumps(run(args.dtype, args.prompts, args.prompt_len, args.rounds)))


if __name__ == "__main__":
    main()
