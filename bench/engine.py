"""raymoe's one-process engine against transformers `generate` on the same float32 checkpoint.

    python bench/engine.py [--repeats 3] [--quick] [--out bench/out/engine.json]

Prints one JSON object. Every measurement runs in its own subprocess (so peak RSS is that
system's alone), on two models: the built-in one and a Mixtral-shaped one (hidden 256, 4 layers,
8 experts, top-2). Workloads:
- serving: 128 requests, prompts of 4..200 tokens, outputs of 8..256 (ignore_eos); raymoe with at
  most 32 running sequences against transformers in static batches of 32 in arrival order (each
  batch runs until its longest output). Figure: useful (requested) output tokens per second.
- fixed: B equal prompts of 32 tokens, B in 1, 8, 32: decode time per step, from
  (time for 65 tokens - time for 1 token) / 64.
- prompts: 32 prompts of 500 tokens, one output token each (new prompts every repeat: no prefix
  cache hits): prompt tokens per second, and ms per 512 prompt tokens (raymoe's step budget), beside
  the peers (`bench/prefill.py` is the raymoe-only one, with varied prompt lengths and CPU seconds).
Medians over `--repeats`; `--dtype bfloat16` runs every system in bfloat16. Beside wall time each
result has the CPU seconds of the worker's whole process tree (vLLM's engine core included), the
steadier figure on a shared machine. vLLM's CPU build joins as
an optional peer when importable. `--systems raymoe,raymoe-dp2,...` adds raymoe with
data_parallel_size=2 (two 1-thread engine replicas as Ray actors; serving only; its tree CPU
includes the Ray processes, `replica_cpu_seconds` the replicas alone); `raymoe-dp2-each32` is
the same with 32 running sequences per replica (64 in all). `raymoe-torch` is raymoe with torch's
ops only (RAYMOE_NATIVE=0: without raymoe's C kernels), their before in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVING = dict(num_requests=128, prompt_range=(4, 200), output_range=(8, 256), max_num_seqs=32, seed=0)
FIXED_BATCHES = (1, 8, 32)
FIXED_PROMPT, FIXED_DECODE = 32, 64
PROMPTS = dict(num=32, length=500, step_tokens=512)
MIXTRAL_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=4096)  # fmt: skip


def serving_requests(vocab_size: int, num_requests: int) -> list[tuple[list[int], int]]:
    """Deterministic (prompt token ids, output length) pairs."""
    rng = random.Random(SERVING["seed"])
    lo, hi = SERVING["prompt_range"]
    out_lo, out_hi = SERVING["output_range"]
    return [
        ([rng.randrange(3, vocab_size) for _ in range(rng.randint(lo, hi))], rng.randint(out_lo, out_hi))
        for _ in range(num_requests)
    ]


def fixed_prompts(vocab_size: int, batch: int) -> list[list[int]]:
    rng = random.Random(batch)
    prompt = [rng.randrange(3, vocab_size) for _ in range(FIXED_PROMPT)]
    return [list(prompt) for _ in range(batch)]


def long_prompts(vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(1000 + seed)
    return [[rng.randrange(3, vocab_size) for _ in range(PROMPTS["length"])] for _ in range(PROMPTS["num"])]


# ----- systems: each returns seconds for a list of (prompt ids, output length) ----------------------
class RaymoeSystem:
    def __init__(self, model_path: str, max_num_seqs: int):
        from raymoe.engine.llm import LLM

        self.llm = LLM(model=model_path, max_num_seqs=max_num_seqs, max_num_batched_tokens=512, dtype=bench_dtype())

    def run(self, requests) -> float:
        from raymoe.engine.sampling_params import SamplingParams

        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in requests]
        start = time.perf_counter()
        outs = self.llm.generate([p for p, _ in requests], params)
        elapsed = time.perf_counter() - start
        assert [len(o.token_ids) for o in outs] == [n for _, n in requests]
        return elapsed


class RaymoeDp2System(RaymoeSystem):
    """raymoe.LLM(data_parallel_size=2): two engine replicas (Ray actors) of 1 torch thread each,
    max_num_seqs split between them. Its Ray processes (replicas, raylet, GCS) are children of
    this worker, so tree_cpu_seconds counts them; `replica_cpu_seconds` is the replicas' alone."""

    def __init__(self, model_path: str, max_num_seqs: int):
        from raymoe.engine.llm import LLM

        self.llm = LLM(model=model_path, max_num_seqs=max_num_seqs, max_num_batched_tokens=512, dtype=bench_dtype(),
                       data_parallel_size=2, threads=1)  # fmt: skip

    def replica_cpu_seconds(self) -> float:
        return self.llm.replicas.cpu_seconds()

    def close(self) -> None:
        self.llm.shutdown()


