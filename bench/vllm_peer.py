"""vLLM's CPU build as the peer of bench/engine.py and bench/serve.py: its venv's environment,
`vllm serve` on the built-in model, and `vllm bench serve` (vLLM's own client) against any server.

The venv comes from bench/setup_vllm.sh (outside the repository); nothing here imports vLLM.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

START_TIMEOUT_S = 900  # vLLM compiles its model (inductor) before it answers


def vllm_env(venv: str, env: dict) -> tuple[str, dict]:
    """(python, environment) of the vLLM venv that bench/setup_vllm.sh made: its sitecustomize (the
    version lookup, the AMX permission) on PYTHONPATH, which vLLM's engine process inherits."""
    site = str(Path(venv) / "raymoe_site")
    return str(Path(venv) / "bin" / "python"), {**env, "PYTHONPATH": site, "VLLM_TARGET_DEVICE": "cpu",
                                                 "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1")}


@contextmanager
def vllm_server(venv: str, model_path: str, model_name: str, dtype: str, max_num_seqs: int, port: int):
    """`vllm serve` on 127.0.0.1:port, serving model_path as model_name; yields its URL (None if it did
    not start: the log's path is then in the raised error)."""
    python, env = vllm_env(venv, dict(os.environ))
    log_path = Path(tempfile.mkdtemp()) / "vllm.log"
    cmd = [str(Path(python).parent / "vllm"), "serve", model_path, "--dtype", dtype, "--served-model-name", model_name,
           "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max_num_seqs)]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not start (log: {log_path})")
            time.sleep(2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/models", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def bench_serve(venv: str, url: str, api_key: str | None, model_name: str, tokenizer: str, load: dict) -> dict:
    """`vllm bench serve` (random dataset, streamed completions, ignore_eos) against url; its result
    JSON reduced to the figures compared. load: input_len, output_len, num_prompts, max_concurrency,
    rate (requests/s, inf = all at once), seed."""
    python, env = vllm_env(venv, dict(os.environ))
    if api_key:
        env["OPENAI_API_KEY"] = api_key
    out_dir = Path(tempfile.mkdtemp())
    cmd = [str(Path(python).parent / "vllm"), "bench", "serve", "--backend", "openai", "--base-url", url,
           "--endpoint", "/v1/completions", "--model", model_name, "--tokenizer", tokenizer,
           "--dataset-name", "random", "--random-input-len", str(load["input_len"]),
           "--random-output-len", str(load["output_len"]), "--num-prompts", str(load["num_prompts"]),
           "--max-concurrency", str(load["max_concurrency"]), "--request-rate", str(load["rate"]),
           "--seed", str(load["seed"]), "--ignore-eos", "--temperature", "0", "--disable-tqdm",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(out_dir), "--result-filename", "result.json"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    result_path = out_dir / "result.json"
    if proc.returncode != 0 or not result_path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"vllm bench serve exited {proc.returncode}: " + " | ".join(tail)}
    return reduce_result(json.loads(result_path.read_text()))


def reduce_result(r: dict) -> dict:
    """The figures of `vllm bench serve`'s result JSON that the tables use."""
    keys = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "output_throughput",
            "request_throughput",
            "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms",
            "median_e2el_ms")  # fmt: skip
    out = {k: (round(r[k], 2) if isinstance(r.get(k), float) else r.get(k)) for k in keys}
    out["client"] = "vllm bench serve"
    return out
