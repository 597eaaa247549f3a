"""raymoe's engine on a CUDA GPU against transformers on the same GPU, same checkpoint and dtype.

    python bench/gpu_engine.py [--dtype bfloat16] [--repeats 3] [--out $OUT/gpu_engine.json]

Fixed batches of B equal 32-token prompts (B = 1, 8, 32): decode ms per step from
(time for 65 tokens - time for 1 token) / 64, medians over repeats, for raymoe's one-process engine
and transformers `generate` (static batch, greedy). Model: a Mixtral-shaped checkpoint built here
(random weights; hidden 1024, 8 layers, 8 experts top-2), big enough that the GPU has work.
Prints one JSON object; needs a CUDA GPU and transformers (bench/gpu_check.sh installs it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from checkpoints import build_checkpoint  # noqa: E402

from raymoe.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from raymoe.engine.sampling_params import SamplingParams  # noqa: E402
from raymoe.model.model import load_model  # noqa: E402

SHAPE = dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)  # fmt: skip
BATCHES, PROMPT, DECODE = (1, 8, 32), 32, 64


def raymoe_seconds(engine: LLMEngine, batch: int, new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(batch):
        engine.add_request([(7 * i + j) % 1000 + 3 for j in range(PROMPT)], params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def transformers_seconds(model, batch: int, new_tokens: int) -> float:
    ids = torch.tensor([[(7 * i + j) % 1000 + 3 for j in range(PROMPT)] for i in range(batch)], device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def per_step_ms(run, batch: int, repeats: int) -> float:
    run(batch, 2)  # warm-up
    samples = [(run(batch, DECODE + 1) - run(batch, 1)) / DECODE * 1e3 for _ in range(repeats)]
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import transformers

    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint("mixtral", Path(tmp) / "m", **SHAPE)
        engine = LLMEngine(load_model(path, dtype=dtype, device="cuda"), None,
                           EngineConfig(max_num_seqs=32, max_num_batched_tokens=2048, dtype=args.dtype, device="cuda"))  # fmt: skip
        ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda").eval()
        report = {"gpu": torch.cuda.get_device_name(), "dtype": args.dtype, "model": SHAPE, "batches": {}}
        for b in BATCHES:
            ours = per_step_ms(lambda n, t: raymoe_seconds(engine, n, t), b, args.repeats)
            theirs = per_step_ms(lambda n, t: transformers_seconds(ref, n, t), b, args.repeats)
            report["batches"][b] = {"raymoe_ms_per_step": round(ours, 3), "transformers_ms_per_step": round(theirs, 3),
                                    "speedup": round(theirs / ours, 2)}  # fmt: skip
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
