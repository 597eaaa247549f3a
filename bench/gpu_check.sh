#!/usr/bin/env bash
# One prepared check of raymoe's CUDA paths on a machine with one NVIDIA GPU (under 8 minutes):
#   bash bench/gpu_check.sh            # JSON and logs go to $OUT (default bench/out/gpu)
# 1. installs raymoe the README's way (CUDA torch from PyPI, transformers for the reference);
# 2. exactness on CUDA: every test family, float32, greedy equal to transformers; bfloat16 logits
#    close to float32 (tests/model/test_cuda.py), plus the device-placement tests;
# 3. the engine on CUDA, bfloat16, against transformers on the same GPU (bench/gpu_engine.py);
# 4. a 2-shard cluster on the one GPU with fractional num_gpus, lossless against the one-process
#    engine on CUDA: co-located, rows staged through the host, rows over NCCL, prompt KV from prefill
#    to decode worker over NCCL (Ray Direct Transport), rows and KV both over NCCL (bench/gpu_cluster.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
step() { echo "== $1 ($(date +%T))" | tee -a "$OUT/steps.log"; }

step install
if [ ! -x .venv-gpu/bin/python ]; then python3 -m venv .venv-gpu; fi
. .venv-gpu/bin/activate
# cupy (the gpu extra) for the NCCL transport; without it the cluster's NCCL arrangement reports its error
pip install -q -e ".[test,gpu]" >"$OUT/install.log" 2>&1 || pip install -q -e ".[test]" >>"$OUT/install.log" 2>&1 \
    || { echo "install failed" | tee -a "$OUT/steps.log"; tail -20 "$OUT/install.log"; exit 1; }
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/steps.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$OUT/steps.log" 2>&1

step exactness
timeout 240 python -m pytest -q -p no:cacheprovider tests/model/test_cuda.py tests/model/test_device.py \
    --junitxml="$OUT/exactness.xml" >"$OUT/exactness.log" 2>&1
echo "exactness rc=$?" | tee -a "$OUT/steps.log"; tail -3 "$OUT/exactness.log" | tee -a "$OUT/steps.log"

step engine
timeout 150 python bench/gpu_engine.py --dtype bfloat16 --repeats 3 --out "$OUT/gpu_engine.json" >"$OUT/gpu_engine.log" 2>&1
echo "engine rc=$?" | tee -a "$OUT/steps.log"

step cluster
timeout 210 python bench/gpu_cluster.py --out "$OUT/gpu_cluster.json" >"$OUT/gpu_cluster.log" 2>&1
echo "cluster rc=$?" | tee -a "$OUT/steps.log"
step done