class RaymoeDp2Each32System(RaymoeDp2System):
    """raymoe-dp2 with max_num_seqs doubled: each replica runs as many sequences as the one engine
    (vLLM's data parallelism counts max_num_seqs per engine): fewer, fuller steps per replica."""

    def __init__(self, model_path: str, max_num_seqs: int):
        super().__init__(model_path, 2 * max_num_seqs)


class TransformersSystem:
    def __init__(self, model_path: str, batch_size: int):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, bench_dtype())).eval()
        self.batch_size = batch_size

    def run(self, requests) -> float:
        start = time.perf_counter()
        for i in range(0, len(requests), self.batch_size):
            self._generate(requests[i : i + self.batch_size])
        return time.perf_counter() - start

    def _generate(self, batch) -> None:
        torch = self.torch
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (prompt, _) in enumerate(batch):  # left padding, as generate expects
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        new = max(n for _, n in batch)
        with torch.no_grad():
            self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=0)  # fmt: skip


class VllmSystem:
    def __init__(self, model_path: str, max_num_seqs: int):
        from vllm import LLM  # optional peer: never a dependency

        self.llm = LLM(model=model_path, dtype=bench_dtype(), max_num_seqs=max_num_seqs, enforce_eager=False)

    def run(self, requests) -> float:
        from vllm import SamplingParams, TokensPrompt

        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in requests]
        start = time.perf_counter()
        self.llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in requests], params)
        return time.perf_counter() - start


class Vllm64System(VllmSystem):
    """vLLM with max_num_seqs doubled: the peer of raymoe-dp2-each32 at the same 64 running."""

    def __init__(self, model_path: str, max_num_seqs: int):
        super().__init__(model_path, 2 * max_num_seqs)


def bench_dtype() -> str:
    """Weights' dtype of every system (`--dtype`, passed to the workers in the environment)."""
    return os.environ.get("RAYMOE_BENCH_DTYPE", "float32")


SYSTEMS = {"raymoe": RaymoeSystem, "raymoe-torch": RaymoeSystem, "raymoe-dp2": RaymoeDp2System, "raymoe-dp2-each32": RaymoeDp2Each32System,
           "transformers": TransformersSystem, "vllm": VllmSystem, "vllm-64": Vllm64System}  # fmt: skip
SERVING_ONLY = {"raymoe-dp2", "raymoe-dp2-each32", "vllm-64"}  # the fixed-batch tasks measure one engine's step


# ----- one worker process ----------------------------------------------------------------------------
def worker(system: str, model_path: str, task: str, repeats: int, num_requests: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("RAYMOE_BENCH_THREADS", "2")))
    vocab = json.loads((Path(model_path) / "config.json").read_text())["vocab_size"]
    if task == "serving":
        requests = serving_requests(vocab, num_requests)
        sys_ = SYSTEMS[system](model_path, SERVING["max_num_seqs"])
        sys_.run(requests[:4])  # warm-up
        times, cpu, replica_cpu = [], [], []
        replica_clock = getattr(sys_, "replica_cpu_seconds", lambda: 0.0)
        for _ in range(repeats):
            cpu_start, replica_start = tree_cpu_seconds(), replica_clock()
            times.append(sys_.run(requests))
            cpu.append(tree_cpu_seconds() - cpu_start)
            replica_cpu.append(replica_clock() - replica_start)
        useful = sum(n for _, n in requests)
        result = {"seconds": statistics.median(times), "useful_tokens": useful,
                  "useful_tokens_per_s": useful / statistics.median(times), "all_seconds": times,
                  "cpu_seconds": statistics.median(cpu), "useful_tokens_per_cpu_s": useful / statistics.median(cpu)}  # fmt: skip
        if hasattr(sys_, "replica_cpu_seconds"):
            result["replica_cpu_seconds"] = statistics.median(replica_cpu)
    elif task == "prompts":
        sys_ = SYSTEMS[system](model_path, PROMPTS["num"])
        sys_.run([(p, 1) for p in long_prompts(vocab, -1)[:4]])  # warm-up
        times = [sys_.run([(p, 1) for p in long_prompts(vocab, r)]) for r in range(repeats)]
        tokens = PROMPTS["num"] * PROMPTS["length"]
        result = {"prompt_tokens_per_s": tokens / statistics.median(times), "all_seconds": times,
                  "ms_per_step": 1000 * statistics.median(times) * PROMPTS["step_tokens"] / tokens}  # fmt: skip
    else:
        batch = int(task.split("_")[1])
        sys_ = SYSTEMS[system](model_path, batch)
        prompts = fixed_prompts(vocab, batch)
        sys_.run([(p, 2) for p in prompts])  # warm-up
        per_step, cpu_per_step = [], []
        for _ in range(repeats):
            c0 = tree_cpu_seconds()
            t_short = sys_.run([(p, 1) for p in prompts])
            c1 = tree_cpu_seconds()
            t_long = sys_.run([(p, FIXED_DECODE + 1) for p in prompts])
            per_step.append((t_long - t_short) / FIXED_DECODE)
            cpu_per_step.append(((tree_cpu_seconds() - c1) - (c1 - c0)) / FIXED_DECODE)
        result = {"ms_per_step": 1000 * statistics.median(per_step), "all_ms": [1000 * t for t in per_step],
                  "cpu_ms_per_step": 1000 * statistics.median(cpu_per_step)}
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process's
    getattr(sys_, "close", lambda: None)()
    return result


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) so far of this process and every live descendant (vLLM's engine
    core is a child process): on a shared machine the steadier figure than wall time."""
    total, pids = 0, [os.getpid()]
    while pids:
        pid = pids.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
            for task in os.listdir(f"/proc/{pid}/task"):
                pids += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            continue  # exited meanwhile
    return total / os.sysconf("SC_CLK_TCK")


def run_worker(system: str, model_path: Path, task: str, args) -> dict:
    if system in SERVING_ONLY and task != "serving":
        return {"skipped": "serving only"}
    python, env = sys.executable, {**os.environ, "RAYMOE_BENCH_THREADS": str(args.threads),
                                          "RAYMOE_BENCH_DTYPE": args.dtype}
    if system == "raymoe-torch":
        env["RAYMOE_NATIVE"] = "0"
    if system.startswith("vllm") and args.vllm_venv:
        from vllm_peer import vllm_env

        python, env = vllm_env(args.vllm_venv, env)
    cmd = [python, __file__, "--worker", system, "--model", str(model_path), "--task", task,
           "--repeats", str(args.repeats), "--num-requests", str(args.num_requests)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return last_json_line(proc.stdout)


def last_json_line(stdout: str) -> dict:
    """The worker's result: its last line that is a JSON object (vLLM logs its shutdown after it)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": "no result line"}


def prepare_models(workdir: Path) -> dict[str, Path]:
    from raymoe.model.builtin import builtin_model_path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from checkpoints import build_checkpoint

    builtin, mixtral = builtin_model_path(), workdir / "mixtral-shaped"
    if not (mixtral / "config.json").is_file():
        build_checkpoint("mixtral", mixtral, **MIXTRAL_SHAPE)
        for name in ("tokenizer.json", "tokenizer_config.json"):  # same 4096-token vocabulary
            shutil.copy(builtin / name, mixtral / name)
    return {"builtin": builtin, "mixtral_shaped": mixtral}


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=SERVING["num_requests"])
    parser.add_argument("--quick", action="store_true", help="16 requests, 1 repeat: a smoke run")
    parser.add_argument("--out", default=None)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--tasks", default="serving,fixed_1,fixed_8,fixed_32", help="comma-separated subset")
    parser.add_argument("--peer", choices=["vllm"], default=None, help="also run vLLM's CPU build")
    parser.add_argument("--vllm-venv", default="/work/vllm-venv", help="its venv (bench/setup_vllm.sh)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every system")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights of every system")
    parser.add_argument("--systems", default=None,
                        help="comma-separated subset of raymoe,raymoe-torch,raymoe-dp2,raymoe-dp2-each32,transformers,vllm "
                             "(the dp2 systems: serving only)")
    parser.add_argument("--models", default="builtin,mixtral_shaped", help="comma-separated subset")
    parser.add_argument("--rounds", type=int, default=1,
                        help="> 1: every task's systems again, in turn, per round; ratios per round")
    parser.add_argument("--worker", choices=sorted(SYSTEMS))
    parser.add_argument("--model")
    parser.add_argument("--task")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.task, args.repeats, args.num_requests)))
        return
    if args.quick:
        args.num_requests, args.repeats = 16, 1
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="raymoe-bench-"))
    systems = ["raymoe", "transformers"] + (["vllm"] if args.peer == "vllm" or vllm_available() else [])
    if args.systems:  # the raymoe-dp2 systems only when named
        named = ["raymoe", "raymoe-torch", *sorted(SERVING_ONLY)] + systems[1:]
        systems = [s for s in named if s in args.systems.split(",")]
    report = {"config": {**SERVING, "num_requests": args.num_requests, "repeats": args.repeats,
                         "fixed_batches": FIXED_BATCHES, "threads": args.threads, "dtype": args.dtype, "vllm": "vllm" in systems}}  # fmt: skip
    for name, path in prepare_models(workdir).items():
        if name in args.models.split(","):
            report[name] = measure_model(path, systems, args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


def measure_model(path: Path, systems: list[str], args) -> dict:
    """{task: {system: result}, "ratios": {...}}; with --rounds > 1 the results per round and each
    ratio as the list of per-round ratios (the systems run one after the other in every round)."""
    rounds = []
    for _ in range(args.rounds):
        res = {task: {s: run_worker(s, path, task, args) for s in systems} for task in args.tasks.split(",")}
        res["ratios"] = ratios_of(res, systems)
        rounds.append(res)
    if args.rounds == 1:
        return rounds[0]
    keys = {k for r in rounds for k in r["ratios"]}
    return {"rounds": rounds, "ratios": {k: [r["ratios"].get(k) for r in rounds] for k in sorted(keys)}}


def ratios_of(res: dict, systems: list[str]) -> dict:
    """raymoe against each other system: useful tok/s ratio (serving), step-time speed-up (fixed).
    The raymoe-dp2 systems against the non-raymoe ones too, their keys prefixed `raymoe-dp2..._`."""
    ratios = {}
    for base in [s for s in ("raymoe", *sorted(SERVING_ONLY)) if s in systems]:
        prefix = "" if base == "raymoe" else f"{base}_"
        for task, by_sys in res.items():
            for peer in [s for s in systems if s != base and (base == "raymoe" or not s.startswith("raymoe"))]:
                ratios |= {prefix + k: v for k, v in pair_ratios(task, by_sys[base], by_sys[peer], peer).items()}
    return ratios


def pair_ratios(task: str, r: dict, p: dict, peer: str) -> dict:
    if "error" in r or "error" in p or "skipped" in r or "skipped" in p:
        return {}
    if task == "serving":
        ratios = {f"serving_tokens_per_s_vs_{peer}": r["useful_tokens_per_s"] / p["useful_tokens_per_s"]}
        if "cpu_seconds" in r and "cpu_seconds" in p:
            ratios[f"serving_tokens_per_cpu_s_vs_{peer}"] = p["cpu_seconds"] / r["cpu_seconds"]
        return ratios
    ratios = {f"{task}_speedup_vs_{peer}": p["ms_per_step"] / r["ms_per_step"]}
    if "cpu_ms_per_step" in r and "cpu_ms_per_step" in p:
        ratios[f"{task}_cpu_speedup_vs_{peer}"] = p["cpu_ms_per_step"] / r["cpu_ms_per_step"]
    return ratios

if __name__ == "__main__":
    main()
